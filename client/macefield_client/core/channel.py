"""Channel construction, credentials, retry policy and the environment: shared by the sync and asyncio clients.

Environment variables (:data:`ENVIRONMENT`), read by :class:`~macefield_client.Client` and
:class:`~macefield_client.AsyncClient` for every argument that is not given (so the CLI, the ASE
calculator, the i-PI driver and the LAMMPS bridge all behave alike); an explicit argument wins:

=============================== =====================================================================
``MACEFIELD_SERVER``            target (``host:port``, a comma-separated list, ``dns:///name:port``)
``MACEFIELD_TOKEN``             bearer token
``MACEFIELD_TLS_CA``            TLS, trusting this CA file (PEM)
``MACEFIELD_TLS_CERT``          client certificate for mutual TLS (PEM file, with the key)
``MACEFIELD_TLS_KEY``           its private key (PEM file)
``MACEFIELD_TLS_SERVER_NAME``   the name the servers' certificates carry (TLS with a list of replicas)
=============================== =====================================================================
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

#: port the server listens on by default (used when a target names none)
DEFAULT_PORT = 50051
#: server address used when none is given (override with $MACEFIELD_SERVER)
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
#: per-call deadline when ``timeout=None`` (seconds)
DEFAULT_TIMEOUT = 120.0

MAX_MESSAGE = 256 * 1024 * 1024

#: the health service name a replica reports SERVING once its models are loaded and warm, NOT_SERVING
#: while it loads or drains (grpc.health.v1; the server's ``macefield.v1.MaceField``)
HEALTH_SERVICE = "macefield.v1.MaceField"

#: gRPC service config of a channel to one address: gRPC's own ``round_robin`` policy (one connection per
#: address the target resolves to, each call to the next)
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

#: gRPC service config of a channel to several replicas (an address list, a ``dns:`` name): ``round_robin``
#: plus client-side health checking: gRPC watches each replica's grpc.health.v1 status and only picks
#: replicas that say SERVING, so one that is loading or draining gets no new calls (a server without the
#: health service counts as healthy).  Not for a proxy's address: its health answer would be one random
#: replica's (give a proxy as ``host:port``, which gets :data:`SERVICE_CONFIG`).
REPLICAS_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
})

#: gRPC channel options: large messages (Born charges of big cells) and quick reconnects after a
#: server restart (gRPC's own reconnect backoff grows to 120 s); the service config is added per target
CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def names_replicas(target: str) -> bool:
    """True for a resolved target that names several replicas: an address list or a ``dns:`` name."""
    return target.startswith("dns:") or is_address_list(target)


def is_address_list(target: str) -> bool:
    """True for gRPC's static list of several addresses (``ipv4:a:port,b:port``, ``ipv6:...``)."""
    return target.startswith(("ipv4:", "ipv6:")) and "," in target


def service_config(target: str, health_check: bool | None = None) -> str:
    """The service config for a resolved target: round_robin, with client-side health checking when
    ``health_check`` is True, or when it is None and the target names several replicas
    (:func:`names_replicas`).  Give ``health_check=False`` for a proxy reached by a ``dns:`` name (its health
    answer is one replica's), ``True`` for replicas behind one plain ``host:port`` name that resolves to all
    of them (a headless Service given without ``dns:///``)."""
    if health_check is None:
        health_check = names_replicas(target)
    return REPLICAS_SERVICE_CONFIG if health_check else SERVICE_CONFIG


