"""What each failure is answered with: the service's exception -> gRPC status mapping, on its own and through
MaceFieldService.Predict (a fake call context, a real dispatcher and batcher over a fake backend; no server)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import quartz_like
from fake_backend import FakeBackend, sample
from macefield_server.engine.predict import NonFiniteResult
from macefield_server.serving import batcher as batcher_module
from macefield_server.serving import validation as validation_module
from macefield_server.serving.batcher import (
    Batcher,
    DeadlinePassed,
    DoesNotFit,
    QueueFull,
    Stopped,
)
from macefield_server.serving.config import BatchingConfig, ServerConfig
from macefield_server.serving.dispatcher import Dispatcher
from macefield_server.serving.metrics import Metrics
from macefield_server.serving.registry import ModelRegistry, ServedModel
from macefield_server.serving.service import MaceFieldService, ServiceError, _error_for
from macefield_server.serving.validation import InvalidRequest, TooLarge
from serving import request_for

C = grpc.StatusCode

#: every failure the serving layer raises on purpose, the code it is answered with, and the message
MAPPING = [
    (InvalidRequest("positions", "non-finite value nan at index 4"), C.INVALID_ARGUMENT,
     "positions: non-finite value nan at index 4"),
    (TooLarge("positions", "needs about 3 GiB"), C.RESOURCE_EXHAUSTED, "positions: needs about 3 GiB"),
    (QueueFull("queue full: 3 structures"), C.RESOURCE_EXHAUSTED, "queue full: 3 structures"),
    (DoesNotFit("a structure of 27 atoms does not fit"), C.RESOURCE_EXHAUSTED, "a structure of 27 atoms does not fit"),
    (DeadlinePassed("deadline passed after 0.4 s in queue"), C.DEADLINE_EXCEEDED,
     "deadline passed after 0.4 s in queue"),
    (Stopped("server stopped before this request was computed"), C.UNAVAILABLE,
     "server stopped before this request was computed"),
    (NonFiniteResult("energy is nan"), C.INTERNAL, "non-finite result: energy is nan"),
    (ServiceError(C.UNAVAILABLE, "server is shutting down"), C.UNAVAILABLE, "server is shutting down"),
]


@pytest.mark.parametrize("exc, code, message", MAPPING, ids=[type(e).__name__ for e, _, _ in MAPPING])
def test_each_failure_has_its_status_code(exc, code, message, caplog):
    caplog.set_level(logging.WARNING, logger="macefield.service")
    error = _error_for(exc, ["r1"])
    assert isinstance(error, ServiceError)
    assert (error.code, str(error)) == (code, message)
    assert not caplog.records  # expected failures are not logged as internal errors here


def test_a_bug_is_internal_and_logged_with_the_request_ids(caplog):
    caplog.set_level(logging.WARNING, logger="macefield.service")
    ids = [f"id{i}" for i in range(20)] + ["x" * 1000]
    error = _error_for(KeyError("forces"), ids)
    assert error.code == C.INTERNAL and str(error) == "internal error: KeyError: 'forces'"
    (record,) = caplog.records
    assert "id0" in record.getMessage() and "id15" in record.getMessage()
    assert "id16" not in record.getMessage()  # at most 16 ids in a log line
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_every_serving_exception_is_mapped():
    """A new exception class in the batcher or the validation module must get a deliberate status code."""
    defined = {obj for module in (batcher_module, validation_module) for _, obj in inspect.getmembers(module)
               if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__}
    mapped = {type(exc) for exc, _, _ in MAPPING}
    assert defined and defined <= mapped, sorted(c.__name__ for c in defined - mapped)


# ------------------------------------------------------------------------- through MaceFieldService.Predict
class Aborted(Exception):
    pass


class FakeContext:
    """The parts of grpc.aio.ServicerContext that Predict uses."""

    def __init__(self, remaining=None):
        self.remaining = remaining
        self.code = self.details = None

    def time_remaining(self):
        return self.remaining

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code)


class Answering(FakeBackend):
    """The fake backend answering energy and forces under their contract names and shapes."""

    def __init__(self, **kwargs):
        super().__init__(name="tiny", heads=("sio2", "other"), **kwargs)

    def evaluate(self, batch, items):
        raw = super().evaluate(batch, items)
        return [r if isinstance(r, Exception) else
                {"energy": r["energy"], "forces": np.full((it.n_atoms, 3), 0.25)} for r, it in zip(raw, items)]


@pytest.fixture(scope="module")
def registry(two_head_model):
    return ModelRegistry([ServedModel("tiny", copy.deepcopy(two_head_model), "sio2")])  # never evaluated


async def predict(registry, request, backend=None, context=None, loaded=True, drain=False, **batching):
    """(response or None, context, metrics) of one Predict through a service over ``backend``."""
    metrics = Metrics()
    config = ServerConfig(batching=BatchingConfig(**{"max_wait_ms": 1, **batching}))
    service = MaceFieldService(config, metrics)
    prep = ThreadPoolExecutor(max_workers=1)
    backend = backend or Answering()
    batcher = Batcher(backend, config.batching, metrics, prep)
    batcher.start()
    context = context or FakeContext()
    try:
        if loaded:
            service.dispatcher = Dispatcher(registry, {"tiny": batcher}, config.limits, prep)
        if drain:
            service.begin_drain()
        try:
            return await service.Predict(request, context), context, metrics
        except Aborted:
            return None, context, metrics
    finally:
        await batcher.close()
        prep.shutdown()


def code_count(metrics, code, model="tiny"):
    return sample(metrics, "macefield_requests_total", method="Predict", model=model, code=code)


def test_predict_answers_ok_with_the_backend_results(registry):
    response, context, metrics = asyncio.run(predict(registry, request_for(quartz_like(), request_id="ok",
                                                                              outputs=["forces"])))
    assert context.code is None
    assert (response.request_id, response.model, response.head, response.n_atoms) == ("ok", "tiny", "sio2", 9)
    assert response.energy == -1.5 * 9 and list(response.forces) == [0.25] * 27
    assert response.timing.batch_structures == 1
    assert code_count(metrics, "OK") == 1


@pytest.mark.parametrize("case, code, words", [
    ("invalid field", C.INVALID_ARGUMENT, "electric_field: "),
    ("queue full", C.RESOURCE_EXHAUSTED, "exceed the queue size"),
    ("too large alone", C.RESOURCE_EXHAUSTED, "9 atoms does not fit in memory"),
    ("non-finite", C.INTERNAL, "non-finite result: energy is nan for bad"),
    ("deadline", C.DEADLINE_EXCEEDED, "deadline passed"),
    ("loading", C.UNAVAILABLE, "models are loading"),
    ("draining", C.UNAVAILABLE, "shutting down"),
])
def test_predict_failures_are_answered_with_their_code(registry, case, code, words):
    request = request_for(quartz_like(), request_id="bad", outputs=["forces"])
    kwargs = {}
    if case == "invalid field":
        request.electric_field[0] = float("nan")
    elif case == "queue full":
        kwargs["max_queue"] = 0
    elif case == "too large alone":
        kwargs["backend"] = Answering(oom_above=5)
    elif case == "non-finite":
        kwargs["backend"] = Answering(non_finite=["bad"])
    elif case == "deadline":
        kwargs.update(context=FakeContext(remaining=0.05), max_wait_ms=60_000)
    elif case == "loading":
        kwargs["loaded"] = False
    elif case == "draining":
        kwargs["drain"] = True
    response, context, metrics = asyncio.run(predict(registry, request, **kwargs))
    assert response is None
    assert context.code == code, (context.code, context.details)
    assert words in context.details, context.details
    model = "-" if case == "loading" else "tiny"
    assert code_count(metrics, code.name, model=model) == 1
