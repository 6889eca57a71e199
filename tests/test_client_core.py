"""The client core: Client and AsyncClient run one shared call logic and behave the same; the MD interfaces share
one extrapolation watch that takes the model's threshold from ListModels.

A real server (BackgroundServer) answers every call.  For the failure cases a MaceField service in front of it
forwards each PredictBatch and fails chosen chunks on purpose (the way a replica that restarts, or refuses a
structure, answers): the real part under test is how each client reacts.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import quartz_like, random_field_model
from macefield_client import (
    AsyncClient,
    Client,
    ExtrapolationWarning,
    InvalidRequest,
    RetryPolicy,
)
from macefield_client.md.ipi import BOHR, IPIDriver, Template
from macefield_client.md.monitor import ExtrapolationMonitor
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as pb_grpc
from macefield_server.engine import predict
from macefield_server.engine.extrapolation import attach, statistics_of
from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ServerConfig
from macefield_server.serving.registry import ServedModel
from macefield_server.training.calibration import calibrate
from serving import wait_for

RETRY = RetryPolicy(attempts=3, initial_backoff=0.05, max_backoff=0.1)
N = 5  # structures of predict_many, one per chunk (batch_size=1), two chunks in flight


@pytest.fixture(scope="module")
def served():
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    with BackgroundServer(config, [ServedModel("tiny", random_field_model(heads=("sio2",), seed=3), "sio2")]) as srv:
        yield f"127.0.0.1:{srv.port}"


class Faulty(pb_grpc.MaceFieldServicer):
    """Forwards to the real server at ``target``; fails the PredictBatch chunk whose first request id is in
    ``fail`` (``{id: (status code, times)}``) and holds the chunks in ``hold`` until the client cancels them.

    ``after``: a failing chunk waits (up to 10 s) until that held chunk has arrived, so the failure finds it
    in flight.  Records the first request id of every chunk received and of every chunk the client cancelled.
    """

    def __init__(self, target: str, fail: dict, hold: tuple = (), after: str = ""):
        self.stub = pb_grpc.MaceFieldStub(grpc.insecure_channel(target))
        self.fail = dict(fail)
        self.hold, self.after = set(hold), after
        self.arrived = {i: threading.Event() for i in self.hold}
        self.received, self.cancelled = [], []
        self.lock = threading.Lock()

    def ListModels(self, request, context):
        return self.stub.ListModels(request, timeout=30)

    def PredictBatch(self, request, context):
        first = request.structures[0].request_id
        with self.lock:
            self.received.append(first)
            code, times = self.fail.get(first, (None, 0))
            if times:
                self.fail[first] = (code, times - 1)
        if first in self.hold:
            self.arrived[first].set()
            end = time.monotonic() + 30.0
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
            with self.lock:
                self.cancelled.append(first)
            return pb.PredictBatchResponse()
        if times:
            if self.after:
                self.arrived[self.after].wait(10.0)
            context.abort(code, f"injected {code.name} for chunk {first}")
        return self.stub.PredictBatch(request, timeout=60)


def faulty_server(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_MaceFieldServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def predict_many(target: str, asynchronous: bool, structures, notices: list):
    """``predict_many`` over ``target`` with the sync or the asyncio client (same arguments)."""
    kwargs = {"electric_field": (0.0, 0.0, 0.01), "outputs": ["forces"], "batch_size": 1, "in_flight": 2}
    def hook(*args):
        notices.append(args[1:3])

    if not asynchronous:
        with Client(target, retry=RETRY, timeout=60, on_retry=hook) as client:
            return client.predict_many(structures, **kwargs)

    async def run():
        async with AsyncClient(target, retry=RETRY, timeout=60, on_retry=hook) as client:
            return await client.predict_many(structures, **kwargs)

    return asyncio.run(run())


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_retryable_failure_resends_only_the_failed_chunk(served, asynchronous):
    structures = [quartz_like(seed=s) for s in range(N)]
    with Client(served, timeout=60) as client:
        expected = client.predict_many(structures, electric_field=(0.0, 0.0, 0.01), outputs=["forces"])
    servicer = Faulty(served, {"2": (grpc.StatusCode.UNAVAILABLE, 1)})
    server, target = faulty_server(servicer)
    notices = []
    try:
        results = predict_many(target, asynchronous, structures, notices)
    finally:
        server.stop(None)
    assert sorted(servicer.received) == ["0", "1", "2", "2", "3", "4"]  # chunk 2 twice, every other once
    assert notices == [(1, RETRY.attempts)]  # the retry was announced, once
    assert [r.request_id for r in results] == [str(i) for i in range(N)]  # input order
    for r, ref in zip(results, expected):
        np.testing.assert_allclose(r.forces, ref.forces, rtol=1e-9, atol=1e-12)  # other batch mates: ulps


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_non_retryable_failure_cancels_the_chunks_in_flight_and_sends_no_more(served, asynchronous):
    structures = [quartz_like(seed=s) for s in range(N)]
    # chunk 1 is refused once chunk 2 is in flight (chunk 0 answered, freeing its place): 2 must be cancelled
    servicer = Faulty(served, {"1": (grpc.StatusCode.INVALID_ARGUMENT, 1)}, hold=("2",), after="2")
    server, target = faulty_server(servicer)
    notices = []
    try:
        with pytest.raises(InvalidRequest, match="injected INVALID_ARGUMENT for chunk 1") as info:
            predict_many(target, asynchronous, structures, notices)
        assert target in str(info.value)
        wait_for(lambda: servicer.cancelled == ["2"], timeout=30, what="chunk 2 cancelled")
        time.sleep(0.3)  # a chunk sent after the failure would arrive by now
    finally:
        server.stop(None)
    assert sorted(servicer.received) == ["0", "1", "2"] and notices == []


# ------------------------------------------------------------------ extrapolation watch
@pytest.fixture(scope="module")
def calibrated():
    """A small model with statistics for head sio2, its threshold set to half the largest grade of
    :func:`probe` (so the model's threshold, not the contract's 1, decides what is flagged)."""
    model = random_field_model(heads=("sio2",), seed=5)
    attach(model, calibrate(model, [quartz_like(rattle=0.05, seed=s) for s in range(8)], "sio2"))
    grade = float(predict(model, [probe()], heads="sio2")[0]["extrapolation_max"])
    statistics_of(model).threshold = 0.5 * grade
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    with BackgroundServer(config, [ServedModel("calibrated", model, "sio2")]) as srv:
        yield f"127.0.0.1:{srv.port}", model, 0.5 * grade


def probe():
    return quartz_like(rattle=0.3, seed=21)


def test_the_monitor_takes_the_models_threshold_from_list_models(calibrated):
    target, model, threshold = calibrated
    ref = predict(model, [probe()], heads="sio2")[0]
    with Client(target, timeout=60) as client:
        assert client.list_models().models[0].extrapolation_threshold == pytest.approx(threshold)
        r = client.predict(probe())
        monitor = ExtrapolationMonitor(client, tell=lambda message: told.append(message))
        told = []
        grade, above = monitor.check(r, step=3)
        assert monitor.threshold_for("calibrated") == pytest.approx(threshold)
        assert above == int(np.sum(ref["extrapolation"] > threshold)) > 0 and grade == pytest.approx(2 * threshold)
        assert len(told) == 1 and told[0].startswith("step 3: extrapolation grade") and f"> {threshold:g}" in told[0]
        monitor.check(r)
        assert monitor.flagged == 2 and len(told) == 1  # told once, counted every time
        # an explicit threshold wins over the model's
        fixed = ExtrapolationMonitor(client, threshold=4 * threshold, tell=told.append)
        assert fixed.check(r)[1] == 0 and fixed.flagged == 0

        # the ASE calculator and the i-PI driver watch with the same monitor, at the model's threshold
        from macefield_client.ase import MACEFieldCalculator

        atoms = probe()
        atoms.calc = MACEFieldCalculator(client=client)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atoms.get_potential_energy()
        flagged = [str(w.message) for w in caught if issubclass(w.category, ExtrapolationWarning)]
        assert len(flagged) == 1 and f"> {threshold:g}" in flagged[0] and atoms.calc.extrapolation_flagged == 1
        atoms.calc.close()

        driver = IPIDriver(client, Template.from_atoms(atoms), extras=())
        try:
            driver.compute((atoms.cell.array.T / BOHR)[None], (atoms.positions / BOHR)[None])
            assert driver.extrapolating == 1 and driver.monitor.threshold_for("calibrated") == pytest.approx(threshold)
        finally:
            driver.close()
