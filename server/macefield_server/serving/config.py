"""Server configuration: typed dataclasses, read from YAML or TOML and the command line.

Example (YAML; the TOML layout is the same)::

    host: 0.0.0.0
    port: 50051
    metrics_port: 9100          # 0: pick a free port, -1: no metrics endpoint
    health_port: -1             # plaintext grpc.health.v1 only (Kubernetes gRPC probes on a TLS server); -1: off
    grace_s: 30                 # SIGTERM: finish in-flight work within this many seconds
    max_connection_age_s: 0     # GOAWAY to each client connection after this long (clients reconnect and
    max_connection_age_grace_s: 0   # re-resolve, spreading over new replicas); then calls get this long; 0: never
    liveness_timeout_s: 0       # health "liveness" NOT_SERVING when queued work sees no batch finish this long; 0: off
    backend: auto               # backend of models that name none (and of the embedded default model)
    tune_cpu_allocator: true    # glibc keeps freed large blocks: 5-16 % less CPU on large passes, RSS stays at peak
    cache_dir: auto             # keeps warm-up memory measurements between starts; "": none (docs/serving.md)
    models:
      - name: sio2
        path: models/sio2.pt
        dtype: float64          # float64 | float32 (default: as stored)
        device: cpu             # cpu | cuda | cuda:1
        backend: auto           # e3nn | cueq | auto (cueq on CUDA when cuEquivariance's kernels import)
        default_head: sio2
        trust_pickle: false     # pickled .model files run code when loaded
    batching:
      max_structures: 64        # structures per batch
      max_atoms: auto           # atoms per batch (auto: 1024 on CPU, 8192 on CUDA)
      max_edges: auto           # directed edges per batch (auto: 4000 on CPU, 400000 on CUDA)
      max_wait_ms: 5            # oldest request waits at most this long for company
      max_queue: 1024           # queued structures per model; beyond it RESOURCE_EXHAUSTED
      max_queue_atoms: 1000000  # queued atoms per model; beyond it RESOURCE_EXHAUSTED
      prep_workers: 2           # workers building neighbour lists (and threads validating large requests)
      prep_mode: auto           # auto | process | thread: neighbour lists in worker processes or server threads
      neighbour_backend: vesin  # vesin | matscipy: the host neighbour-list library (identical lists)
      neighbour_search: auto    # auto | host | device: where lists are built (auto: on the model's GPU)
    limits:
      max_atoms_per_structure: 5000
      max_field: 1.0            # |E| in V/Angstrom
      max_structures_per_request: 1024
      max_edges_per_structure: 2000000   # neighbour pairs, counted before the list is built
      max_message_bytes: 67108864        # gRPC message size, each direction (64 MiB)
      max_concurrent_streams: 100        # concurrent RPCs per client connection (HTTP/2 streams)
      max_extent: 1000                   # Angstrom: longest cell vector / widest spread of a molecule
      min_distance: 0.5                  # Angstrom: atoms closer than this are refused (0: no check)
      memory_budget: auto                # bytes per device (e.g. 12GiB); auto: half the RAM / 80 % of the GPU
    security:                   # see docs/serving.md, "Security"
      tls_cert: server.pem      # PEM certificate chain; with tls_key: TLS on the gRPC port
      tls_key: server.key
      tls_client_ca: ca.pem     # require client certificates signed by this CA (mutual TLS)
      auth_token_file: tokens   # bearer tokens, one per line (and/or $MACEFIELD_AUTH_TOKENS)
      insecure: false           # allow plaintext on a non-loopback host (0.0.0.0, ::, a LAN IP)

With no model listed the embedded default model is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..batch_limits import auto_limits
from ..config_files import ConfigError, build, read_mapping



#: model backends (macefield_server.engine.cueq.BACKENDS; not imported here: config loads without torch)
BACKENDS = ("e3nn", "cueq", "auto")
#: host neighbour-list libraries (macefield_server.engine.graph.NEIGHBOUR_BACKENDS)
NEIGHBOUR_BACKENDS = ("vesin", "matscipy")
#: where neighbour lists are built: "host" (prep pool, at admission), "device" (per batch, on the model's
#: device after one copy of the geometry), "auto" (device for models on a CUDA device, else host)
NEIGHBOUR_SEARCH = ("auto", "host", "device")
#: where host neighbour lists are built: worker processes (:mod:`.prep_pool`) or threads of the server process
PREP_MODES = ("auto", "process", "thread")


@dataclass
class ModelConfig:
    """One served model."""

    path: Optional[str] = None  #: checkpoint file (None only for the built-in default)
    name: Optional[str] = None  #: name clients use (default: the file stem)
    dtype: Optional[str] = None  #: "float64" / "float32" (None: as stored)
    device: str = "cpu"  #: torch device
    default_head: Optional[str] = None  #: head used when a request names none (None: first head)
    trust_pickle: bool = False  #: allow pickled checkpoints (runs code from the file)
    #: "e3nn" | "cueq" | "auto" (None: the server's ``backend``); see macefield_server.engine.cueq
    backend: Optional[str] = None


#: the longest duration option in seconds (max_connection_age_s, ...): gRPC takes int32 milliseconds
MAX_DURATION_S = 2_147_483


@dataclass
class BatchingConfig:
    """Dynamic batching limits; a batch closes at whichever is reached first."""

    max_structures: int = 64
    max_atoms: Optional[int] = None  #: None / "auto": see :data:`macefield_server.batch_limits.AUTO_LIMITS`
    max_edges: Optional[int] = None  #: None / "auto": see :data:`macefield_server.batch_limits.AUTO_LIMITS`
    max_wait_ms: float = 5.0  #: ms the oldest queued request waits for more to join
    max_queue: int = 1024  #: queued (not yet batched) structures per model
    max_queue_atoms: int = 1_000_000  #: queued atoms per model (bounds the memory of queued neighbour lists)
    stream_window: int = 64  #: pipelined requests in flight per PredictStream call
    #: workers of the prep pool (neighbour lists; collation and validation of requests over 1000 atoms run on
    #: threads of the server process)
    prep_workers: int = 2
    #: "auto" | "process" | "thread" (:data:`PREP_MODES`): where the host neighbour lists are built: worker
    #: processes (parallel; the numpy around vesin's search holds the GIL of a thread) or threads of the server
    #: process.  "auto": processes when a model on a GPU gets host-built lists (the host then sets the pace),
    #: threads when every model with host lists runs on the CPU (its passes take the cores, and processes gain
    #: little there: docs/serving.md, "Host path")
    prep_mode: str = "auto"
    neighbour_backend: str = "vesin"  #: host neighbour-list library: "vesin" | "matscipy" (identical lists)
    #: where the lists are built: "auto" | "host" | "device" (:data:`NEIGHBOUR_SEARCH`)
    neighbour_search: str = "auto"

    def search_on_device(self, device_type: str) -> bool:
        """Whether a model on ``device_type`` ("cpu", "cuda") gets its neighbour lists built on its device."""
        if self.neighbour_search == "auto":
            return device_type == "cuda"
        return self.neighbour_search == "device"

    def prep_in_processes(self, host_list_devices: "list[str]") -> bool:
        """Whether the prep pool is worker processes, given the device types ("cpu", "cuda") of the models whose
        neighbour lists are built on the host (empty: no pool is needed)."""
        if not host_list_devices or self.prep_mode == "thread":
            return False
        return self.prep_mode == "process" or any(d != "cpu" for d in host_list_devices)

    def limits_for(self, device_type: str) -> Tuple[int, int]:
        """(max_atoms, max_edges) per batch for a model on ``device_type`` ("cpu", "cuda", ...)."""
        auto_atoms, auto_edges = auto_limits(device_type)
        return (int(self.max_atoms) if self.max_atoms else auto_atoms,
                int(self.max_edges) if self.max_edges else auto_edges)


@dataclass
class LimitsConfig:
    """What a single request may ask for."""

    max_atoms_per_structure: int = 5000
    max_field: float = 1.0  #: largest |E| accepted, V/Angstrom
    max_structures_per_request: int = 1024  #: PredictBatch size limit
    max_edges_per_structure: int = 2_000_000  #: refuse collapsed / absurdly dense inputs
    max_message_bytes: int = 64 * 1024 * 1024  #: largest gRPC message received or sent (RESOURCE_EXHAUSTED beyond)
    max_concurrent_streams: int = 100  #: concurrent RPCs per connection (grpc.max_concurrent_streams)
    max_extent: float = 1000.0  #: Angstrom: longest periodic cell vector, widest spread along non-periodic directions
    min_distance: float = 0.5  #: Angstrom: refuse atoms closer than this (0: no check); far below any bond
    #: bytes per device ("12GiB", "500MB", a number) or "auto"/None: half the machine's memory (CPU), 80 % of
    #: the GPU's; 75 % for engine passes, 25 % for the neighbour lists of admitted structures (memory.py)
    memory_budget: Optional[Union[int, float, str]] = None


@dataclass
class SecurityConfig:
    """TLS, mutual TLS and bearer tokens for the gRPC port (docs/serving.md, "Security")."""

    tls_cert: Optional[str] = None  #: PEM certificate (chain) of the server
    tls_key: Optional[str] = None  #: PEM private key of tls_cert
    tls_client_ca: Optional[str] = None  #: PEM CA: require client certificates it signed (mutual TLS)
    auth_token_file: Optional[str] = None  #: bearer tokens, one per line (blank lines, # comments ignored)
    insecure: bool = False  #: allow plaintext on a non-loopback host

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  #: 0: any free port (the chosen one is logged)
    metrics_port: int = 9100  #: 0: any free port, -1: no metrics endpoint
    metrics_host: Optional[str] = None  #: address of /metrics (None: the same as host)
    #: plaintext port serving only grpc.health.v1, on ``host`` (-1: none; 0: any free port): for
    #: Kubernetes gRPC probes, which cannot speak TLS, when the gRPC port has TLS
    health_port: int = -1
    grace_s: float = 30.0  #: SIGTERM drain period, seconds
    #: seconds after which the server sends each client connection GOAWAY (0: never), so that clients
    #: reconnect and re-resolve a DNS name (and spread over replicas added since); +-10 % jitter (gRPC's)
    max_connection_age_s: float = 0.0
    #: seconds calls still open on such a connection may run before it is closed (0: no limit); an
    #: MD session cut then resends its step on a new connection
    max_connection_age_grace_s: float = 0.0
    #: seconds without a finished batch, while work is queued or computing, after which the health service
    #: ``liveness`` says NOT_SERVING (a hung compute thread, e.g. a stuck CUDA kernel: a liveness probe then
    #: restarts the replica); SERVING again when a batch finishes.  0: off (the default: on a CPU one large
    #: structure may legitimately compute for minutes); set it well above the longest batch you expect
    liveness_timeout_s: float = 0.0
    threads: int = 0  #: torch intra-op threads for compute (0: torch default)
    #: keep freed large blocks on the glibc heap (:func:`.runtime.tune_cpu_allocator`): a large engine pass on the
    #: CPU (full response, larger models) then takes 5-16 % less CPU time and no page faults (bench/allocator.py);
    #: the price is that resident memory stays at its high-water mark (peak RSS within 2 % measured).  A no-op
    #: where libc is not glibc
    tune_cpu_allocator: bool = True
    warmup_passes: int = 1  #: warm-up batches per model before health says SERVING
    #: where each model's warm-up memory measurement is kept between starts (:mod:`.memory_cache`; a restart
    #: then skips measuring): "auto" ($MACEFIELD_CACHE_DIR, else $XDG_CACHE_HOME/macefield, else
    #: ~/.cache/macefield), a directory, or "" (no cache: measure at every start)
    cache_dir: str = "auto"
    log_level: str = "INFO"
    backend: str = "auto"  #: backend of models that name none: "e3nn" | "cueq" | "auto"
    models: List[ModelConfig] = field(default_factory=list)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def validate(self) -> "ServerConfig":
        b, lim = self.batching, self.limits
        for key in ("max_atoms", "max_edges"):
            if getattr(b, key) == "auto":
                setattr(b, key, None)
        positive = {
            "batching.max_structures": b.max_structures,
            "batching.max_atoms": b.max_atoms or 1,
            "batching.max_edges": b.max_edges or 1,
            "batching.max_queue": b.max_queue,
            "batching.max_queue_atoms": b.max_queue_atoms,
            "batching.stream_window": b.stream_window,
            "batching.prep_workers": b.prep_workers,
            "limits.max_atoms_per_structure": lim.max_atoms_per_structure,
            "limits.max_structures_per_request": lim.max_structures_per_request,
            "limits.max_edges_per_structure": lim.max_edges_per_structure,
            "limits.max_message_bytes": lim.max_message_bytes,
            "limits.max_concurrent_streams": lim.max_concurrent_streams,
        }
        for key, value in positive.items():
            if int(value) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        from .memory import parse_bytes

        try:
            parse_bytes(lim.memory_budget)
        except ValueError as exc:
            raise ConfigError(f"limits.memory_budget: {exc}") from None
        if lim.min_distance < 0:
            raise ConfigError(f"limits.min_distance: must be >= 0 (0: no check), got {lim.min_distance}")
        if b.neighbour_backend not in NEIGHBOUR_BACKENDS:
            raise ConfigError(f"batching.neighbour_backend: expected one of {list(NEIGHBOUR_BACKENDS)}, "
                              f"got {b.neighbour_backend!r}")
        if b.prep_mode not in PREP_MODES:
            raise ConfigError(f"batching.prep_mode: expected one of {list(PREP_MODES)}, got {b.prep_mode!r}")
        if b.neighbour_search not in NEIGHBOUR_SEARCH:
            raise ConfigError(f"batching.neighbour_search: expected one of {list(NEIGHBOUR_SEARCH)}, "
                              f"got {b.neighbour_search!r}")
        if b.max_wait_ms < 0:
            raise ConfigError(f"batching.max_wait_ms: must be >= 0, got {b.max_wait_ms}")
        if not lim.max_extent > 0:
            raise ConfigError(f"limits.max_extent: must be > 0 Angstrom, got {lim.max_extent}")
        if lim.max_field <= 0:
            raise ConfigError(f"limits.max_field: must be > 0 V/A, got {lim.max_field}")
        if not isinstance(self.cache_dir, str):
            raise ConfigError(f"cache_dir: expected 'auto', a directory or '' (no cache), got {self.cache_dir!r}")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: must be >= 0, got {self.grace_s}")
        for key in ("max_connection_age_s", "max_connection_age_grace_s", "liveness_timeout_s"):
            value = getattr(self, key)
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None
            # gRPC takes the ages as int32 milliseconds: at most 2147483 s (24.8 days)
            if not 0 <= seconds <= MAX_DURATION_S:
                raise ConfigError(f"{key}: must be between 0 (off) and {MAX_DURATION_S} seconds, got {value}")
        for key in ("port", "metrics_port", "health_port"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value > 65535:
                raise ConfigError(f"{key}: expected a port number (0-65535), got {value!r}")
        if self.port < 0:
            raise ConfigError(f"port: 0 (any free port) or a port, got {self.port}")
        for key in ("metrics_port", "health_port"):
            if getattr(self, key) < -1:
                raise ConfigError(f"{key}: -1 (off), 0 (any free port) or a port, got {getattr(self, key)}")
        if self.health_port > 0:
            for key in ("port", "metrics_port"):
                if getattr(self, key) == self.health_port and (key == "port" or self._metrics_shares_host()):
                    raise ConfigError(f"health_port: {self.health_port} is also {key}; give the health listener "
                                      "a port of its own")
        if self.metrics_port > 0 and self.metrics_port == self.port and self._metrics_shares_host():
            raise ConfigError(f"metrics_port: {self.metrics_port} is also port; give /metrics a port of its own")
        names = [m.name for m in self.models if m.name]
        if len(names) != len(set(names)):
            raise ConfigError(f"models: duplicate model names {names}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")
        for i, m in enumerate(self.models):
            if not m.path:
                raise ConfigError(f"models[{i}].path: required")
            if m.backend not in (None,) + BACKENDS:
                raise ConfigError(f"models[{i}].backend: expected one of {list(BACKENDS)}, got {m.backend!r}")
            if m.dtype not in (None, "float32", "float64"):
                raise ConfigError(f"models[{i}].dtype: expected float32 or float64, got {m.dtype!r}")
        self._validate_security()
        return self

    def _metrics_shares_host(self) -> bool:
        return not self.metrics_host or self.metrics_host == self.host

    def _validate_security(self) -> None:
        sec = self.security
        if bool(sec.tls_cert) != bool(sec.tls_key):
            missing = "security.tls_key" if sec.tls_cert else "security.tls_cert"
            raise ConfigError(f"{missing}: required with {'security.tls_cert' if sec.tls_cert else 'security.tls_key'}")
        if sec.tls_client_ca and not sec.tls_cert:
            raise ConfigError("security.tls_client_ca: mutual TLS needs security.tls_cert and security.tls_key")
        if not isinstance(sec.insecure, bool):
            raise ConfigError(f"security.insecure: expected true or false, got {sec.insecure!r}")
        for key in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            value = getattr(sec, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"security.{key}: no such file: {value}")
        if sec.auth_token_file:
            from .security import parse_tokens

            if not parse_tokens(Path(sec.auth_token_file).read_text()):
                raise ConfigError(f"security.auth_token_file: no token in {sec.auth_token_file}")

    def check_exposure(self) -> Optional[str]:
        """Refuse plaintext on a non-loopback host unless ``security.insecure``; returns a warning to log, if any."""
        from .security import is_loopback

        if self.security.tls or is_loopback(self.host):
            return None
        if not self.security.insecure:
            raise ConfigError(
                f"host: {self.host!r} is not a loopback address and TLS is off: set security.tls_cert and "
                "security.tls_key (--tls-cert/--tls-key), or allow plaintext explicitly with security.insecure "
                "(--insecure), e.g. inside a container behind a private network")
        return (f"serving plaintext gRPC on non-loopback host {self.host!r} (insecure: true): traffic and bearer "
                "tokens can be read by anyone on the network path")


def _models(value: Any, where: str) -> List[ModelConfig]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list")
    return [build(ModelConfig, v, f"{where}[{i}]") for i, v in enumerate(value)]


#: how the sections of a server config are built
_SECTIONS = {"models": _models,
             "batching": lambda v, w: build(BatchingConfig, v, w),
             "limits": lambda v, w: build(LimitsConfig, v, w),
             "security": lambda v, w: build(SecurityConfig, v, w)}


def load_config(path: Optional[str | Path] = None, overrides: Optional[Dict[str, Any]] = None) -> ServerConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file, apply top-level ``overrides``, validate."""
    data = read_mapping(path) if path is not None else {}
    config = build(ServerConfig, data, "", _SECTIONS)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(config, key, value)
    return config.validate()
