"""Server lifecycle: bind, load and warm models, report health, drain on shutdown.

::

    server = MaceFieldServer(config)          # or MaceFieldServer(config, models=[ServedModel, ...])
    await server.start()                      # gRPC + /metrics listening; health NOT_SERVING
    await server.load()                       # models loaded, one warm-up batch each; health SERVING
    ...
    await server.stop()                       # health NOT_SERVING, refuse new work, finish in-flight

Health (grpc.health.v1) is reported for the overall server ("") and for
``macefield.v1.MaceField``: NOT_SERVING while models load and while draining
(clients and proxies stop sending new calls), SERVING otherwise; ``liveness``
is SERVING from start to exit (a probe that must not fail during a drain),
except, with ``liveness_timeout_s``, while work has waited that long without
a batch finishing (a hung compute thread).
``health_port`` adds a plaintext listener with only the health service
(Kubernetes gRPC probes cannot speak TLS).  Server reflection is on.

Stopping sends every client connection an HTTP/2 GOAWAY at once (grpc's
server shutdown) and closes the listening socket: clients move to other
replicas while in-flight calls finish.  ``max_connection_age_s`` sends GOAWAY
periodically so that clients re-resolve and spread over new replicas.

TLS, mutual TLS and bearer tokens: ``config.security`` (security.py); health
answers without a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from macefield_client.contract import GRADE_OUTPUTS
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb

from ..testing.faults import InjectedFault
from .backend import Backend
from .batcher import Batcher, WorkItem
from .engine_backend import EngineBackend
from .config import ServerConfig
from .dispatcher import Dispatcher
from . import memory_cache
from .memory import Budget, MemoryModel, fmt, parse_bytes
from .memory_measure import default_budget
from .memory_measure import measure as measure_memory
from .metrics import Metrics
from .prep_pool import ProcessPrep
from ..engine.graph import Structure, neighbour_list, set_neighbour_backend
from ..engine.response import ENGINE_OUTPUTS, response_tier
from .registry import ModelRegistry, ServedModel
from .runtime import tune_cpu_allocator
from .service import MaceFieldService
from .wire import add_servicer
from .security import TokenAuthInterceptor, load_tokens, server_credentials

log = logging.getLogger("macefield.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MaceField"].full_name
#: health service name that is SERVING from start to exit (liveness probes: a drain is not a failure), and
#: NOT_SERVING while the compute is stuck (``liveness_timeout_s``)
LIVENESS_SERVICE = "liveness"
#: gRPC sets SO_REUSEPORT by default: a second server on the same port would bind too and the kernel would
#: split new connections between the two (a replica started while the old one drains, health_port == port)
NO_REUSEPORT = ("grpc.so_reuseport", 0)


def warmup_structure(served: ServedModel) -> Structure:
    """A small periodic cluster of the model's elements (one warm-up batch)."""
    zs = sorted(served.atomic_numbers)
    rng = np.random.default_rng(0)
    n = 8
    side = 5.0
    positions = rng.uniform(0.0, side, size=(n, 3))
    numbers = np.array([zs[i % len(zs)] for i in range(n)], dtype=np.int64)
    return Structure(numbers, positions, np.eye(3) * side, np.ones(3, dtype=bool), np.array([0.01, 0.0, 0.0]),
                     served.default_head)


