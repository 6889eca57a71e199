"""The ``macefield.v1.MaceField`` gRPC servicer: messages in and out, status codes, per-RPC metrics.

Status codes: INVALID_ARGUMENT (message starts with the bad field),
RESOURCE_EXHAUSTED (queue full; a structure that does not fit in memory
alone), DEADLINE_EXCEEDED, UNAVAILABLE (models still loading, or draining),
INTERNAL (the model produced NaN/inf for that structure -- never answered
OK -- or a bug: logged at warning level with the request ids).
"""

from __future__ import annotations

import asyncio
from collections import deque
import logging
import time
from typing import AsyncIterator, Deque, Dict, List, Optional, Tuple

import grpc
import numpy as np
from macefield_client.contract import Limits, list_models_response, response_from_arrays
from macefield_client.contract import Timing as WireTiming
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as pb_grpc

from .batcher import DeadlinePassed, DoesNotFit, QueueFull, Stopped, Timing
from .config import ServerConfig
from .dispatcher import Dispatcher
from .metrics import Metrics
from .prep_pool import PrepUnavailable
from ..engine.predict import NonFiniteResult
from .memory import fmt
from .validation import InvalidRequest, ParsedRequest, TooLarge, parse_request, response_bytes
from .validation import clip as _clip

log = logging.getLogger("macefield.service")


#: requests with at most this many atoms in all are validated on the event loop; larger ones on the prep thread
INLINE_PARSE_ATOMS = 1000

#: seconds after a drain begins during which open streams still read messages (those already sent)
DRAIN_SETTLE_S = 0.1


async def _settle(tasks) -> None:
    """Wait for cancelled tasks to finish and retrieve their outcomes (no "exception never retrieved")."""
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def result_to_proto(parsed: ParsedRequest, values: Dict[str, np.ndarray], timing: Timing) -> pb.PredictResponse:
    """One structure's numpy results as a PredictResponse (the contract's mapping; times in ms)."""
    return response_from_arrays(
        values, request_id=parsed.request_id, model=parsed.served.name, head=parsed.head, n_atoms=parsed.n_atoms,
        timing=WireTiming(queue_ms=timing.queue_s * 1e3, compute_ms=timing.compute_s * 1e3,
                          total_ms=timing.total_s * 1e3, batch_structures=timing.batch_structures,
                          batch_atoms=timing.batch_atoms))


