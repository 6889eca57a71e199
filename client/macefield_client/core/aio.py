"""asyncio client: :class:`AsyncClient` and :class:`AsyncSession` (grpc.aio), the same API as the sync one.

The request, retry and session logic is :mod:`macefield_client.core.calls`, shared with the sync client;
this module is its asyncio transport, so both behave the same (``predict_many`` included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Self

import grpc

from ..contract.messages import StructureLike
from ..proto.macefield.v1 import macefield_pb2 as pb
from . import calls as plans
from .calls import ClientBase, Plan, SessionState, StatusError
from .results import Result, ServerInfo


class _Asyncio:
    """The asyncio :class:`~macefield_client.core.calls.Transport`: every method a coroutine."""

    def __init__(self, stub, metadata):
        self.stub, self.metadata = stub, metadata

    async def unary(self, method: str, request: Any, timeout: float | None) -> Any:
        return await self.wait(await self.start(method, request, timeout))

    async def start(self, method: str, request: Any, timeout: float | None) -> grpc.aio.Call:
        # a grpc.aio call runs from the moment it is made; awaiting it gives its response
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata, wait_for_ready=False)

    async def wait(self, handle: grpc.aio.Call) -> Any:
        return await handle

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def open_stream(self) -> _AsyncStream:
        return _AsyncStream(self.stub.PredictStream(metadata=self.metadata, wait_for_ready=False))


class _AsyncStream:
    """One open grpc.aio PredictStream call (a :class:`~macefield_client.core.calls.Stream` whose ``ask`` is
    a coroutine)."""

    def __init__(self, call):
        self.call = call

    async def ask(self, request: pb.PredictRequest, timeout: float | None) -> pb.PredictResponse | None:
        try:
            await self.call.write(request)
            response = await asyncio.wait_for(self.call.read(), timeout)
        except asyncio.InvalidStateError:  # writing to a call that already ended
            response = grpc.aio.EOF
        if response is grpc.aio.EOF:
            await self._ended()  # raises the call's error status, if any
            return None
        return response

    async def _ended(self) -> None:
        """The call ended: None for OK (or a status that cannot be read), else its status raised."""
        try:
            code = await self.call.code()
            details = await self.call.details()
        except Exception:  # noqa: BLE001 - no status to tell: an ended stream
            return
        if code != grpc.StatusCode.OK:
            raise StatusError(code, details or "")
        return

    def cancel(self) -> None:
        self.call.cancel()

    async def close(self) -> None:
        """Half-close (the server ends the call), then cancel what is left."""
        try:
            await self.call.done_writing()
        except Exception:  # noqa: BLE001, S110 - a call that already ended
            pass
        self.cancel()


class AsyncClient(ClientBase):
    """Like :class:`macefield_client.Client`, with coroutine methods.  Create it inside the event loop.

    ``async with AsyncClient("host:port") as client: r = await client.predict(atoms)``; several replicas:
    ``AsyncClient(["10.0.0.1:50051", "10.0.0.2:50051"])`` or ``AsyncClient("dns:///macefield.svc:50051")``.
    Every argument (``tls``, ``token``, ``tls_server_name``, ``health_check``, ...) and the environment
    variables as for the sync client; every method behaves as the sync one (the same shared plans).
    """

    asynchronous = True

    def _transport(self) -> _Asyncio:
        return _Asyncio(self._stub, self.calls.metadata)

    async def perform(self, plan: Plan) -> Any:
        """Run a plan of :mod:`macefield_client.core.calls` on this client (what :class:`AsyncSession` uses)."""
        return await plans.arun(plan, self._io)

    async def wait_ready(self, timeout: float = 60.0, poll: float = 0.25) -> ServerInfo:
        """Wait until the server answers ListModels (see :meth:`macefield_client.Client.wait_ready`)."""
        return await self.perform(plans.wait_ready(self.calls, timeout, poll))

    async def list_models(self, timeout: float | None = None) -> ServerInfo:
        """ListModels (see :meth:`macefield_client.Client.list_models`)."""
        return await self.perform(plans.list_models(self.calls, timeout))

    info = list_models

    async def predict(self, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                      model: str | None = None, head: str | None = None, *, timeout: float | None = None,
                      request_id: str = "", allow_unseen_elements: bool = False) -> Result:
        """One structure in a uniform field, V/A (see :meth:`macefield_client.Client.predict`)."""
        plan = plans.predict(self.calls, structure, electric_field, outputs, model, head, timeout=timeout,
                             request_id=request_id, allow_unseen_elements=allow_unseen_elements)
        return await self.perform(plan)

    async def predict_many(self, structures: Iterable[StructureLike], electric_field: Any = (0.0, 0.0, 0.0),
                           outputs: Any = None, model: str | None = None, head: str | None = None, *,
                           batch_size: int | None = None, in_flight: int = 2, progress: bool | None = False,
                           timeout: float | None = None, allow_unseen_elements: bool = False) -> list[Result]:
        """Many structures over pipelined PredictBatch calls (see :meth:`macefield_client.Client.predict_many`)."""
        plan = plans.predict_many(self.calls, structures, electric_field, outputs, model, head, timeout=timeout,
                                  batch_size=batch_size, in_flight=in_flight, progress=progress,
                                  allow_unseen_elements=allow_unseen_elements)
        return await self.perform(plan)

    def session(self, *, model: str | None = None, head: str | None = None, outputs: Any = None,
                timeout: float | None = None, allow_unseen_elements: bool = False) -> AsyncSession:
        """An :class:`AsyncSession` (see :meth:`macefield_client.Client.session`)."""
        return AsyncSession(self, model=model, head=head, outputs=outputs, timeout=timeout,
                            allow_unseen_elements=allow_unseen_elements)

    async def close(self) -> None:
        """Close the channel: calls in flight are cancelled, later calls fail."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(SessionState):
    """One PredictStream kept open across ``await session.predict(...)`` calls; reopened after failures
    (see :class:`macefield_client.Session`)."""

    def __init__(self, client: AsyncClient, *, model: str | None = None, head: str | None = None,
                 outputs: Any = None, timeout: float | None = None, allow_unseen_elements: bool = False):
        super().__init__(client.calls, model=model, head=head, outputs=outputs, timeout=timeout,
                         allow_unseen_elements=allow_unseen_elements)
        self.client = client

    async def predict(self, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                      model: str | None = None, head: str | None = None) -> Result:
        """Like :meth:`AsyncClient.predict` (field in V/A), over the session's stream."""
        request = self.request(structure, electric_field, outputs, model, head)
        return await self.client.perform(plans.session_step(self, request))

    async def close(self) -> None:
        """Half-close the stream and end it; later steps raise :class:`~macefield_client.MACEFieldError`."""
        if self.stream is not None:
            await self.stream.close()
        self.drop()
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncSession"]