class MaceFieldServer:
    def __init__(
        self,
        config: ServerConfig,
        models: Optional[List[ServedModel]] = None,
        *,
        backend_factory: Callable[[ServedModel, Metrics], Backend] = EngineBackend,
    ):
        self.config = config.validate()
        self._given_models = models
        self.backend_factory = backend_factory
        self.fault = InjectedFault.from_env()  # $MACEFIELD_TEST_FAULT: test-only, off when unset
        self.metrics = Metrics()
        self.service = MaceFieldService(config, self.metrics)
        self.health = health.aio.HealthServicer()
        set_neighbour_backend(config.batching.neighbour_backend)
        self.prep_executor = ThreadPoolExecutor(max_workers=config.batching.prep_workers, thread_name_prefix="prep")
        #: worker processes for the host neighbour lists (batching.prep_mode: process), started with the models
        self.process_prep: Optional[ProcessPrep] = None
        self.batchers: Dict[str, Batcher] = {}
        self.registry: Optional[ModelRegistry] = None
        self.server: Optional[grpc.aio.Server] = None
        self.health_server: Optional[grpc.aio.Server] = None
        self.port: Optional[int] = None
        self.health_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.ready = asyncio.Event()
        self._closed = False
        self._watchdog: Optional[asyncio.Task] = None

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Listen (gRPC and /metrics); returns the gRPC port.  Health: NOT_SERVING."""
        cfg = self.config
        if cfg.tune_cpu_allocator:
            log.info("glibc allocator tuned for large short-lived blocks: %s", tune_cpu_allocator())
        warning = cfg.check_exposure()  # ConfigError: plaintext on a non-loopback host without insecure
        if warning:
            log.warning("%s", warning)
        sec = cfg.security
        tokens = load_tokens(sec.auth_token_file)
        interceptors = [TokenAuthInterceptor(tokens)] if tokens else []
        credentials = None
        if sec.tls:
            assert sec.tls_cert is not None and sec.tls_key is not None  # validate() requires the key with the cert
            credentials = server_credentials(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(cfg.metrics_host or cfg.host, cfg.metrics_port)
        options = [
            NO_REUSEPORT,
            ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_concurrent_streams", cfg.limits.max_concurrent_streams),
        ]
        if cfg.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)))
        if cfg.max_connection_age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)))
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        add_servicer(self.service, self.server)  # malformed request bytes: INVALID_ARGUMENT, not UNKNOWN
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if cfg.health_port >= 0:
            self.health_server = grpc.aio.server(options=[NO_REUSEPORT])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self._bind(self.health_server, cfg.health_port, None, "the health port")
            await self.health_server.start()
            log.info("grpc.health.v1 (plaintext, health only) on %s:%s", cfg.host, self.health_port)
        self.port = self._bind(self.server, cfg.port, credentials, "the gRPC port")
        log.info("gRPC on %s:%s (%s%s; %s)", cfg.host, self.port, "TLS" if credentials else "plaintext",
                 ", client certificates required" if sec.tls_client_ca else "",
                 f"{len(tokens)} bearer token(s) required" if tokens else "no token required")
        await self.server.start()
        return self.port

    def _bind(self, server: grpc.aio.Server, port: int, credentials, what: str) -> int:
        """Bind ``server`` to ``host:port``; OSError naming the address when that fails (in use: no
        SO_REUSEPORT, so a second server on the same port fails here instead of sharing its connections)."""
        address = f"{self.config.host}:{port}"
        try:
            bound = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            bound = 0
        if not bound:
            raise OSError(f"could not bind {what} {address} (in use by another process, or not an address of "
                          "this machine)")
        return bound

    async def load(self) -> None:
        """Load every model, run warm-up batches, then report SERVING."""
        loop = asyncio.get_running_loop()
        if self.fault is not None and self.fault.load_delay_s:
            await asyncio.sleep(self.fault.load_delay_s)  # test only: a replica that takes long to load
        if self._given_models is not None:
            self.registry = ModelRegistry(list(self._given_models))
        else:
            self.registry = await loop.run_in_executor(
                None, ModelRegistry.from_configs, self.config.models, self.config.backend
            )
        for served in self.registry:
            log.info("model %s on %s: backend %s (%s)", served.name, served.device, served.backend,
                     served.backend_reason or "as given")
            self.metrics.describe_model(served.info())
            backend = self.backend_factory(served, self.metrics)
            if isinstance(backend, EngineBackend):  # lists on the device: the batch builds them, not admission
                backend.search_on_device = self.config.batching.search_on_device(served.device.type)
                backend.limits = self.config.limits
                log.info("model %s: neighbour lists built on %s", served.name,
                         served.device if backend.search_on_device else "the host (prep pool)")
            batcher = Batcher(backend, self.config.batching, self.metrics, self.prep_executor, fault=self.fault)
            self.batchers[served.name] = batcher
            batcher.start()
        host_list_devices = [served.device.type for served in self.registry
                             if not getattr(self.batchers[served.name].backend, "search_on_device", False)]
        if self.config.batching.prep_in_processes(host_list_devices):
            self.process_prep = ProcessPrep(self.config.batching.prep_workers, self.config.batching.neighbour_backend)
            await loop.run_in_executor(None, self.process_prep.warm)
        for served in self.registry:
            await self._warm_up(served)
        graph_budget = self._assign_budgets(self.registry)
        on_device = frozenset(name for name, b in self.batchers.items()
                              if getattr(b.backend, "search_on_device", False))
        self.service.dispatcher = Dispatcher(self.registry, self.batchers, self.config.limits, self.prep_executor,
                                             graph_budget=graph_budget, device_graphs=on_device,
                                             process_prep=self.process_prep)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.liveness_timeout_s > 0:
            self._watchdog = asyncio.create_task(self._watch_liveness(self.config.liveness_timeout_s),
                                                 name="liveness-watchdog")
        self.ready.set()
        log.info("serving models %s", [m.name for m in self.registry])

    async def _warm_up(self, served: ServedModel) -> None:
        """Full-response passes on the model's compute thread (first-call costs paid before SERVING)."""
        loop = asyncio.get_running_loop()
        batcher = self.batchers[served.name]
        structure = warmup_structure(served)
        graph = await loop.run_in_executor(self.prep_executor, neighbour_list, structure, served.cutoff)
        start = time.monotonic()
        graded = served.default_head in served.extrapolation_heads
        outputs = ENGINE_OUTPUTS if graded else ENGINE_OUTPUTS - GRADE_OUTPUTS
        item = WorkItem(
            structure=structure,
            graph=graph,
            head_index=served.heads.index(served.default_head),
            outputs=outputs,
            tier=response_tier(outputs),
            request_id="warm-up",
            future=loop.create_future(),
        )
        for _ in range(max(1, self.config.warmup_passes)):
            # straight to the compute thread: collate + full response, no queue wait
            ((outcome, _, _),) = await loop.run_in_executor(batcher.compute_executor, batcher.compute_items, [item])
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"warm-up of model {served.name!r} failed: {outcome}") from outcome
        log.info("model %s warm (%.2f s)", served.name, time.monotonic() - start)
        start = time.monotonic()
        served.memory = await loop.run_in_executor(batcher.compute_executor, self._measure_memory, served)
        log.info("model %s memory per pass: %s; in %.2f s", served.name, served.memory.describe(),
                 time.monotonic() - start)

    def _measure_memory(self, served: ServedModel) -> MemoryModel:
        """The model's memory per pass: from the measurement cache (``cache_dir``) or measured and stored."""
        directory = memory_cache.resolve_cache_dir(self.config.cache_dir)
        if directory is None:
            return measure_memory(served)
        key = memory_cache.measurement_key(served)
        memory = memory_cache.load(directory, key)
        if memory is None:
            memory = measure_memory(served)
            memory_cache.store(directory, key, memory)
        return memory

    async def _watch_liveness(self, timeout: float) -> None:
        """``liveness`` NOT_SERVING while some model's work has waited ``timeout`` s without a batch finishing
        (a hung compute thread: the event loop still answers, the model does not); SERVING once one finishes."""
        alive = True
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            stalled = {name: b.stalled_for() for name, b in self.batchers.items()}
            worst = max(stalled, key=stalled.__getitem__, default=None)
            stall = stalled[worst] if worst is not None else 0.0
            now_alive = worst is None or stall <= timeout
            if now_alive == alive:
                continue
            alive = now_alive
            if alive:
                log.warning("liveness: model %s finished a batch again: liveness SERVING", worst)
            else:
                log.error("liveness: model %s has had work queued or computing for %.0f s without a batch "
                          "finishing (liveness_timeout_s %g): liveness NOT_SERVING (%s)", worst, stall,
                          timeout, self.waiting_for())
            await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING if alive
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _assign_budgets(self, registry: ModelRegistry) -> int:
        """Each model's share of its device's memory budget; returns the bytes for admitted neighbour lists."""
        configured = parse_bytes(self.config.limits.memory_budget)
        devices: Dict[str, List[ServedModel]] = {}
        for served in registry:
            devices.setdefault(str(served.device), []).append(served)
        for device, models in devices.items():
            total = configured or default_budget(models[0].device)
            budget = Budget.split(total, len(models))
            for served in models:
                served.budget = budget
            log.info("memory budget on %s: %s (%s per pass of each of %d model(s), %s for admitted neighbour "
                     "lists)%s", device, fmt(total), fmt(budget.per_pass), len(models), fmt(budget.graphs),
                     "" if configured else " (limits.memory_budget: auto)")
        host = configured if all(m.device.type == "cpu" for m in registry) and configured else None
        return Budget.split(host or default_budget(torch.device("cpu")), 1).graphs

    async def stop(self, grace: Optional[float] = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, flush queues, end idle streams, finish in-flight RPCs within
        ``grace`` s.

        Logs once a second what it is still waiting for.  :meth:`stop_now`
        (a second signal) cuts the wait short.
        """
        grace = self.config.grace_s if grace is None else grace
        self.service.begin_drain()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for batcher in self.batchers.values():
            batcher.begin_drain()
        if self.server is not None:
            reporter = asyncio.create_task(self._report_drain())
            try:
                await self.server.stop(grace)  # GOAWAY to every connection at once, listener closed
            finally:
                reporter.cancel()
        await self._stop_health_server()
        await self._close_batchers()

    async def _stop_health_server(self) -> None:
        if self.health_server is not None:
            await self.health_server.stop(None)
            self.health_server = None

    async def stop_now(self) -> None:
        """Abort every RPC at once (UNAVAILABLE/CANCELLED for its client) and stop; queued work is dropped."""
        self.service.begin_drain()
        if self.server is not None:
            await self.server.stop(None)
        await self._stop_health_server()
        await self._close_batchers(wait=False)

    def waiting_for(self) -> str:
        """What a drain still waits for.

        E.g. "2 calls (Predict 1, PredictStream 1); 3 structures queued or computing".
        """
        calls = {m: n for m, n in self.service.in_flight.items() if n}
        work = sum(b.queued + b.busy for b in self.batchers.values())
        text = f"{sum(calls.values())} call(s)"
        if calls:
            text += " (" + ", ".join(f"{m} {n}" for m, n in sorted(calls.items())) + ")"
        return text + f"; {work} structure(s)/batch(es) queued or computing"

    async def _report_drain(self) -> None:
        start = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            log.info("draining for %.0f s: waiting for %s", time.monotonic() - start, self.waiting_for())

    async def _close_batchers(self, wait: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for batcher in self.batchers.values():
            await batcher.close(wait=wait)
        await asyncio.to_thread(self.prep_executor.shutdown, wait=wait, cancel_futures=not wait)
        if self.process_prep is not None:
            await asyncio.to_thread(self.process_prep.shutdown, wait)
        self.metrics.close()

    def torch_threads(self) -> None:
        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
