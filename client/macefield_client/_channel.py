"""Channel construction, credentials, retry policy: shared by the sync and asyncio clients."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

#: port the server listens on by default (used when a target names none)
DEFAULT_PORT = 50051
#: server address used when none is given (override with $MACEFIELD_SERVER)
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
#: per-call deadline when ``timeout=None`` (seconds)
DEFAULT_TIMEOUT = 120.0

MAX_MESSAGE = 256 * 1024 * 1024

#: gRPC channel options: large messages (Born charges of big cells) and quick
#: reconnects after a server restart (gRPC's own reconnect backoff grows to 120 s)
CHANNEL_OPTIONS: List[Tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


#: ``on_retry(target, attempt, attempts, delay_s, details)``: told before each retry sleep
#: (``attempts`` 0 while :meth:`Client.wait_ready` polls without a fixed count)
RetryHook = Callable[[str, int, int, float, str], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff for idempotent calls answered UNAVAILABLE.

    ``attempts`` counts the first try; ``attempts=1`` never retries.  The
    delay before retry k (k = 1, 2, ...) is ``min(max_backoff, initial_backoff
    * multiplier**(k-1))`` times a random factor in ``[1 - jitter, 1]``.  The
    defaults wait 22 to 28 s in all before giving up (:meth:`budget`): a
    restart of the server with the default model (kill -9, start, load, warm
    up) measured 6-8 s on a 2-core machine, and tests/test_client_restart.py
    measures such a restart and rides it out with these defaults.
    """

    attempts: int = 10
    initial_backoff: float = 0.25
    multiplier: float = 2.0
    max_backoff: float = 5.0
    jitter: float = 0.2
    retry_codes: Tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("retry.attempts must be >= 1")

    def budget(self) -> Tuple[float, float]:
        """(shortest, longest) total wait in seconds before the last attempt (jitter at its extremes)."""
        base = sum(min(self.max_backoff, self.initial_backoff * self.multiplier ** k) for k in range(self.attempts - 1))
        return base * (1.0 - self.jitter), base

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (``attempts - 1`` of them)."""
        for k in range(self.attempts - 1):
            base = min(self.max_backoff, self.initial_backoff * self.multiplier ** k)
            yield base * (1.0 - self.jitter * random.random())

    @classmethod
    def coerce(cls, retry) -> "RetryPolicy":
        if retry is None:
            return cls()
        if isinstance(retry, RetryPolicy):
            return retry
        if isinstance(retry, bool):
            return cls() if retry else cls(attempts=1)
        if isinstance(retry, int):
            return cls(attempts=retry + 1)  # an int is the number of retries
        raise TypeError(f"retry: expected RetryPolicy, int (retries) or bool, got {type(retry).__name__}")


#: gRPC name-resolver schemes: targets with one of these are used as given
URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def resolve_target(target: Optional[str]) -> str:
    """The gRPC target for ``target`` (None: ``$MACEFIELD_SERVER``, else :data:`DEFAULT_TARGET`).

    ``grpc://`` / ``http://`` prefixes are dropped; a host without a port gets
    the server's default port 50051 (gRPC would otherwise use 443):
    ``localhost`` -> ``localhost:50051``, ``::1`` or ``[::1]`` -> ``[::1]:50051``.
    Targets with a gRPC resolver scheme (``dns:``, ``ipv4:``, ``unix:``, ...)
    are passed through unchanged.
    """
    target = (target or os.environ.get("MACEFIELD_SERVER") or DEFAULT_TARGET).strip()
    for prefix in ("grpcs://", "https://"):
        if target.startswith(prefix):
            raise ValueError(f"target: {target!r}: {prefix} means TLS; give host:port and tls=True "
                             "(CLI: --tls or --tls-ca CA.pem)")
    for prefix in ("grpc://", "http://"):
        if target.startswith(prefix):
            target = target[len(prefix):].rstrip("/")
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        scheme, _, rest = target.partition(":")
        if scheme == "dns":  # dns:[//authority/]host[:port]
            authority, slash, host = rest.rpartition("/")
            return f"dns:{authority}{slash}{with_default_port(host)}"
        return f"{scheme}:" + ",".join(with_default_port(a) for a in rest.split(","))
    if target.startswith(URI_SCHEMES):
        return target
    return with_default_port(target)


def with_default_port(address: str, port: int = DEFAULT_PORT) -> str:
    """``host:port`` for ``address``, adding ``port`` when it has none (IPv6 literals bracketed)."""
    if not address or address.endswith(":") and address.count(":") == 1:
        raise ValueError(f"target: {address!r} has no host or an empty port")
    if address.startswith("["):  # [v6] or [v6]:port
        return address if "]:" in address else f"{address}:{port}"
    if address.count(":") > 1:  # a bare IPv6 literal has no port
        return f"[{address}]:{port}"
    if ":" in address:
        return address
    return f"{address}:{port}"


def resolve_timeout(timeout: Optional[float], default: Optional[float] = None) -> Optional[float]:
    """None: the default; inf or <= 0: no deadline (returned as None)."""
    if timeout is None:
        timeout = DEFAULT_TIMEOUT if default is None else default
    if timeout is None or math.isinf(timeout) or timeout <= 0:
        return None
    return float(timeout)


PemSource = Union[str, os.PathLike, bytes, bytearray]


def _pem(value: Optional[PemSource]) -> Optional[bytes]:
    """PEM bytes given as bytes or as a file path."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return Path(value).read_bytes()


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of a client: which CA to trust and, for mutual TLS, the client's certificate and key.

    Each of ``ca``, ``cert`` and ``key`` is a PEM file path or PEM bytes.
    ``ca=None`` trusts the system roots.  ``cert`` and ``key`` go together
    (servers started with ``--tls-client-ca`` require them).
    """

    ca: Optional[PemSource] = None
    cert: Optional[PemSource] = None
    key: Optional[PemSource] = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: cert and key go together (both or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca), private_key=_pem(self.key),
                                            certificate_chain=_pem(self.cert))


def channel_credentials(tls) -> Optional[grpc.ChannelCredentials]:
    """None/False: plaintext.  True: TLS with the system roots.  A path or PEM bytes: TLS trusting that CA.
    A :class:`TLSConfig`: CA and client certificate (mutual TLS).  A ``grpc.ChannelCredentials``: used as is."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, TLSConfig):
        return tls.credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, (bytes, bytearray, str, os.PathLike)):
        return TLSConfig(ca=tls).credentials()
    raise TypeError("tls: expected None, bool, a CA file path, PEM bytes, TLSConfig or grpc.ChannelCredentials, "
                    f"got {type(tls).__name__}")


def call_metadata(token: Optional[str]) -> Optional[Sequence[Tuple[str, str]]]:
    """The bearer token as ``authorization`` metadata (works on plaintext and TLS channels)."""
    if not token:
        return None
    return (("authorization", f"Bearer {token}"),)


def make_channel(target: str, tls, options=None, *, aio: bool = False):
    opts = list(CHANNEL_OPTIONS) + list(options or [])
    creds = channel_credentials(tls)
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(target, options=opts)
    return mod.secure_channel(target, creds, options=opts)
