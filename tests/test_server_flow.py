"""Flow control over real gRPC: deadlines, cancellation, a full queue, out-of-memory splits."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
import torch
from conftest import quartz_like, random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import tiny_server, stub_to, assert_matches, metric, request_for, wait_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.engine_backend import EngineBackend
from macefield_server.serving.config import BatchingConfig, ServerConfig
from macefield_server.engine import predict
from macefield_server.serving.registry import ServedModel

WAIT_MS = 2500  # batches close only after this long unless full: requests stay queued meanwhile


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=7)


@pytest.fixture(scope="module")
def slow_server(model):
    with tiny_server(model, batching=BatchingConfig(max_wait_ms=WAIT_MS, max_queue=3)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(slow_server):
    with stub_to(slow_server.port) as s:
        yield s


def depth(server) -> float:
    return metric(server.metrics_port, "macefield_queue_depth", model="tiny")


def computed(server) -> float:
    return metric(server.metrics_port, "macefield_batch_structures_sum", model="tiny")


def request(i: int, outputs=("forces",)):
    return request_for(quartz_like(seed=i), field=(0.0, 0.01 * i, 0.0), outputs=list(outputs), request_id=f"r{i}")


def test_full_queue_is_resource_exhausted_at_once_and_cancel_frees_a_slot(model, slow_server, stub):
    wait_for(lambda: depth(slow_server) == 0, what="empty queue")
    calls = [stub.Predict.future(request(i), timeout=60) for i in range(3)]
    wait_for(lambda: depth(slow_server) == 3, what="3 queued")

    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request(3), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.details()
    assert not any(c.done() for c in calls), "refused at once: the queued calls had not moved yet"
    with pytest.raises(grpc.RpcError) as info:  # a batch call is refused whole
        stub.PredictBatch(pb.PredictBatchRequest(structures=[request(4)]), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    cancelled_before = metric(slow_server.metrics_port, "macefield_dropped_total", reason="cancelled")
    assert calls[0].cancel()
    wait_for(lambda: depth(slow_server) == 2, what="the cancelled call to leave the queue")
    assert metric(slow_server.metrics_port, "macefield_dropped_total", reason="cancelled") == cancelled_before + 1
    late = stub.Predict.future(request(5), timeout=60)  # the freed slot takes a new request

    for i, call in [(1, calls[1]), (2, calls[2]), (5, late)]:
        atoms = quartz_like(seed=i)
        assert_matches(call.result(), predict(model, [atoms], electric_fields=[0.0, 0.01 * i, 0.0],
                                              outputs=["forces"])[0])
    with pytest.raises(grpc.FutureCancelledError):
        calls[0].result()
    wait_for(lambda: depth(slow_server) == 0, what="empty queue")


def test_cancelled_call_is_not_computed(slow_server, stub):
    wait_for(lambda: depth(slow_server) == 0, what="empty queue")
    before = computed(slow_server)
    call = stub.Predict.future(request(6), timeout=60)
    wait_for(lambda: depth(slow_server) == 1, what="queued")
    call.cancel()
    wait_for(lambda: depth(slow_server) == 0, what="dequeued")
    # a probe of the same output tier: had the cancelled request stayed queued, it would share the probe's batch
    probe = stub.Predict(request(9), timeout=60)
    assert probe.timing.batch_structures == 1
    assert computed(slow_server) == before + 1  # the probe alone was ever computed


def test_deadline_passed_in_queue_is_not_computed(slow_server, stub):
    wait_for(lambda: depth(slow_server) == 0, what="empty queue")
    before = computed(slow_server)
    dropped = metric(slow_server.metrics_port, "macefield_dropped_total")
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request(7), timeout=0.4)  # the batch would close only after WAIT_MS
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: metric(slow_server.metrics_port, "macefield_dropped_total") == dropped + 1, what="drop count")
    assert depth(slow_server) == 0
    # a request with enough time left still works, and its batch holds it alone: the expired one was not computed
    probe = stub.Predict(request(8), timeout=60)
    assert probe.n_atoms == 9 and probe.timing.batch_structures == 1
    assert computed(slow_server) == before + 1


def oom_above(max_atoms: int):
    """The served engine, but running out of (simulated CUDA) memory above ``max_atoms`` per batch."""

    class OutOfMemoryAbove(EngineBackend):
        def run(self, batch, outputs):
            if sum(batch.n_atoms) > max_atoms:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected above {max_atoms} atoms)")
            return super().run(batch, outputs)

    return OutOfMemoryAbove


def test_out_of_memory_splits_the_batch_and_fails_only_what_does_not_fit(model, caplog):
    caplog.set_level(logging.DEBUG, logger="macefield")
    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(max_wait_ms=800))
    served = ServedModel("tiny", model, "sio2")
    # warm-up uses 8 atoms; quartz cells have 9 atoms: two fit (18), four do not (36)
    with BackgroundServer(config, [served], backend_factory=oom_above(20)) as srv:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        calls = [stub.Predict.future(request(i, ["forces", "born_charges"]), timeout=60) for i in range(4)]
        results = [c.result() for c in calls]
        assert max(r.timing.batch_structures for r in results) <= 2
        for i, r in enumerate(results):
            assert_matches(r, predict(model, [quartz_like(seed=i)], electric_fields=[0.0, 0.01 * i, 0.0],
                                      outputs=["forces", "born_charges"])[0])
        assert metric(srv.metrics_port, "macefield_oom_splits_total", model="tiny") >= 1

        big = request_for(quartz_like((3, 1, 1)), outputs=["forces"], request_id="too-big")  # 27 atoms alone
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(big, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "27 atoms" in info.value.details()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("too-big" in m and "RESOURCE_EXHAUSTED" in m for m in warnings), warnings
        batches = [json.loads(r.getMessage()) for r in caplog.records
                   if r.levelno == logging.DEBUG and r.getMessage().startswith('{"event": "batch"')]
        assert any(b["structures"] == 4 and b["passes"] == [2, 2] for b in batches), batches
        assert stub.Predict(request(9), timeout=60).n_atoms == 9  # still serving


def test_queue_is_bounded_in_atoms_too(model):
    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(max_wait_ms=1, max_queue_atoms=20))
    with BackgroundServer(config, [ServedModel("tiny", model, "sio2")]) as srv:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        with pytest.raises(grpc.RpcError) as info:  # 27 atoms can never be queued at once
            stub.PredictBatch(pb.PredictBatchRequest(structures=[request(i) for i in range(3)]), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "27 atoms" in info.value.details()
        assert len(stub.PredictBatch(pb.PredictBatchRequest(structures=[request(0), request(1)]),
                                     timeout=60).results) == 2


def test_lists_built_on_the_device_serve_what_predict_gives_and_refuse_overlaps_by_field(model):
    """``neighbour_search: device`` on a CPU model: the batch builds its lists after admission."""
    with tiny_server(model, batching=BatchingConfig(neighbour_search="device")) as srv, stub_to(srv.port) as stub:
        outputs = ["forces", "stress", "born_charges"]
        answer = stub.Predict(request(1, outputs), timeout=60)
        assert_matches(answer, predict(model, [quartz_like(seed=1)], electric_fields=[0.0, 0.01, 0.0],
                                       outputs=outputs)[0])
        bad = quartz_like(seed=2)
        bad.positions[4] = bad.positions[3] + [0.1, 0.0, 0.0]
        call = pb.PredictBatchRequest(structures=[request(0), request_for(bad, outputs=["forces"])])
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictBatch(call, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("structures[1].positions: atoms 3 (")
        assert "closer than limits.min_distance" in info.value.details()
