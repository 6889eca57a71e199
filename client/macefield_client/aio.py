"""asyncio client: :class:`AsyncClient` and :class:`AsyncSession` (grpc.aio), the same API as the sync one."""

from __future__ import annotations

import asyncio
import itertools
from typing import Iterable, List, Optional

import grpc

from ._channel import RetryHook, RetryPolicy, Target, call_metadata, make_channel, resolve_target, resolve_timeout
from ._progress import progress_bar
from .client import DEFAULT_BATCH_SIZE, STALE_STREAM_CODES
from .errors import NOT_READY_CODES, MACEFieldError, RequestTimeout, ServerUnavailable, error_from_rpc, not_ready
from .proto.macefield.v1 import macefield_pb2 as pb
from .proto.macefield.v1 import macefield_pb2_grpc as pb_grpc
from .results import (
    Result,
    ServerInfo,
    StructureLike,
    build_request,
    per_structure_fields,
    result_from_response,
    server_info_from_response,
)


class AsyncClient:
    """Like :class:`macefield_client.Client`, with coroutine methods.  Create it inside the event loop.

    ``async with AsyncClient("host:port") as client: r = await client.predict(atoms)``; several replicas:
    ``AsyncClient(["10.0.0.1:50051", "10.0.0.2:50051"])`` or ``AsyncClient("dns:///macefield.svc:50051")``.
    Every argument (``tls_server_name``, ``health_check``, ...) as for the sync client.
    """

    def __init__(self, target: Optional[Target] = None, *, tls=None, token: Optional[str] = None,
                 timeout: Optional[float] = None, retry=None, options=None, on_retry: Optional[RetryHook] = None,
                 tls_server_name: Optional[str] = None, health_check: Optional[bool] = None):
        self.target = resolve_target(target)
        self.timeout = resolve_timeout(timeout)
        self.retry = RetryPolicy.coerce(retry)
        self.on_retry = on_retry
        self._metadata = call_metadata(token)
        self._channel = make_channel(self.target, tls, options, aio=True, tls_server_name=tls_server_name,
                                     health_check=health_check)
        self._stub = pb_grpc.MaceFieldStub(self._channel)
        self._info: Optional[ServerInfo] = None

    def _deadline(self, timeout):
        return self.timeout if timeout is None else resolve_timeout(timeout)

    async def _unary(self, method: str, request, timeout=None):
        rpc = getattr(self._stub, method)
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=self._deadline(timeout), metadata=self._metadata,
                                 wait_for_ready=False)
            except grpc.RpcError as err:
                if self.retry.retries(err.code()):
                    delay = next(delays, None)
                    if delay is not None:
                        self._notify(attempt, delay, err)
                        await asyncio.sleep(delay)
                        continue
                raise error_from_rpc(err, self.target, attempts=attempt) from None

    def _notify(self, attempt: int, delay: float, err) -> None:
        if self.on_retry is not None:
            details = (err.details() if err is not None and hasattr(err, "details") else "") or "no answer"
            self.on_retry(self.target, attempt, self.retry.attempts, delay, details)

    async def wait_ready(self, timeout: float = 60.0, poll: float = 0.25) -> ServerInfo:
        """Wait until the server answers ListModels (see :meth:`macefield_client.Client.wait_ready`)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + float(timeout)
        next_notice = 0.0  # "waiting" notices at most every 2 s
        attempt = 0
        while True:
            attempt += 1
            remaining = end - loop.time()
            try:
                response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=max(0.05, min(5.0, remaining)),
                                                       metadata=self._metadata, wait_for_ready=False)
            except grpc.RpcError as err:
                if err.code() not in NOT_READY_CODES:
                    raise error_from_rpc(err, self.target, attempts=attempt) from None
                if loop.time() + poll > end:
                    raise not_ready(self.target, timeout, attempt, err) from None
                if self.on_retry is not None and loop.time() >= next_notice:
                    self.on_retry(self.target, attempt, 0, poll, err.details() or err.code().name)
                    next_notice = loop.time() + 2.0
                await asyncio.sleep(poll)
                continue
            self._info = server_info_from_response(self.target, response)
            return self._info

    async def list_models(self, timeout=None) -> ServerInfo:
        response = await self._unary("ListModels", pb.ListModelsRequest(), timeout)
        self._info = server_info_from_response(self.target, response)
        return self._info

    info = list_models

    async def predict(self, structure: StructureLike, electric_field=(0.0, 0.0, 0.0), outputs=None,
                      model: Optional[str] = None, head: Optional[str] = None, *, timeout=None,
                      request_id: str = "") -> Result:
        request = build_request(structure, electric_field=electric_field, outputs=outputs, model=model, head=head,
                                request_id=request_id)
        return result_from_response(await self._unary("Predict", request, timeout))

    async def predict_many(self, structures: Iterable[StructureLike], electric_field=(0.0, 0.0, 0.0), outputs=None,
                           model: Optional[str] = None, head: Optional[str] = None, *,
                           batch_size: Optional[int] = None, in_flight: int = 2, progress=False,
                           timeout=None) -> List[Result]:
        structures = list(structures)
        fields = per_structure_fields(electric_field, len(structures))
        requests = [build_request(s, electric_field=f, outputs=outputs, model=model, head=head, request_id=str(i))
                    for i, (s, f) in enumerate(zip(structures, fields))]
        if not requests:
            return []
        if not batch_size:
            limit = (self._info or await self.list_models(timeout)).max_structures_per_request
            batch_size = max(1, min(DEFAULT_BATCH_SIZE, limit or DEFAULT_BATCH_SIZE))
        chunks = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
        gate = asyncio.Semaphore(max(1, in_flight))
        bar = progress_bar(len(requests), progress, desc="predict")

        async def run(chunk):
            async with gate:
                response = await self._unary("PredictBatch", pb.PredictBatchRequest(structures=chunk), timeout)
            bar.update(len(chunk))
            return response

        try:
            responses = await asyncio.gather(*(run(c) for c in chunks))
        finally:
            bar.close()
        return [result_from_response(r) for response in responses for r in response.results]

    def session(self, *, model: Optional[str] = None, head: Optional[str] = None, outputs=None,
                timeout=None) -> "AsyncSession":
        return AsyncSession(self, model=model, head=head, outputs=outputs, timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncSession:
    """One PredictStream kept open across ``await session.predict(...)`` calls; reopened after failures."""

    def __init__(self, client: AsyncClient, *, model=None, head=None, outputs=None, timeout=None):
        self.client = client
        self.model = model
        self.head = head
        self.outputs = outputs
        self.timeout = client._deadline(timeout)
        self._call = None
        self._ids = itertools.count()
        self.reconnects = 0
        self.closed = False

    async def predict(self, structure: StructureLike, electric_field=(0.0, 0.0, 0.0), outputs=None, model=None,
                      head=None) -> Result:
        if self.closed:
            raise MACEFieldError("session is closed", target=self.client.target)
        request_id = f"s{next(self._ids)}"
        request = build_request(structure, electric_field=electric_field,
                                outputs=self.outputs if outputs is None else outputs,
                                model=model or self.model, head=head or self.head, request_id=request_id)
        delays = self.client.retry.delays()
        attempt = 0
        stale_retried = False
        while True:
            attempt += 1
            fresh = self._call is None
            if fresh:
                self._call = self.client._stub.PredictStream(metadata=self.client._metadata, wait_for_ready=False)
            call = self._call
            err = None
            try:
                await call.write(request)
                response = await asyncio.wait_for(call.read(), self.timeout)
            except asyncio.TimeoutError:
                self._drop()
                raise RequestTimeout(f"MACE-Field server at {self.client.target}: no answer within {self.timeout} s "
                                     f"(session step {request_id})", target=self.client.target,
                                     code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
            except grpc.RpcError as exc:
                self._drop()
                if not fresh and not stale_retried and exc.code() in STALE_STREAM_CODES:
                    stale_retried = True  # a stream that worked before broke oddly: resend once on a new one
                    self.reconnects += 1
                    continue
                if not self.client.retry.retries(exc.code()):
                    raise error_from_rpc(exc, self.client.target, attempts=attempt) from None
                err = exc
            except asyncio.InvalidStateError:  # writing to a call that already ended
                err = await self._ended(call)
            else:
                if response is grpc.aio.EOF:
                    err = await self._ended(call)
                elif response.request_id != request_id:
                    self._drop()
                    raise MACEFieldError(f"session out of step: sent {request_id}, got {response.request_id}",
                                         target=self.client.target)
                else:
                    return result_from_response(response)
            delay = next(delays, None)
            if delay is not None:
                self.client._notify(attempt, delay, err)
            if delay is None:
                if err is None:
                    raise ServerUnavailable(f"MACE-Field server at {self.client.target} ended the stream after "
                                            f"{attempt} attempts", target=self.client.target)
                raise error_from_rpc(err, self.client.target, attempts=attempt) from None
            await asyncio.sleep(delay)
            self.reconnects += 1

    async def _ended(self, call):
        """The stream ended: its status (retryable) or a non-retryable error raised."""
        self._drop()
        try:
            code = await call.code()
            details = await call.details()
        except Exception:  # noqa: BLE001
            return None
        if code == grpc.StatusCode.OK or self.client.retry.retries(code):
            return None
        raise MACEFieldError(f"MACE-Field server at {self.client.target}: {code.name}: {details}",
                             target=self.client.target, code=code, details=details)

    def _drop(self):
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self) -> None:
        if self._call is not None:
            try:
                await self._call.done_writing()
            except Exception:  # noqa: BLE001
                pass
        self._drop()
        self.closed = True

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
