"""Synchronous client: :class:`Client` (Predict, PredictBatch, ListModels) and :class:`Session` (PredictStream).

The request, retry and session logic is :mod:`macefield_client.core.calls`, shared with the asyncio client;
this module is its blocking transport.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from typing import Any, Self

import grpc

from ..contract.messages import StructureLike
from ..proto.macefield.v1 import macefield_pb2 as pb
from . import calls as plans
from .calls import (
    DEFAULT_BATCH_SIZE,
    STALE_STREAM_CODES,
    ClientBase,
    Plan,
    SessionState,
)
from .results import Result, ServerInfo


class _Blocking:
    """The blocking :class:`~macefield_client.core.calls.Transport` over one stub."""

    def __init__(self, stub, metadata):
        self.stub, self.metadata = stub, metadata

    def unary(self, method: str, request: Any, timeout: float | None) -> Any:
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata, wait_for_ready=False)

    def start(self, method: str, request: Any, timeout: float | None) -> grpc.Future:
        return getattr(self.stub, method).future(request, timeout=timeout, metadata=self.metadata,
                                                 wait_for_ready=False)

    def wait(self, handle: grpc.Future) -> Any:
        return handle.result()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def open_stream(self) -> _Stream:
        return _Stream(self.stub, self.metadata)


class _Stream:
    """One open PredictStream call fed from a queue (a :class:`~macefield_client.core.calls.Stream`)."""

    def __init__(self, stub, metadata):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()

        def feed(q=self.requests):
            while True:
                item = q.get()
                if item is None:
                    return
                yield item

        self.call = stub.PredictStream(feed(), metadata=metadata, wait_for_ready=False)
        self.timed_out = False

    def ask(self, request: pb.PredictRequest, timeout: float | None) -> pb.PredictResponse | None:
        self.requests.put(request)
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self._expire)
            timer.daemon = True
            timer.start()
        try:
            return next(self.call)
        except StopIteration:  # the server ended the stream with OK
            return None
        except grpc.RpcError:
            if self.timed_out:
                raise TimeoutError(f"no answer within {timeout} s") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        self.timed_out = True
        self.call.cancel()

    def cancel(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class Client(ClientBase):
    """Blocking client for a MACE-Field server.

    Args:
        target: ``host:port`` (default ``$MACEFIELD_SERVER`` or ``127.0.0.1:50051``), or
            several replicas: a list of ``host:port``, a comma-separated string of
            them, or a gRPC target (``dns:///name:port``, ``ipv4:a:port,b:port``).
            Calls are spread over the replicas by gRPC's ``round_robin`` policy,
            only to replicas whose health says SERVING (docs/scaling.md).
        tls: None (``$MACEFIELD_TLS_CA`` / ``$MACEFIELD_TLS_CERT`` / ``$MACEFIELD_TLS_KEY``
            when set, else plaintext), False (plaintext), True (TLS, system roots), a CA
            file path or PEM bytes, a :class:`TLSConfig` (CA plus client certificate and
            key for mutual TLS), or a ``grpc.ChannelCredentials``.
        token: bearer token sent as ``authorization: Bearer <token>`` (None:
            ``$MACEFIELD_TOKEN``; "": none); a refused token raises
            :class:`~macefield_client.AuthenticationError`.
        timeout: per-call deadline in seconds (None: 120 s; ``float("inf")``: none).
        retry: :class:`RetryPolicy`, or an int number of retries (0: none).
            Only UNAVAILABLE is retried (these calls are idempotent), and
            CANCELLED from a server shutting down; with several replicas a
            retry goes to another one.
        options: extra gRPC channel options.
        on_retry: called before each retry as ``on_retry(target, attempt,
            attempts, delay_s, details)`` (the CLI prints "waiting for server").
        tls_server_name: the host name the server certificates are checked
            against (sent as the calls' authority; None: ``$MACEFIELD_TLS_SERVER_NAME``);
            needed for TLS with a list of replicas, whose certificates must all carry
            this one name (docs/scaling.md).
        health_check: gRPC client-side health checking (only replicas whose
            ``macefield.v1.MaceField`` health says SERVING get calls).  None:
            on for a target naming several replicas (an address list, a
            ``dns:`` name), off for one ``host:port``; False for a proxy
            reached by a ``dns:`` name, True for replicas behind one plain
            name that resolves to all of them.

    Environment variables (``core/channel.py``, :data:`~macefield_client.core.channel.ENVIRONMENT`)
    fill only the arguments not given.  Connection failures raise
    :class:`~macefield_client.ServerUnavailable` naming the target once the
    retries are spent.  Use as a context manager or call :meth:`close`.
    """

    def _transport(self) -> _Blocking:
        return _Blocking(self._stub, self.calls.metadata)

    def perform(self, plan: Plan) -> Any:
        """Run a plan of :mod:`macefield_client.core.calls` on this client (what :class:`Session` uses)."""
        return plans.run(plan, self._io)

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.25) -> ServerInfo:
        """Block until the server answers ListModels (models loaded and warm) or ``timeout`` s pass.

        For scripts that start a server and then use it.  Polls every ``poll`` s.  Returns the
        server info; raises :class:`~macefield_client.ServerUnavailable` naming the target after
        ``timeout``, or at once for an error other than UNAVAILABLE (e.g. a refused token).
        """
        return self.perform(plans.wait_ready(self.calls, timeout, poll))

    def list_models(self, timeout: float | None = None) -> ServerInfo:
        """Models, heads, elements, units and the server's limits (ListModels); ``timeout`` in s."""
        return self.perform(plans.list_models(self.calls, timeout))

    info = list_models

    def predict(self, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                model: str | None = None, head: str | None = None, *, timeout: float | None = None,
                request_id: str = "", allow_unseen_elements: bool = False) -> Result:
        """One structure (ase.Atoms or a mapping of arrays, positions and cell in A) in a uniform field (V/A).

        ``outputs``: None for the default outputs (energy, forces, stress, dipole, polarization:
        :data:`~macefield_client.contract.DEFAULT_OUTPUTS`, one first-derivative pass), ``"all"``
        (adds born_charges, polarizability, chi, eps_inf, volume: about 3x the cost), or names from
        :data:`~macefield_client.OUTPUTS`.  stress, polarization, chi and eps_inf only exist for
        structures periodic in all three directions.  ``timeout``: this call's deadline in s.

        ``head``: None lets the server choose the head trained on the structure's elements (the model's
        default head when several are); ``Result.head`` says which.  A structure with an element its head
        was never trained on is refused (:class:`~macefield_client.InvalidRequest` naming the elements and
        the heads that know them) unless ``allow_unseen_elements=True``.
        """
        return self.perform(plans.predict(self.calls, structure, electric_field, outputs, model, head,
                                          timeout=timeout, request_id=request_id,
                                          allow_unseen_elements=allow_unseen_elements))

    def predict_many(self, structures: Iterable[StructureLike], electric_field: Any = (0.0, 0.0, 0.0),
                     outputs: Any = None, model: str | None = None, head: str | None = None, *,
                     batch_size: int | None = None, in_flight: int = 2, progress: bool | None = False,
                     timeout: float | None = None, allow_unseen_elements: bool = False) -> list[Result]:
        """Many structures (screening): PredictBatch messages of ``batch_size``, ``in_flight`` of them pipelined.

        ``electric_field``: one (3,) field for all or one per structure (n, 3), V/A.
        ``batch_size``: None for the server's limit, at most 16.  ``progress``: show a progress
        bar (tqdm when installed; None: when stderr is a terminal).  Results are in input order.
        A chunk answered with a retried code (UNAVAILABLE) is sent again on its own; any other
        error cancels the chunks in flight and is raised.
        """
        return self.perform(plans.predict_many(self.calls, structures, electric_field, outputs, model, head,
                                               batch_size=batch_size, in_flight=in_flight, progress=progress,
                                               timeout=timeout, allow_unseen_elements=allow_unseen_elements))

    def session(self, *, model: str | None = None, head: str | None = None, outputs: Any = None,
                timeout: float | None = None, allow_unseen_elements: bool = False) -> Session:
        """A :class:`Session`: one PredictStream kept open across calls (MD), reopened after failures."""
        return Session(self, model=model, head=head, outputs=outputs, timeout=timeout,
                       allow_unseen_elements=allow_unseen_elements)

    def close(self) -> None:
        """Close the channel: calls in flight are cancelled, later calls fail.  Idempotent."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(SessionState):
    """One bidirectional PredictStream kept open across :meth:`predict` calls (an MD loop).

    The stream is one HTTP/2 stream, so with several replicas a session stays
    on one replica.  If the stream breaks (the replica died, drains or
    restarted, connection lost) the request is resent on a new stream, which
    gRPC opens on a healthy replica, with the client's retry policy: no step is
    lost and its numbers are the same.  Once the retries are spent
    :class:`~macefield_client.ServerUnavailable` is raised.  Each
    step has the client's per-call timeout (or ``timeout`` s).  Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, client: Client, *, model: str | None = None, head: str | None = None,
                 outputs: Any = None, timeout: float | None = None, allow_unseen_elements: bool = False):
        super().__init__(client.calls, model=model, head=head, outputs=outputs, timeout=timeout,
                         allow_unseen_elements=allow_unseen_elements)
        self.client = client

    def predict(self, structure: StructureLike, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                model: str | None = None, head: str | None = None) -> Result:
        """Like :meth:`Client.predict` (field in V/A), over the session's stream."""
        request = self.request(structure, electric_field, outputs, model, head)
        return self.client.perform(plans.session_step(self, request))

    def close(self) -> None:
        """End the stream; later steps raise :class:`~macefield_client.MACEFieldError`."""
        self.drop()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_BATCH_SIZE", "STALE_STREAM_CODES", "Client", "Session"]
