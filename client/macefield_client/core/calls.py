"""The request, retry and session logic of the clients, written once for :class:`Client` and :class:`AsyncClient`.

Every call is a *plan*: a generator that yields operations (:class:`Unary`, :class:`Start`, :class:`Wait`,
:class:`Sleep`, :class:`Open`, :class:`Ask`) and is sent back each one's value, or has the exception it raised
thrown in at the ``yield``.  :func:`run` performs a plan with a blocking :class:`Transport`
(``core/client.py``), :func:`arun` with an asyncio one (``core/aio.py``); the transports are the only code that
touches a gRPC stub, so the two clients build the same requests, split :meth:`predict_many` into the same
PredictBatch calls, retry the same failures after the same backoff and assemble the same results.

Behaviour both clients share:

* unary calls (Predict, ListModels, PredictBatch) are retried per :class:`RetryPolicy` (UNAVAILABLE, and
  CANCELLED from a server shutting down), each retry announced to ``on_retry`` first;
* ``predict_many`` keeps ``in_flight`` PredictBatch calls going and takes their answers in input order; a
  chunk that fails with a retried code is sent again on its own (the others stay in flight); any other error
  cancels the chunks still in flight, sends no more and is raised;
* a session step is resent on a new stream when the stream breaks (once at once when a stream that served
  earlier steps breaks oddly, then with the policy's backoff); a step unanswered within the session's
  timeout raises :class:`RequestTimeout`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import (
    Any,
    Protocol,
Self,
)

import grpc

from ..contract import build_request, per_structure_fields, server_info_from_response
from ..contract.messages import StructureLike
from ..proto.macefield.v1 import macefield_pb2 as pb
from ..proto.macefield.v1 import macefield_pb2_grpc as pb_grpc
from .channel import (
    RetryHook,
    RetryPolicy,
    Target,
    call_metadata,
    make_channel,
    resolve_server_name,
    resolve_target,
    resolve_timeout,
    resolve_tls,
    resolve_token,
)
from .errors import (
    NOT_READY_CODES,
    MACEFieldError,
    RequestTimeout,
    ServerUnavailable,
    error_from_rpc,
    not_ready,
)
from .progress import progress_bar
from .results import Result, ServerInfo, result_from_response

#: how a stream that served earlier steps may end when its connection died under it (besides
#: UNAVAILABLE): the step is resent once on a new stream before the error counts
STALE_STREAM_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)

#: structures per PredictBatch message in ``predict_many`` (capped by the server's limit)
DEFAULT_BATCH_SIZE = 16

#: a plan: yields operations, is sent their values, returns the call's value
Plan = Generator[Any, Any, Any]


# ------------------------------------------------------------------ operations
class Transport(Protocol):
    """What a plan's operations need from a client: the gRPC calls, a sleep and PredictStream streams.

    The blocking transport returns values; the asyncio one returns awaitables of the same values.
    ``start`` returns a handle of a call in flight (``.cancel()`` cancels it), ``open_stream`` a
    :class:`Stream`.
    """

    def unary(self, method: str, request: Any, timeout: float | None) -> Any: ...
    def start(self, method: str, request: Any, timeout: float | None) -> Any: ...
    def wait(self, handle: Any) -> Any: ...
    def sleep(self, seconds: float) -> Any: ...
    def open_stream(self) -> Any: ...


class Stream(Protocol):
    """One open PredictStream call.

    ``ask(request, timeout)`` sends one request and returns its response; None when the server ended the
    stream with OK; raises ``grpc.RpcError`` (or :class:`StatusError`) when the stream failed, and
    ``TimeoutError`` when no answer came within ``timeout`` s.  ``cancel()`` ends the call at once.
    """

    def ask(self, request: pb.PredictRequest, timeout: float | None) -> Any: ...
    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Unary:
    """Call ``method`` once with a deadline of ``timeout`` s; the value is its response."""

    method: str
    request: Any
    timeout: float | None

    def __call__(self, io: Transport) -> Any:
        return io.unary(self.method, self.request, self.timeout)


@dataclass(frozen=True)
class Start(Unary):
    """Start ``method`` without waiting; the value is a handle for :class:`Wait` (``.cancel()`` cancels it)."""

    def __call__(self, io: Transport) -> Any:
        return io.start(self.method, self.request, self.timeout)


@dataclass(frozen=True)
class Wait:
    """Wait for a started call; the value is its response."""

    handle: Any

    def __call__(self, io: Transport) -> Any:
        return io.wait(self.handle)


@dataclass(frozen=True)
class Sleep:
    """Sleep ``seconds`` (a retry's backoff, a readiness poll)."""

    seconds: float

    def __call__(self, io: Transport) -> Any:
        return io.sleep(self.seconds)


@dataclass(frozen=True)
class Open:
    """Open a PredictStream; the value is a :class:`Stream`."""

    def __call__(self, io: Transport) -> Any:
        return io.open_stream()


@dataclass(frozen=True)
class Ask:
    """One request over an open stream (see :class:`Stream` for its outcomes)."""

    stream: Any
    request: pb.PredictRequest
    timeout: float | None

    def __call__(self, io: Transport) -> Any:
        return self.stream.ask(self.request, self.timeout)


class StatusError(grpc.RpcError):
    """A stream that ended with a status other than OK, seen as an ``RpcError`` (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# ---------------------------------------------------------------------- running
class Runner:
    """Feeds a plan the outcome of each operation it yields: ``for op in runner: with runner: runner.put(op(io))``.

    An exception the operation raises is thrown into the plan at its ``yield``; the plan's return value ends
    up in :attr:`result`, an exception it does not handle propagates from the loop.
    """

    def __init__(self, plan: Plan):
        self._plan = plan
        self._value: Any = None
        self._error: BaseException | None = None
        self.result: Any = None

    def __iter__(self):
        while True:
            error, self._error = self._error, None
            try:
                op = self._plan.send(self._value) if error is None else self._plan.throw(error)
            except StopIteration as done:
                self.result = done.value
                return
            self._value = None
            yield op

    def put(self, value: Any) -> None:
        self._value = value

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._error = error
        return error is not None


def run(plan: Plan, io: Transport) -> Any:
    """Perform ``plan`` with a blocking transport; its return value."""
    runner = Runner(plan)
    for op in runner:
        with runner:
            runner.put(op(io))
    return runner.result


async def arun(plan: Plan, io: Transport) -> Any:
    """Perform ``plan`` with an asyncio transport (every operation awaited); its return value."""
    runner = Runner(plan)
    for op in runner:
        with runner:
            runner.put(await op(io))
    return runner.result


# ------------------------------------------------------------------ call state
class CallContext:
    """What every call of one client shares: target, deadline, retry policy and hook, credentials, server info.

    Attributes:
        target: the resolved gRPC target (named in every error).
        timeout: per-call deadline in s (None: none).
        retry: the :class:`RetryPolicy`.
        on_retry: told before each retry (:data:`~macefield_client.core.channel.RetryHook`), or None.
        metadata: the calls' metadata (the bearer token), or None.
        info: the latest ListModels answer (``predict_many`` takes the server's batch limit from it).
    """

    def __init__(self, target: str, *, timeout: float | None, retry: RetryPolicy, on_retry: RetryHook | None,
                 metadata: Sequence[tuple[str, str]] | None):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.on_retry = on_retry
        self.metadata = metadata
        self.info: ServerInfo | None = None

    def deadline(self, timeout: float | None = None) -> float | None:
        """The deadline in s of a call given ``timeout`` (None: the client's; inf or <= 0: none)."""
        return self.timeout if timeout is None else resolve_timeout(timeout)

    def notify(self, attempt: int, delay: float, err: grpc.RpcError | None) -> None:
        """Tell ``on_retry`` that attempt ``attempt`` failed with ``err`` and the next follows in ``delay`` s."""
        if self.on_retry is not None:
            details = (err.details() if err is not None else "") or "no answer"
            self.on_retry(self.target, attempt, self.retry.attempts, delay, details)


class Attempts:
    """One call's attempts under the retry policy: counts them and decides what follows a failure."""

    def __init__(self, calls: CallContext):
        self.calls = calls
        self.count = 0
        self._delays = calls.retry.delays()

    def begin(self) -> None:
        """Count one more attempt."""
        self.count += 1

    def backoff(self, err: grpc.RpcError | None) -> float:
        """The delay in s before the next attempt after ``err`` (None: a stream ended without a status).

        Raises the client error ``err`` maps to when its code is not retried or the retries are spent
        (:class:`ServerUnavailable` for a stream that kept ending); tells ``on_retry`` otherwise.
        """
        target = self.calls.target
        if err is not None and not self.calls.retry.retries(err.code()):
            raise error_from_rpc(err, target, attempts=self.count)
        delay = next(self._delays, None)
        if delay is None and err is None:
            raise ServerUnavailable(f"MACE-Field server at {target} ended the stream after {self.count} attempts",
                                    target=target)
        if delay is None:
            raise error_from_rpc(err, target, attempts=self.count)
        self.calls.notify(self.count, delay, err)
        return delay


# ------------------------------------------------------------------------ plans
def unary(calls: CallContext, method: str, request: Any, timeout: float | None = None,
          attempts: Attempts | None = None) -> Plan:
    """Call ``method``, retrying per the policy (``attempts``: those already made, e.g. a pipelined one)."""
    attempts = attempts or Attempts(calls)
    while True:
        attempts.begin()
        try:
            return (yield Unary(method, request, calls.deadline(timeout)))
        except grpc.RpcError as err:
            failure = err
        yield Sleep(attempts.backoff(failure))


def list_models(calls: CallContext, timeout: float | None = None) -> Plan:
    """ListModels; remembered in ``calls.info``."""
    response = yield from unary(calls, "ListModels", pb.ListModelsRequest(), timeout)
    calls.info = server_info_from_response(calls.target, response)
    return calls.info


#: seconds between "waiting for server" notices of :func:`wait_ready`
NOTICE_EVERY_S = 2.0


def wait_ready(calls: CallContext, timeout: float = 60.0, poll: float = 0.25) -> Plan:
    """Poll ListModels every ``poll`` s until it answers or ``timeout`` s pass (see ``Client.wait_ready``)."""
    end = time.monotonic() + float(timeout)
    next_notice = 0.0
    attempt = 0
    while True:
        attempt += 1
        remaining = end - time.monotonic()
        try:
            response = yield Unary("ListModels", pb.ListModelsRequest(), max(0.05, min(5.0, remaining)))
        except grpc.RpcError as err:
            failure = err
        else:
            calls.info = server_info_from_response(calls.target, response)
            return calls.info
        if failure.code() not in NOT_READY_CODES:
            raise error_from_rpc(failure, calls.target, attempts=attempt)
        if time.monotonic() + poll > end:
            raise not_ready(calls.target, timeout, attempt, failure)
        if calls.on_retry is not None and time.monotonic() >= next_notice:
            calls.on_retry(calls.target, attempt, 0, poll, failure.details() or failure.code().name)
            next_notice = time.monotonic() + NOTICE_EVERY_S
        yield Sleep(poll)


def predict(calls: CallContext, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
            model: str | None = None, head: str | None = None, *, timeout: float | None = None,
            request_id: str = "", allow_unseen_elements: bool = False) -> Plan:
    """One structure in a uniform field (V/A) over Predict."""
    request = build_request(structure, electric_field=electric_field, outputs=outputs, model=model, head=head,
                            request_id=request_id, allow_unseen_elements=allow_unseen_elements)
    return result_from_response((yield from unary(calls, "Predict", request, timeout)))


def predict_many(calls: CallContext, structures: Iterable[StructureLike], electric_field: Any = (0.0, 0.0, 0.0),
                 outputs: Any = None, model: str | None = None, head: str | None = None, *,
                 batch_size: int | None = None, in_flight: int = 2, progress: bool | None = False,
                 timeout: float | None = None, allow_unseen_elements: bool = False) -> Plan:
    """Many structures as PredictBatch chunks of ``batch_size``, ``in_flight`` of them pipelined (see the module doc).

    ``electric_field``: one (3,) field in V/A for all, or one per structure (n, 3).  Results in input order.
    """
    structures = list(structures)
    fields = per_structure_fields(electric_field, len(structures))
    requests = [build_request(s, electric_field=f, outputs=outputs, model=model, head=head, request_id=str(i),
                              allow_unseen_elements=allow_unseen_elements)
                for i, (s, f) in enumerate(zip(structures, fields))]
    if not requests:
        return []
    if not batch_size:
        info = calls.info if calls.info is not None else (yield from list_models(calls, timeout))
        limit = info.max_structures_per_request or DEFAULT_BATCH_SIZE
        batch_size = max(1, min(DEFAULT_BATCH_SIZE, limit))
    chunks = [pb.PredictBatchRequest(structures=requests[i:i + batch_size])
              for i in range(0, len(requests), batch_size)]
    pending: deque[tuple[pb.PredictBatchRequest, Attempts, Any]] = deque()
    results: list[Result] = []
    bar = progress_bar(len(requests), progress, desc="predict")
    try:
        sent = 0
        while sent < len(chunks) or pending:
            while sent < len(chunks) and len(pending) < max(1, in_flight):
                attempts = Attempts(calls)
                attempts.begin()
                handle = yield Start("PredictBatch", chunks[sent], calls.deadline(timeout))
                pending.append((chunks[sent], attempts, handle))
                sent += 1
            chunk, attempts, handle = pending.popleft()
            try:
                response = yield Wait(handle)
            except grpc.RpcError as err:
                failure = err
            else:
                failure = None
            if failure is not None:  # raises (and the chunks in flight are cancelled) unless the code is retried
                yield Sleep(attempts.backoff(failure))
                response = yield from unary(calls, "PredictBatch", chunk, timeout, attempts)
            results.extend(result_from_response(r) for r in response.results)
            bar.update(len(chunk.structures))
    except BaseException:
        for _, _, handle in pending:
            handle.cancel()
        raise
    finally:
        bar.close()
    return results


class SessionState:
    """What a session keeps between steps: its defaults, the open stream, the step counter and reconnect count.

    Shared by :class:`~macefield_client.Session` and :class:`~macefield_client.AsyncSession`, whose steps
    are the plan :func:`session_step`.
    """

    def __init__(self, calls: CallContext, *, model: str | None = None, head: str | None = None,
                 outputs: Any = None, timeout: float | None = None, allow_unseen_elements: bool = False):
        self.calls = calls
        self.model = model
        self.head = head
        self.allow_unseen_elements = allow_unseen_elements
        self.outputs = outputs
        self.timeout = calls.deadline(timeout)  #: s per step (None: none)
        self.stream: Any = None
        self._ids = itertools.count()
        self.reconnects = 0  #: streams reopened after a failure
        self.closed = False

    def request(self, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                model: str | None = None, head: str | None = None) -> pb.PredictRequest:
        """The next step's request (the session's defaults where an argument is None)."""
        if self.closed:
            raise MACEFieldError("session is closed", target=self.calls.target)
        return build_request(structure, electric_field=electric_field,
                             outputs=self.outputs if outputs is None else outputs,
                             model=model or self.model, head=head or self.head, request_id=f"s{next(self._ids)}",
                             allow_unseen_elements=self.allow_unseen_elements)

    def drop(self) -> None:
        """Cancel the open stream (the next step opens a new one)."""
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


def session_step(session: SessionState, request: pb.PredictRequest) -> Plan:
    """One request over the session's stream, reopened and resent after failures (see the module doc)."""
    target = session.calls.target
    attempts = Attempts(session.calls)
    stale_retried = False
    while True:
        attempts.begin()
        fresh = session.stream is None
        if fresh:
            session.stream = yield Open()
        failure: grpc.RpcError | None = None
        try:
            response = yield Ask(session.stream, request, session.timeout)
        except TimeoutError:
            session.drop()
            raise RequestTimeout(f"MACE-Field server at {target}: no answer within {session.timeout} s "
                                 f"(session step {request.request_id})", target=target,
                                 code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except grpc.RpcError as err:
            session.drop()
            failure = err
        else:
            if response is not None and response.request_id == request.request_id:
                return result_from_response(response)
            session.drop()
            if response is not None:  # never expected: answers come in order
                raise MACEFieldError(f"session out of step: sent {request.request_id}, got {response.request_id}",
                                     target=target)
        if failure is not None and not fresh and not stale_retried and failure.code() in STALE_STREAM_CODES:
            stale_retried = True  # a stream that worked before broke oddly: resend once on a new one
            session.reconnects += 1
            continue
        yield Sleep(attempts.backoff(failure))
        session.reconnects += 1


# ---------------------------------------------------------------------- clients
class _InCallContext:
    """A client attribute kept in its :class:`CallContext`: ``client.timeout`` reads ``client.calls.timeout``."""

    def __init__(self, doc: str, settable: bool = False):
        self.__doc__ = doc
        self.settable = settable
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.calls, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if not self.settable:
            raise AttributeError(f"{self.name} is read-only (set it when the client is made)")
        setattr(obj.calls, self.name, value)


class ClientBase:
    """The arguments, environment, channel and call state shared by :class:`~macefield_client.Client` and
    :class:`~macefield_client.AsyncClient` (see :class:`~macefield_client.Client` for the arguments).

    Package-internal interface of the sessions: :attr:`calls` (the :class:`CallContext`) and ``perform(plan)``
    (run a plan on this client's transport; a coroutine on the asyncio client).
    """

    #: True: a grpc.aio channel (the asyncio client)
    asynchronous = False

    def __init__(self, target: Target | None = None, *, tls: Any = None, token: str | None = None,
                 timeout: float | None = None, retry: Any = None, options: Sequence[tuple[str, Any]] | None = None,
                 on_retry: RetryHook | None = None, tls_server_name: str | None = None,
                 health_check: bool | None = None):
        self.calls = CallContext(resolve_target(target), timeout=resolve_timeout(timeout),
                                 retry=RetryPolicy.coerce(retry), on_retry=on_retry,
                                 metadata=call_metadata(resolve_token(token)))
        self._channel = make_channel(self.target, resolve_tls(tls), options, aio=self.asynchronous,
                                     tls_server_name=resolve_server_name(tls_server_name), health_check=health_check)
        self._stub = pb_grpc.MaceFieldStub(self._channel)
        self._io = self._transport()

    def _transport(self) -> Transport:
        """The transport of this client's calls over ``self._stub``."""
        raise NotImplementedError

    target = _InCallContext("The resolved gRPC target (str).")
    timeout = _InCallContext("Per-call deadline in s (None: none).")
    retry = _InCallContext("The retry policy of every call (RetryPolicy).")
    on_retry = _InCallContext("Told before each retry (``on_retry(target, attempt, attempts, delay_s, details)``), "
                              "or None; settable.", settable=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "STALE_STREAM_CODES",
    "Ask",
    "Attempts",
    "CallContext",
    "ClientBase",
    "Open",
    "Runner",
    "SessionState",
    "Sleep",
    "Start",
    "StatusError",
    "Stream",
    "Transport",
    "Unary",
    "Wait",
    "arun",
    "list_models",
    "predict",
    "predict_many",
    "run",
    "session_step",
    "unary",
    "wait_ready",
]