#: ``on_retry(target, attempt, attempts, delay_s, details)``: told before each retry sleep
#: (``attempts`` 0 while :meth:`Client.wait_ready` polls without a fixed count)
RetryHook = Callable[[str, int, int, float, str], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff for idempotent calls answered UNAVAILABLE (and when the server
    cancelled them, see :meth:`retries`).

    ``attempts`` counts the first try; ``attempts=1`` never retries.  The
    delay before retry k (k = 1, 2, ...) is ``min(max_backoff, initial_backoff
    * multiplier**(k-1))`` times a random factor in ``[1 - jitter, 1]``.  The
    defaults wait 30 to 38 s in all before giving up (:meth:`budget`): a
    restart of the server with the default model (kill -9, start, imports,
    load, warm up) measured 11-12 s on an idle 2-core x86 CPU, about twice
    that with the cores shared, and tests/test_client_restart.py measures
    such a restart and rides it out with these defaults.
    """

    attempts: int = 12
    initial_backoff: float = 0.25
    multiplier: float = 2.0
    max_backoff: float = 5.0
    jitter: float = 0.2
    retry_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("retry.attempts must be >= 1")

    def retries(self, code: grpc.StatusCode) -> bool:
        """True when a call (a unary call or a session step) that ended with ``code`` is sent again:
        ``retry_codes``, and CANCELLED, which this client's calls only get from the server side (their own
        deadline ends them DEADLINE_EXCEEDED): a server shutting down cancels the calls it had received but
        not yet handed to a handler (grpc/grpc#41785), so a replica stopping gracefully would otherwise fail
        them.  The calls are idempotent, so sending one again is safe."""
        return code in self.retry_codes or code == grpc.StatusCode.CANCELLED

    def budget(self) -> tuple[float, float]:
        """(shortest, longest) total wait in seconds before the last attempt (jitter at its extremes)."""
        base = sum(min(self.max_backoff, self.initial_backoff * self.multiplier ** k) for k in range(self.attempts - 1))
        return base * (1.0 - self.jitter), base

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (``attempts - 1`` of them)."""
        for k in range(self.attempts - 1):
            base = min(self.max_backoff, self.initial_backoff * self.multiplier ** k)
            yield base * (1.0 - self.jitter * random.random())

    @classmethod
    def coerce(cls, retry) -> RetryPolicy:
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


Target = str | Sequence[str]


def resolve_target(target: Target | None) -> str:
    """The gRPC target for ``target`` (None: ``$MACEFIELD_SERVER``, else :data:`DEFAULT_TARGET`).

    ``grpc://`` / ``http://`` prefixes are dropped; a host without a port gets
    the server's default port 50051 (gRPC would otherwise use 443):
    ``localhost`` -> ``localhost:50051``, ``::1`` or ``[::1]`` -> ``[::1]:50051``.
    Targets with a gRPC resolver scheme (``dns:``, ``ipv4:``, ``unix:``, ...)
    are passed through unchanged.

    Several replicas: a list of ``host[:port]`` or one comma-separated string
    (``"10.0.0.1,10.0.0.2:7000"``) becomes gRPC's static address list
    ``ipv4:10.0.0.1:50051,10.0.0.2:7000`` (``ipv6:`` for IPv6 literals).  Host
    names in a list are resolved here, once (every address of each name); for
    a name whose addresses change (a Kubernetes headless Service, a DNS name
    with one record per replica) give ``dns:///name:port``, which gRPC
    re-resolves when connections close.
    """
    if target is not None and not isinstance(target, str):
        addresses = [str(a).strip() for a in target]
        if not addresses:
            raise ValueError("target: an empty list of servers")
        if len(addresses) == 1:
            return resolve_target(addresses[0])
        return address_list_target(addresses)
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
    if "," in target:
        return address_list_target([a.strip() for a in target.split(",")])
    return with_default_port(target)


def address_list_target(addresses: Sequence[str]) -> str:
    """gRPC's ``ipv4:``/``ipv6:`` address-list target for several ``host[:port]`` (names resolved now)."""
    resolved: list[tuple[int, str]] = []  # (family, "ip:port" / "[ip]:port")
    for address in addresses:
        for prefix in ("grpc://", "http://"):
            if address.startswith(prefix):
                address = address[len(prefix):].rstrip("/")
        hostport = with_default_port(address)
        host, _, port = hostport.rpartition(":")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
            ips = [ip]
        except ValueError:
            infos = _lookup(host, int(port))
            ips = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
            if any(i.version == 4 for i in ips):  # a name with both families (localhost): its IPv4 addresses
                ips = [i for i in ips if i.version == 4]
        for ip in ips:
            resolved.append((ip.version, f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"))
    families = {f for f, _ in resolved}
    if len(families) > 1:
        raise ValueError("target: a list of servers mixes IPv4 and IPv6 addresses; gRPC's address lists take one "
                         "family (give a dns:///name:port target instead)")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:" + ",".join(dict.fromkeys(a for _, a in resolved))


#: seconds a host name in a list of servers may take to resolve (a firewalled DNS would hang the client)
LOOKUP_TIMEOUT = 10.0


def _lookup(host: str, port: int, timeout: float = LOOKUP_TIMEOUT):
    """``socket.getaddrinfo`` for ``host``, bounded by ``timeout`` s (the lookup runs on a daemon thread);
    ValueError naming the host when it fails or takes longer."""
    import threading

    answer: list = []

    def run():
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    thread = threading.Thread(target=run, name=f"resolve-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        raise ValueError(f"target: cannot resolve {host!r} (in a list of servers): no answer within {timeout:g} s")
    if isinstance(answer[0], BaseException):  # the lookup's error, reported as a bad target
        raise ValueError(f"target: cannot resolve {host!r} (in a list of servers): {answer[0]}")  # noqa: TRY004
    return answer[0]


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


def resolve_timeout(timeout: float | None, default: float | None = None) -> float | None:
    """None: the default; inf or <= 0: no deadline (returned as None)."""
    if timeout is None:
        timeout = DEFAULT_TIMEOUT if default is None else default
    if timeout is None or math.isinf(timeout) or timeout <= 0:
        return None
    return float(timeout)


PemSource = str | os.PathLike | bytes | bytearray


def _pem(value: PemSource | None) -> bytes | None:
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

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: cert and key go together (both or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca), private_key=_pem(self.key),
                                            certificate_chain=_pem(self.cert))


def channel_credentials(tls) -> grpc.ChannelCredentials | None:
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


#: the environment variables a client reads for the arguments it is not given (see the module doc)
ENVIRONMENT = {
    "MACEFIELD_SERVER": "target",
    "MACEFIELD_TOKEN": "token",
    "MACEFIELD_TLS_CA": "tls (CA file)",
    "MACEFIELD_TLS_CERT": "tls (client certificate file)",
    "MACEFIELD_TLS_KEY": "tls (client key file)",
    "MACEFIELD_TLS_SERVER_NAME": "tls_server_name",
}


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_tls() -> TLSConfig | None:
    """The TLS settings of ``$MACEFIELD_TLS_CA`` / ``$MACEFIELD_TLS_CERT`` / ``$MACEFIELD_TLS_KEY``; None when
    none is set.  A ValueError names the variable whose file is missing (or a certificate without its key)."""
    paths = {name: _env(name) for name in ("MACEFIELD_TLS_CA", "MACEFIELD_TLS_CERT", "MACEFIELD_TLS_KEY")}
    if not any(paths.values()):
        return None
    for name, path in paths.items():
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"${name}: file not found: {path}")
    if (paths["MACEFIELD_TLS_CERT"] is None) != (paths["MACEFIELD_TLS_KEY"] is None):
        raise ValueError("$MACEFIELD_TLS_CERT and $MACEFIELD_TLS_KEY go together (both or neither)")
    return TLSConfig(ca=paths["MACEFIELD_TLS_CA"], cert=paths["MACEFIELD_TLS_CERT"], key=paths["MACEFIELD_TLS_KEY"])


def resolve_tls(tls):
    """``tls`` when given (False: plaintext), else :func:`env_tls` (None: plaintext)."""
    return env_tls() if tls is None else tls


def resolve_token(token: str | None) -> str | None:
    """``token`` when given ("" : none), else ``$MACEFIELD_TOKEN``."""
    return _env("MACEFIELD_TOKEN") if token is None else token


def resolve_server_name(name: str | None) -> str | None:
    """``name`` when given, else ``$MACEFIELD_TLS_SERVER_NAME``."""
    return _env("MACEFIELD_TLS_SERVER_NAME") if name is None else name


def call_metadata(token: str | None) -> Sequence[tuple[str, str]] | None:
    """The bearer token as ``authorization`` metadata (works on plaintext and TLS channels)."""
    if not token:
        return None
    return (("authorization", f"Bearer {token}"),)


def make_channel(target: str, tls, options=None, *, aio: bool = False, tls_server_name: str | None = None,
                 health_check: bool | None = None):
    """A channel with :data:`CHANNEL_OPTIONS` and :func:`service_config`; ``options`` add to them or replace
    them (same name: ``("grpc.service_config", ...)`` replaces the balancing and health-check config).

    ``tls_server_name``: the name every replica's certificate is checked against (and the ``:authority`` of
    each call), given as ``grpc.default_authority``.  A TLS channel to an address list needs it: gRPC would
    check the whole list (``10.0.0.1:50051,10.0.0.2:50051``) as the host name, which no certificate matches.
    """
    given = list(options or [])
    names = {name for name, _ in given}
    ours = CHANNEL_OPTIONS + [("grpc.service_config", service_config(target, health_check))]
    creds = channel_credentials(tls)
    if tls_server_name:
        ours.append(("grpc.default_authority", tls_server_name))
    elif creds is not None and is_address_list(target) and not names & {"grpc.default_authority",
                                                                        "grpc.ssl_target_name_override"}:
        raise ValueError(
            f"tls_server_name: a TLS channel to a list of servers ({target}) needs the name their certificates "
            "carry (tls_server_name=..., CLI --tls-server-name, $MACEFIELD_TLS_SERVER_NAME): gRPC would check "
            "the whole list as the host name.  Or give one dns:///name:port target whose certificates carry "
            "that name (docs/scaling.md, TLS with several replicas)")
    opts = [(k, v) for k, v in ours if k not in names] + given
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(target, options=opts)
    return mod.secure_channel(target, creds, options=opts)
