"""Transport security and token authentication for the gRPC port.

* TLS: ``security.tls_cert`` / ``security.tls_key`` (PEM); with
  ``security.tls_client_ca`` the server requires client certificates signed by
  that CA (mutual TLS).
* Tokens: ``security.auth_token_file`` (one token per line; blank lines and
  ``#`` comments ignored) and/or ``$MACEFIELD_AUTH_TOKENS`` (comma-separated).
  Every RPC except the gRPC health service must carry ``authorization: Bearer
  <token>``; otherwise it ends ``UNAUTHENTICATED``.  Server reflection needs a
  token too (it is not needed by probes, and it describes the API).
* Exposure: plaintext is only allowed on loopback addresses unless
  ``security.insecure`` is set (``--insecure``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from typing import List, Optional, Sequence

import grpc

#: environment variable with comma-separated bearer tokens (added to the token file's)
TOKENS_ENV = "MACEFIELD_AUTH_TOKENS"

#: RPC method prefixes answered without a token (liveness/readiness probes)
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (with or without brackets); False for anything else
    (0.0.0.0, ::, an empty host, a LAN address or any other host name)."""
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_tokens(text: str) -> List[str]:
    """Tokens of a token file: one per line, surrounding whitespace stripped, blank lines and ``#`` lines skipped."""
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    return tokens


def load_tokens(auth_token_file: Optional[str], environ=None) -> List[str]:
    """The configured tokens: the file's and ``$MACEFIELD_AUTH_TOKENS``'s (empty: no authentication)."""
    environ = os.environ if environ is None else environ
    tokens: List[str] = []
    if auth_token_file:
        tokens += parse_tokens(Path(auth_token_file).read_text())
    tokens += [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    return tokens


def server_credentials(tls_cert: str, tls_key: str, tls_client_ca: Optional[str] = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``tls_client_ca`` client certificates are required and verified."""
    pair = (Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())
    client_ca = Path(tls_client_ca).read_bytes() if tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _digest(token: bytes) -> bytes:
    # equal-length inputs for compare_digest: the comparison leaks neither content nor length
    return hashlib.sha256(token).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` with one of ``tokens`` on every RPC but the public ones.

    The presented token is compared with *every* configured token in constant
    time (no early exit), so the timing tells neither whether nor which token matched.
    """

    def __init__(self, tokens: Sequence[str], public_prefixes: Sequence[str] = PUBLIC_PREFIXES):
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._digests = [_digest(t.encode()) for t in tokens]
        self._public = tuple(public_prefixes)

    def authorized(self, metadata) -> bool:
        presented = None
        for key, value in metadata or ():
            if key == "authorization":
                presented = value
                break
        if isinstance(presented, bytes):
            presented = presented.decode("latin-1")
        if not presented:
            return False
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = _digest(token.strip().encode())
        ok = 0
        for d in self._digests:
            ok |= hmac.compare_digest(given, d)
        return bool(ok)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._public) or self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED; say nothing more without a token
            return None
        return _refusal(handler)


_MESSAGE = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"

#: seconds a refused call waits (reading nothing) before its UNAUTHENTICATED status is sent
REFUSAL_DELAY_S = 0.05


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that ends the call UNAUTHENTICATED without reading (or parsing) its request.

    Always request-streaming, whatever the method's shape: gRPC then hands the
    handler a request iterator instead of a message it has already received
    and deserialized, so a refused request body is never read past the
    transport's flow-control window (an unauthenticated flood of 56 MB calls
    costs transport buffers, not 56 MB each).  The response side keeps the
    method's shape.
    """

    async def deny(request_iterator, context):
        # Without reading, a short wait lets a small request finish arriving (it sits in the HTTP/2 window):
        # a grpc.aio client still writing its message when the refusal's trailers come sees "INTERNAL:
        # Internal error from Core" instead of UNAUTHENTICATED.  A message larger than the window is never read.
        await asyncio.sleep(REFUSAL_DELAY_S)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def deny_streaming(request_iterator, context):
        await deny(request_iterator, context)
        yield  # pragma: no cover - never reached; makes this an async generator

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_streaming)
    return grpc.stream_unary_rpc_method_handler(deny)