def _error_for(exc: BaseException, request_ids: List[str]) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, TooLarge):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, InvalidRequest):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, (QueueFull, DoesNotFit)):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeadlinePassed):
        return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, (Stopped, PrepUnavailable)):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, NonFiniteResult):  # logged by the batcher; not a server bug
        return ServiceError(grpc.StatusCode.INTERNAL, f"non-finite result: {exc}")
    log.warning("internal error for request(s) %s: %r", [_clip(r) for r in request_ids[:16]], exc, exc_info=exc)
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class MaceFieldService(pb_grpc.MaceFieldServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.dispatcher: Optional[Dispatcher] = None  # set once models are loaded and warm
        self.draining = False
        self.in_flight: Dict[str, int] = {}  #: RPCs being handled, per method
        self._drained: Optional[asyncio.Event] = None

    def _drain_event(self) -> asyncio.Event:
        if self._drained is None:
            self._drained = asyncio.Event()
            if self.draining:
                self._drained.set()
        return self._drained

    def begin_drain(self) -> None:
        """Refuse new calls (UNAVAILABLE); open streams end once what they had sent is answered."""
        self.draining = True
        self._drain_event().set()

    def _enter(self, method: str) -> None:
        self.in_flight[method] = self.in_flight.get(method, 0) + 1
        self.metrics.in_flight.labels(method=method).inc()

    def _exit(self, method: str) -> None:
        self.in_flight[method] -= 1
        self.metrics.in_flight.labels(method=method).dec()

    # ------------------------------------------------------------- helpers
    def _deadline(self, context) -> Optional[float]:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _dispatcher(self, opened_before_drain: bool = False) -> Dispatcher:
        if self.draining and not opened_before_drain:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self.dispatcher is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is starting: models are loading")
        return self.dispatcher

    def _parse(self, request, prefix: str = "", opened_before_drain: bool = False) -> ParsedRequest:
        try:
            return parse_request(request, self._dispatcher(opened_before_drain).registry, self.config.limits)
        except InvalidRequest as exc:
            raise exc.prefixed(prefix) if prefix else exc

    def _model_label(self, request) -> str:
        if self.dispatcher is None:  # models still loading: no name to check against (never a raw user value)
            return "-"
        try:
            return self.dispatcher.registry.get(request.model).name
        except ValueError:
            return "-"

    def _finish(self, method: str, model: str, start: float, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(method=method, model=model, code=code.name).inc()
        self.metrics.request_seconds.labels(method=method).observe(time.monotonic() - start)

    async def _parsed(self, requests, prefixes, opened_before_drain: bool = False) -> List[ParsedRequest]:
        """Validate ``requests``; large ones on the prep thread (counting a big cell's neighbour pairs takes
        ~0.1 s per 5000 atoms: that must not stall the event loop, health checks and every other client)."""
        atoms = sum(len(r.atomic_numbers) for r in requests)
        if atoms <= INLINE_PARSE_ATOMS:
            return [self._parse(r, p, opened_before_drain) for r, p in zip(requests, prefixes)]
        dispatcher = self._dispatcher(opened_before_drain)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            dispatcher.prep_executor,
            lambda: [self._parse(r, p, opened_before_drain) for r, p in zip(requests, prefixes)])

    async def _one(self, request, deadline: Optional[float], prefix: str = "",
                   opened_before_drain: bool = False) -> pb.PredictResponse:
        (parsed,) = await self._parsed([request], [prefix], opened_before_drain)
        ((values, timing),) = await self._dispatcher(opened_before_drain).run(
            [parsed], deadline, [prefix] if prefix else None)
        return result_to_proto(parsed, values, timing)

    # ---------------------------------------------------------------- RPCs
    async def Predict(self, request, context):
        return await self._unary("Predict", self._model_label(request), context,
                                 self._one(request, self._deadline(context)), [request.request_id])

    async def PredictBatch(self, request, context):
        model = self._model_label(request.structures[0]) if len(request.structures) else "-"
        ids = [s.request_id for s in request.structures]
        return await self._unary("PredictBatch", model, context, self._batch(request, self._deadline(context)), ids)

    async def _batch(self, request, deadline) -> pb.PredictBatchResponse:
        n = len(request.structures)
        if n == 0:
            raise InvalidRequest("structures", "at least one structure is required")
        if n > self.config.limits.max_structures_per_request:
            raise InvalidRequest(
                "structures",
                f"{n} structures exceed the limit of {self.config.limits.max_structures_per_request} per request",
            )
        prefixes = [f"structures[{i}]." for i in range(n)]
        parsed = await self._parsed(list(request.structures), prefixes)
        answer = sum(response_bytes(p) for p in parsed)
        if answer > self.config.limits.max_message_bytes:
            raise TooLarge("structures", f"the answer would be about {fmt(answer)}, more than "
                           f"limits.max_message_bytes = {fmt(self.config.limits.max_message_bytes)}; split the call")
        results = await self._dispatcher().run(parsed, deadline, prefixes)
        return pb.PredictBatchResponse(results=[result_to_proto(p, v, t) for p, (v, t) in zip(parsed, results)])

    async def _unary(self, method: str, model: str, context, work, request_ids: List[str]):
        start = time.monotonic()
        self._enter(method)
        code = grpc.StatusCode.OK
        counted = False
        try:
            return await work
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            error = _error_for(exc, request_ids)
            code = error.code
            ids = ",".join(_clip(r) for r in request_ids[:16])
            log.warning("%s request_id=%s: %s %s", method, ids, code.name, error)
            # counted before the answer leaves: a client that reads /metrics after its error sees it
            self._exit(method)
            self._finish(method, model, start, code)
            counted = True
            await context.abort(code, str(error))
        finally:
            if not counted:
                self._exit(method)
                self._finish(method, model, start, code)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        """Pipelined: up to ``batching.stream_window`` requests in flight, answered in order.

        Draining (SIGTERM): the messages a stream had sent when the drain
        began (those read within :data:`DRAIN_SETTLE_S` of it) are answered;
        then the stream ends with UNAVAILABLE, so an idle stream ends at once
        and an MD client resends its next step elsewhere (or after the restart).
        """
        method = "PredictStream"
        start = time.monotonic()
        self._enter(method)
        deadline = self._deadline(context)
        # (request, its answer's task) in arrival order; None: the client closed its side
        window: asyncio.Queue[Optional[Tuple[pb.PredictRequest, asyncio.Future[pb.PredictResponse]]]] = asyncio.Queue()
        slots = asyncio.Semaphore(self.config.batching.stream_window)  # taken before a message's task exists
        code = grpc.StatusCode.OK
        model = "-"
        ids: Deque[str] = deque(maxlen=16)  # the last request ids, for error messages (an MD run sends millions)
        serving = self.dispatcher is not None and not self.draining
        drained = self._drain_event()

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()  # cancelled here (a drain, the end of the call): no task was started
                ids.append(request.request_id)
                self.metrics.stream_messages.labels(event="read").inc()
                window.put_nowait((request, asyncio.ensure_future(self._one(request, deadline,
                                                                            opened_before_drain=serving))))
            window.put_nowait(None)

        async def stop_reading_after_drain() -> None:
            await drained.wait()
            await asyncio.sleep(DRAIN_SETTLE_S)  # messages already on their way are still read
            reader.cancel()

        reader = asyncio.ensure_future(read())
        closer = asyncio.ensure_future(stop_reading_after_drain())
        getter: Optional[asyncio.Future] = None
        try:
            while True:
                getter = asyncio.ensure_future(window.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if reader.cancelled():  # stopped by the drain, nothing left to answer
                        raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                           "server is shutting down: reopen the stream (on another replica)")
                    reader.result()  # the reader failed: re-raise its error
                    continue
                entry = getter.result()
                if entry is None:
                    break
                request, task = entry
                model = self._model_label(request)
                try:
                    answer = await task
                except Exception as exc:  # noqa: BLE001
                    self.metrics.stream_messages.labels(event="failed").inc()
                    error = _error_for(exc, [request.request_id])
                    message = str(error)
                    if request.request_id:
                        message = f"{message} (request_id {_clip(request.request_id)!r})"
                    raise ServiceError(error.code, message) from exc
                finally:
                    slots.release()
                self.metrics.stream_messages.labels(event="answered").inc()
                yield answer
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: the client went away while we yielded
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            error = _error_for(exc, list(ids))
            code = error.code
            if code != grpc.StatusCode.UNAVAILABLE:
                log.warning("%s: %s %s", method, code.name, error)  # the message names the request_id
            await context.abort(code, str(error))
        finally:
            pending = [t for t in (reader, closer, getter) if t is not None]
            for t in pending:
                t.cancel()
            while not window.empty():
                entry = window.get_nowait()
                if entry is not None:
                    entry[1].cancel()
                    pending.append(entry[1])
                    self.metrics.stream_messages.labels(event="cancelled").inc()
            await _settle(pending)
            self._exit(method)
            self._finish(method, model, start, code)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        start = time.monotonic()
        dispatcher = self.dispatcher
        if dispatcher is None:
            self._finish("ListModels", "-", start, grpc.StatusCode.UNAVAILABLE)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting: models are loading")
            raise AssertionError("unreachable: context.abort raises")  # grpc is untyped: abort is not NoReturn
        lim = self.config.limits
        response = list_models_response(
            [served.info() for served in dispatcher.registry],
            Limits(max_atoms_per_structure=lim.max_atoms_per_structure, max_field_magnitude=lim.max_field,
                   max_structures_per_request=lim.max_structures_per_request, min_distance=lim.min_distance))
        self._finish("ListModels", "-", start, grpc.StatusCode.OK)
        return response
