"""Synchronous client: :class:`Client` (Predict, PredictBatch, ListModels) and :class:`Session` (PredictStream)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Iterable, List, Optional

import grpc

from ._channel import RetryHook, RetryPolicy, Target, call_metadata, make_channel, resolve_target, resolve_timeout
from ._progress import progress_bar
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

#: how a stream that served earlier steps may end when its connection died under it (besides
#: UNAVAILABLE): the step is resent once on a new stream before the error counts
STALE_STREAM_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)

#: structures per PredictBatch message in :meth:`Client.predict_many` (capped by the server's limit)
DEFAULT_BATCH_SIZE = 16


class Client:
    """Blocking client for a MACE-Field server.

    Args:
        target: ``host:port`` (default ``$MACEFIELD_SERVER`` or ``127.0.0.1:50051``), or
            several replicas: a list of ``host:port``, a comma-separated string of
            them, or a gRPC target (``dns:///name:port``, ``ipv4:a:port,b:port``).
            Calls are spread over the replicas by gRPC's ``round_robin`` policy,
            only to replicas whose health says SERVING (docs/scaling.md).
        tls: None (plaintext), True (TLS, system roots), a CA file path or PEM
            bytes, a :class:`TLSConfig` (CA plus client certificate and key for
            mutual TLS), or a ``grpc.ChannelCredentials``.
        token: bearer token sent as ``authorization: Bearer <token>``; a
            refused token raises :class:`~macefield_client.AuthenticationError`.
        timeout: per-call deadline in seconds (None: 120 s; ``float("inf")``: none).
        retry: :class:`RetryPolicy`, or an int number of retries (0: none).
            Only UNAVAILABLE is retried (these calls are idempotent), and
            CANCELLED from a server shutting down; with several replicas a
            retry goes to another one.
        options: extra gRPC channel options.
        on_retry: called before each retry as ``on_retry(target, attempt,
            attempts, delay_s, details)`` (the CLI prints "waiting for server").
        tls_server_name: the host name the server certificates are checked
            against (sent as the calls' authority); needed for TLS with a
            list of replicas, whose certificates must all carry this one name
            (docs/scaling.md).
        health_check: gRPC client-side health checking (only replicas whose
            ``macefield.v1.MaceField`` health says SERVING get calls).  None:
            on for a target naming several replicas (an address list, a
            ``dns:`` name), off for one ``host:port``; False for a proxy
            reached by a ``dns:`` name, True for replicas behind one plain
            name that resolves to all of them.

    Connection failures raise :class:`~macefield_client.ServerUnavailable`
    naming the target once the retries are spent.  Use as a context manager
    or call :meth:`close`.
    """

    def __init__(self, target: Optional[Target] = None, *, tls=None, token: Optional[str] = None,
                 timeout: Optional[float] = None, retry=None, options=None, on_retry: Optional[RetryHook] = None,
                 tls_server_name: Optional[str] = None, health_check: Optional[bool] = None):
        self.target = resolve_target(target)
        self.timeout = resolve_timeout(timeout)
        self.retry = RetryPolicy.coerce(retry)
        self.on_retry = on_retry
        self._metadata = call_metadata(token)
        self._channel = make_channel(self.target, tls, options, tls_server_name=tls_server_name,
                                     health_check=health_check)
        self._stub = pb_grpc.MaceFieldStub(self._channel)
        self._info: Optional[ServerInfo] = None

    # ------------------------------------------------------------ plumbing
    def _deadline(self, timeout):
        return self.timeout if timeout is None else resolve_timeout(timeout)

    def _unary(self, method: str, request, timeout=None):
        """Call ``method`` retrying UNAVAILABLE with backoff; errors mapped to client exceptions."""
        rpc = getattr(self._stub, method)
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=False)
            except grpc.RpcError as err:
                if self.retry.retries(err.code()):
                    delay = next(delays, None)
                    if delay is not None:
                        self._notify(attempt, delay, err)
                        time.sleep(delay)
                        continue
                raise error_from_rpc(err, self.target, attempts=attempt) from None

    def _notify(self, attempt: int, delay: float, err) -> None:
        if self.on_retry is not None:
            details = (err.details() if err is not None and hasattr(err, "details") else "") or "no answer"
            self.on_retry(self.target, attempt, self.retry.attempts, delay, details)

    # --------------------------------------------------------------- calls
    def wait_ready(self, timeout: float = 60.0, poll: float = 0.25) -> ServerInfo:
        """Block until the server answers ListModels (models loaded and warm) or ``timeout`` s pass.

        For scripts that start a server and then use it.  Returns the server
        info; raises :class:`~macefield_client.ServerUnavailable` naming the
        target after ``timeout``, or at once for an error other than
        UNAVAILABLE (e.g. a refused token).
        """
        end = time.monotonic() + float(timeout)
        next_notice = 0.0  # "waiting" notices at most every 2 s
        attempt = 0
        while True:
            attempt += 1
            remaining = end - time.monotonic()
            try:
                response = self._stub.ListModels(pb.ListModelsRequest(), timeout=max(0.05, min(5.0, remaining)),
                                                 metadata=self._metadata, wait_for_ready=False)
            except grpc.RpcError as err:
                if err.code() not in NOT_READY_CODES:
                    raise error_from_rpc(err, self.target, attempts=attempt) from None
                if time.monotonic() + poll > end:
                    raise not_ready(self.target, timeout, attempt, err) from None
                if self.on_retry is not None and time.monotonic() >= next_notice:
                    self.on_retry(self.target, attempt, 0, poll, err.details() or err.code().name)
                    next_notice = time.monotonic() + 2.0
                time.sleep(poll)
                continue
            self._info = server_info_from_response(self.target, response)
            return self._info

    def list_models(self, timeout=None) -> ServerInfo:
        """Models, heads, elements, units and the server's limits (ListModels)."""
        self._info = server_info_from_response(self.target, self._unary("ListModels", pb.ListModelsRequest(), timeout))
        return self._info

    info = list_models

    def predict(self, structure: StructureLike, electric_field=(0.0, 0.0, 0.0), outputs=None, model: Optional[str] = None,
                head: Optional[str] = None, *, timeout=None, request_id: str = "") -> Result:
        """One structure (ase.Atoms or a mapping of arrays) in a uniform field (V/A).

        ``outputs``: None (energy, forces, stress), ``"all"``, or names from
        energy, forces, stress, dipole, polarization, born_charges,
        polarizability.  stress, polarization and chi only exist for
        structures periodic in all three directions.
        """
        request = build_request(structure, electric_field=electric_field, outputs=outputs, model=model, head=head,
                                request_id=request_id)
        return result_from_response(self._unary("Predict", request, timeout))

    def _batch_size(self, batch_size: Optional[int], timeout) -> int:
        if batch_size:
            return int(batch_size)
        limit = (self._info or self.list_models(timeout)).max_structures_per_request
        return max(1, min(DEFAULT_BATCH_SIZE, limit or DEFAULT_BATCH_SIZE))

    def predict_many(self, structures: Iterable[StructureLike], electric_field=(0.0, 0.0, 0.0), outputs=None,
                     model: Optional[str] = None, head: Optional[str] = None, *, batch_size: Optional[int] = None,
                     in_flight: int = 2, progress=False, timeout=None) -> List[Result]:
        """Many structures (screening): PredictBatch messages of ``batch_size``, ``in_flight`` of them pipelined.

        ``electric_field``: one (3,) field for all or one per structure (n, 3).
        ``progress``: show a progress bar (tqdm when installed).  Results are in input order.
        """
        structures = list(structures)
        fields = per_structure_fields(electric_field, len(structures))
        requests = [build_request(s, electric_field=f, outputs=outputs, model=model, head=head, request_id=str(i))
                    for i, (s, f) in enumerate(zip(structures, fields))]
        if not requests:
            return []
        size = self._batch_size(batch_size, timeout)
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        results: List[Result] = []
        bar = progress_bar(len(requests), progress, desc="predict")
        try:
            pending = []  # (chunk, future) in order
            next_chunk = 0
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < max(1, in_flight):
                    chunk = chunks[next_chunk]
                    future = self._stub.PredictBatch.future(pb.PredictBatchRequest(structures=chunk),
                                                            timeout=self._deadline(timeout), metadata=self._metadata,
                                                            wait_for_ready=False)
                    pending.append((chunk, future))
                    next_chunk += 1
                chunk, future = pending.pop(0)
                try:
                    response = future.result()
                except grpc.RpcError as err:
                    if not self.retry.retries(err.code()):
                        for _, f in pending:
                            f.cancel()
                        raise error_from_rpc(err, self.target) from None
                    response = self._unary("PredictBatch", pb.PredictBatchRequest(structures=chunk), timeout)
                results.extend(result_from_response(r) for r in response.results)
                bar.update(len(chunk))
        finally:
            bar.close()
        return results

    def session(self, *, model: Optional[str] = None, head: Optional[str] = None, outputs=None,
                timeout=None) -> "Session":
        """A :class:`Session`: one PredictStream kept open across calls (MD), reopened after failures."""
        return Session(self, model=model, head=head, outputs=outputs, timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"


class _Stream:
    """One open PredictStream call fed from a queue."""

    def __init__(self, client: Client):
        self.requests: "queue.SimpleQueue" = queue.SimpleQueue()

        def feed(q=self.requests):
            while True:
                item = q.get()
                if item is None:
                    return
                yield item

        self.call = client._stub.PredictStream(feed(), metadata=client._metadata, wait_for_ready=False)
        self.timed_out = False

    def ask(self, request, timeout: Optional[float]):
        self.requests.put(request)
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self._expire)
            timer.daemon = True
            timer.start()
        try:
            return next(self.call)
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self):
        self.timed_out = True
        self.call.cancel()

    def close(self):
        self.requests.put(None)
        self.call.cancel()


class Session:
    """One bidirectional PredictStream kept open across :meth:`predict` calls (an MD loop).

    The stream is one HTTP/2 stream, so with several replicas a session stays
    on one replica.  If the stream breaks (the replica died, drains or
    restarted, connection lost) the request is resent on a new stream, which
    gRPC opens on a healthy replica, with the client's retry policy: no step is
    lost and its numbers are the same.  Once the retries are spent
    :class:`~macefield_client.ServerUnavailable` is raised.  Each
    step has the client's per-call timeout.  Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, client: Client, *, model=None, head=None, outputs=None, timeout=None):
        self.client = client
        self.model = model
        self.head = head
        self.outputs = outputs
        self.timeout = client._deadline(timeout)
        self._stream: Optional[_Stream] = None
        self._ids = itertools.count()
        self.reconnects = 0  #: streams reopened after a failure
        self.closed = False

    def predict(self, structure: StructureLike, electric_field=(0.0, 0.0, 0.0), outputs=None, model=None,
                head=None) -> Result:
        """Like :meth:`Client.predict`, over the session's stream."""
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
            fresh = self._stream is None
            if fresh:
                self._stream = _Stream(self.client)
            stream = self._stream
            try:
                response = stream.ask(request, self.timeout)
            except StopIteration:  # the server ended the stream without an error
                self._drop()
                err = None
            except grpc.RpcError as exc:
                self._drop()
                if stream.timed_out:
                    raise RequestTimeout(f"MACE-Field server at {self.client.target}: no answer within "
                                         f"{self.timeout} s (session step {request_id})",
                                         target=self.client.target, code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
                if not fresh and not stale_retried and exc.code() in STALE_STREAM_CODES:
                    stale_retried = True  # a stream that worked before broke oddly: resend once on a new one
                    self.reconnects += 1
                    continue
                if not self.client.retry.retries(exc.code()):
                    raise error_from_rpc(exc, self.client.target, attempts=attempt) from None
                err = exc
            else:
                if response.request_id != request_id:  # never expected: answers come in order
                    self._drop()
                    raise MACEFieldError(f"session out of step: sent {request_id}, got {response.request_id}",
                                         target=self.client.target)
                return result_from_response(response)
            delay = next(delays, None)
            if delay is not None:
                self.client._notify(attempt, delay, err)
            if delay is None:
                if err is None:
                    raise ServerUnavailable(f"MACE-Field server at {self.client.target} ended the stream "
                                            f"after {attempt} attempts", target=self.client.target)
                raise error_from_rpc(err, self.client.target, attempts=attempt) from None
            time.sleep(delay)
            self.reconnects += 1

    def _drop(self):
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._drop()
        self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
