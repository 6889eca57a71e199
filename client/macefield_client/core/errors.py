"""Exceptions raised by the client.  Every one names the server target it was talking to."""

from __future__ import annotations

import grpc


class MACEFieldError(Exception):
    """A call to a MACE-Field server failed.

    Attributes: ``target`` (the server address), ``code`` (the gRPC status
    code, or None) and ``details`` (the server's message).
    """

    def __init__(self, message: str, *, target: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.target = target
        self.code = code
        self.details = details


class ServerUnavailable(MACEFieldError, ConnectionError):
    """The server could not be reached (or kept answering UNAVAILABLE) after all retries."""


class InvalidRequest(MACEFieldError, ValueError):
    """The server refused the request as invalid; the message names the bad field."""


class RequestTimeout(MACEFieldError, TimeoutError):
    """The call's deadline passed before the server answered."""


class ResourceExhausted(MACEFieldError):
    """The server's queue is full, or a structure is too large for it."""


class AuthenticationError(MACEFieldError, PermissionError):
    """The server refused the call's credentials (no or a wrong bearer token: UNAUTHENTICATED)."""


class ExtrapolationWarning(UserWarning):
    """A structure's extrapolation grade passed the threshold: its results are extrapolation (ASE calculator)."""


class FieldFromFileWarning(UserWarning):
    """A non-zero electric field was taken from a structure's ``info`` (a data file's key), not given by the
    caller: said once per key, with the key and the magnitude (ASE calculator)."""


class ExtrapolationError(RuntimeError):
    """Raised instead of :class:`ExtrapolationWarning` by a calculator told ``extrapolation="raise"``.

    Attributes: ``grade`` (the structure's largest grade, dimensionless) and
    ``atom`` (the index of the atom that has it; -1 when no grade was served).
    """

    def __init__(self, message: str, *, grade: float = float("nan"), atom: int = -1):
        super().__init__(message)
        self.grade = grade
        self.atom = atom


#: status codes :meth:`Client.wait_ready` keeps waiting through (the server is not up or not warm yet)
NOT_READY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def not_ready(target: str, timeout: float, attempts: int, err: grpc.RpcError) -> ServerUnavailable:
    """The error of a :meth:`Client.wait_ready` that ran out of time."""
    details = err.details() or err.code().name
    return ServerUnavailable(f"MACE-Field server at {target} not ready after {timeout:g} s ({attempts} attempts): "
                             f"{details}", target=target, code=err.code(), details=err.details() or "")


def error_from_rpc(err: grpc.RpcError, target: str, *, attempts: int = 1) -> MACEFieldError:
    """Map a gRPC error to one of the exceptions above."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
        return ServerUnavailable(
            f"MACE-Field server at {target} is unavailable{tries}: {details or 'no connection'}",
            target=target, code=code, details=details,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"{details} (server {target})", target=target, code=code, details=details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimeout(f"MACE-Field server at {target}: deadline exceeded ({details})",
                              target=target, code=code, details=details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"MACE-Field server at {target} refused the credentials: {details}",
                                   target=target, code=code, details=details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"MACE-Field server at {target}: {details}", target=target, code=code, details=details)
    name = code.name if code is not None else "error"
    return MACEFieldError(f"MACE-Field server at {target}: {name}: {details}", target=target, code=code,
                          details=details)


__all__ = [
    "NOT_READY_CODES",
    "AuthenticationError",
    "ExtrapolationError",
    "ExtrapolationWarning",
    "FieldFromFileWarning",
    "InvalidRequest",
    "MACEFieldError",
    "RequestTimeout",
    "ResourceExhausted",
    "ServerUnavailable",
    "error_from_rpc",
    "not_ready",
]
