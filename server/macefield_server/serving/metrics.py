"""Prometheus metrics of one server (own registry, served over HTTP at /metrics).

Names (all prefixed ``macefield_``): requests_total{method,model,code},
request_seconds{method} (total latency), queue_wait_seconds{model},
compute_seconds{model}, batch_structures{model}, batch_atoms{model},
queue_depth{model}, in_flight{method}, oom_splits_total{model},
dropped_total{model,reason} (deadline / cancelled: never computed),
non_finite_total{model} (structures refused INTERNAL: the model gave NaN/inf),
stream_messages_total{event} (PredictStream messages read / answered / failed / cancelled unanswered),
extrapolation_grade{model,head} (per-structure maximum extrapolation grade of
every answered result that carries one; > 1: extrapolating; values above
1e6, including +inf for an element without reference atoms, count as 1e6),
field_extrapolation{model,head} (per-structure field range |E| / E_ref of the same
results; > 1: the field displaces ions beyond the reference frames' thermal spread),
model_info{name,...,backend,...}, gpu_memory_bytes{device} (CUDA only).
"""

from __future__ import annotations

from typing import Optional
from wsgiref.simple_server import WSGIServer

from macefield_client.contract import ModelInfo
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STRUCTURE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_ATOM_BUCKETS = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
#: extrapolation grade: <= 1 inside the reference region; measured on the default model, held-out MD
#: frames reach ~2, a 15% compressed quartz 1.7, broken structures 5-34, random 0.2-0.5 A displacements 4-10 (mean)
_GRADE_BUCKETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0, 10000.0)
#: field range |E| / E_ref: 0 at zero field; the default model reaches 1 at 0.19 V/A (BaTiO3) and 0.66 V/A (SiO2)
_FIELD_RANGE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: largest grade a histogram observation records (keeps the _sum finite)
GRADE_CAP = 1e6


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "macefield_requests", "Finished RPCs by method, model and status code", ["method", "model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "macefield_request_seconds", "Total RPC latency, s", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "macefield_queue_wait_seconds", "Admission to batch compute start, s", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "macefield_compute_seconds", "Model compute time per batch, s", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_structures = Histogram(
            "macefield_batch_structures", "Structures per computed batch", ["model"], buckets=_STRUCTURE_BUCKETS,
            registry=r,
        )
        self.batch_atoms = Histogram(
            "macefield_batch_atoms", "Atoms per computed batch", ["model"], buckets=_ATOM_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("macefield_queue_depth", "Queued structures not yet batched", ["model"], registry=r)
        self.in_flight = Gauge("macefield_in_flight", "RPCs being handled", ["method"], registry=r)
        self.oom_splits = Counter(
            "macefield_oom_splits", "Batches split after running out of memory", ["model"], registry=r
        )
        self.dropped = Counter(
            "macefield_dropped", "Queued structures never computed", ["model", "reason"], registry=r
        )
        self.non_finite = Counter(
            "macefield_non_finite", "Structures whose results held NaN or inf (answered INTERNAL)", ["model"],
            registry=r,
        )
        self.stream_messages = Counter(
            "macefield_stream_messages", "PredictStream messages by what became of them", ["event"], registry=r
        )
        self.extrapolation = Histogram(
            "macefield_extrapolation_grade", "Per-structure maximum extrapolation grade (> 1: extrapolating), "
            "per model and head", ["model", "head"], buckets=_GRADE_BUCKETS, registry=r)
        self.field_extrapolation = Histogram(
            "macefield_field_extrapolation", "Per-structure field range |E| / E_ref (> 1: beyond the reference "
            "frames' thermal spread), per model and head", ["model", "head"], buckets=_FIELD_RANGE_BUCKETS, registry=r)
        self.model_info = Gauge(
            "macefield_model_info",
            "Served models (value 1)",
            ["name", "heads", "dtype", "device", "backend", "cutoff", "trained", "source"],
            registry=r,
        )
        self.gpu_memory = Gauge("macefield_gpu_memory_bytes", "CUDA memory allocated by torch", ["device"], registry=r)
        self._http: Optional[WSGIServer] = None
        self.port: Optional[int] = None

    def describe_model(self, info: ModelInfo) -> None:
        self.model_info.labels(
            name=info.name,
            heads=",".join(info.heads),
            dtype=info.dtype,
            device=info.device,
            backend=info.backend,
            cutoff=f"{info.cutoff:g}",
            trained=str(info.trained).lower(),
            source=info.source,
        ).set(1)

    def observe_extrapolation(self, model: str, head: str, grade: float) -> None:
        """One answered structure's maximum grade (capped at :data:`GRADE_CAP`)."""
        self.extrapolation.labels(model=model, head=head).observe(min(grade, GRADE_CAP))

    def observe_field_extrapolation(self, model: str, head: str, value: float) -> None:
        """One answered structure's field range (capped at :data:`GRADE_CAP`)."""
        self.field_extrapolation.labels(model=model, head=head).observe(min(value, GRADE_CAP))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint (port 0: any free port); returns the port."""
        http, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = http
        self.port = int(http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
