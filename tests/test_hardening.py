"""Hardening against hostile clients: nothing is read before authentication, echoes are bounded,
tasks of a stream are never orphaned, and the fuzzer never sees a non-finite number answered OK.

(The memory budget, far-from-origin exactness and the retry budget have their own test files:
test_memory_budget.py, test_precision.py, test_client_restart.py.)
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from conftest import quartz_like, random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import ServerProcess, lists_models, metric, request_for, rss_mb, save_tiny_model, wait_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BatchingConfig, ServerConfig
from macefield_server.serving.registry import ServedModel

TOKEN = "hardening-token-0123456789"


def test_unauthenticated_flood_reads_no_request_bodies(tmp_path):
    """32 concurrent unauthenticated 55 MB Predict calls on one connection: all UNAUTHENTICATED, and the server
    grows by transport buffers only (reading the bodies before the token check cost +1.4 GB here)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    proc = ServerProcess(["--model", str(save_tiny_model(tmp_path / "tiny.pt")), "--auth-token-file", str(tokens)])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}", options=[("grpc.max_send_message_length", 2**27)])
        good = (("authorization", f"Bearer {TOKEN}"),)
        stub = rpc.MaceFieldStub(channel)

        wait_for(lambda: lists_models(stub, metadata=good), timeout=180, what="models loaded")
        n = 2_300_000  # atoms: 6.9 M position doubles, a 55 MB message (under the 64 MiB receive limit)
        body = pb.PredictRequest(atomic_numbers=[14] * n, positions=np.zeros(3 * n).tolist()).SerializeToString()
        assert 50 * 2**20 < len(body) < 64 * 2**20
        raw = channel.unary_unary("/macefield.v1.MaceField/Predict")  # bytes as they are: serialized once
        before = rss_mb(proc.proc.pid)
        codes, peak = [], [before]

        def call():
            try:
                raw(body, timeout=120, metadata=(("authorization", "Bearer wrong"),))
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)

        threads = [threading.Thread(target=call) for _ in range(32)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak.append(rss_mb(proc.proc.pid))
            time.sleep(0.02)
        assert codes == ["UNAUTHENTICATED"] * 32
        growth = max(peak) - before
        assert growth < 200, f"server grew by {growth:.0f} MB during the flood"
        # an authenticated caller is served right after
        assert stub.Predict(request_for(quartz_like()), timeout=60, metadata=good).n_atoms == 9
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(max_wait_ms=2))
    with BackgroundServer(config, [ServedModel("tiny", random_field_model(heads=("sio2", "other")), "sio2")]) as srv:
        yield srv


def test_huge_user_values_are_clipped_in_errors(server):
    """A 1 MB head, model, output name or request id is refused INVALID_ARGUMENT naming the field, and the
    message stays short (echoing it whole turned the answer into RESOURCE_EXHAUSTED)."""
    stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    huge = "x" * 2**20
    for field, mutate in (("head", lambda r: setattr(r, "head", huge)),
                          ("model", lambda r: setattr(r, "model", huge)),
                          ("outputs", lambda r: r.outputs.append(huge)),
                          ("request_id", lambda r: setattr(r, "request_id", huge))):
        request = request_for(quartz_like())
        mutate(request)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}: ") and len(info.value.details()) < 1000, field
        with pytest.raises(grpc.RpcError) as info:
            list(stub.PredictStream(iter([request]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 1000
    # names within the bounds but unknown: echoed, clipped to 64 characters with an ellipsis
    request = request_for(quartz_like(), head="h" * 200)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert "'" + "h" * 61 + "...'" in info.value.details()
    request = request_for(quartz_like())
    request.outputs.extend(["forces"] * 40)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.details().startswith("outputs: 40 entries, more than 32")


def test_failing_pipelined_streams_leave_no_orphaned_tasks(tmp_path):
    """500 streams pipelining requests into a queue that cannot take them: every stream ends
    RESOURCE_EXHAUSTED, no "Task exception was never retrieved" in the log, every message read is accounted
    for (answered, failed or cancelled unanswered)."""
    config = tmp_path / "serve.yaml"
    config.write_text(f"""
models:
  - name: tiny
    path: {save_tiny_model(tmp_path / "tiny.pt")}
batching:
  max_queue: 2
  max_wait_ms: 2000
  stream_window: 4
""")
    proc = ServerProcess(["--config", str(config)])
    try:
        # 5 connections x 100 streams (the server's max_concurrent_streams per connection)
        stubs = [rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{proc.port}",
                                                         options=[("grpc.use_local_subchannel_pool", 1)]))
                 for _ in range(5)]
        wait_for(lambda: all(lists_models(stub) for stub in stubs), timeout=180, what="models loaded")
        requests = [request_for(quartz_like(seed=i % 5), outputs=["forces"], request_id=f"m{i}") for i in range(6)]
        calls = [stubs[k % 5].PredictStream(iter(requests), timeout=120) for k in range(500)]
        codes = []
        for call in calls:
            try:
                for _ in call:
                    pass
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes.count("RESOURCE_EXHAUSTED") > 100
        wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="PredictStream") == 0,
                 what="streams finished")
        read = metric(proc.metrics_port, "macefield_stream_messages_total", event="read")
        settled = sum(metric(proc.metrics_port, "macefield_stream_messages_total", event=e)
                      for e in ("answered", "failed", "cancelled"))
        assert read > 0 and settled == read, (read, settled)
        proc.terminate()
        assert proc.wait(60) == 0
        log = proc.stderr()
        assert "Task exception was never retrieved" not in log and "Traceback" not in log
    finally:
        proc.kill()


def test_validating_large_structures_does_not_stall_other_clients():
    """A PredictBatch of 30 cells of 4608 atoms is validated (neighbour pairs counted exactly: the small memory
    budget asks for it) on the prep thread: ListModels stays quick meanwhile.  The batch is then refused."""
    from macefield_client.structures import alpha_quartz
    from macefield_server.serving.config import LimitsConfig

    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(max_wait_ms=2),
                          limits=LimitsConfig(max_message_bytes=4 * 2**20, memory_budget="300MB",
                                              max_structures_per_request=64))
    with BackgroundServer(config, [ServedModel("tiny", random_field_model(heads=("sio2", "other")), "sio2")]) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = rpc.MaceFieldStub(channel)
        big = request_for(alpha_quartz(cell="pbe", repeat=(8, 8, 8)), outputs=["forces"])
        assert len(big.atomic_numbers) == 4608
        batch = pb.PredictBatchRequest(structures=[big] * 30)
        assert batch.ByteSize() < 4 * 2**20
        call = stub.PredictBatch.future(batch, timeout=120)
        worst, t_end = 0.0, time.monotonic() + 60
        while not call.done() and time.monotonic() < t_end:
            t0 = time.monotonic()
            stub.ListModels(pb.ListModelsRequest(), timeout=30)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the memory budget
        assert worst < 0.5, f"ListModels took {worst:.2f} s while the batch was validated"


def test_an_answer_over_the_message_limit_is_refused_before_computing():
    from macefield_server.serving.config import LimitsConfig

    config = ServerConfig(port=0, metrics_port=0, limits=LimitsConfig(max_message_bytes=64 * 1024))
    with BackgroundServer(config, [ServedModel("tiny", random_field_model(heads=("sio2", "other")), "sio2")]) as srv:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        batch = pb.PredictBatchRequest(structures=[request_for(quartz_like(repeat=(2, 2, 2)), outputs=["forces"])] * 20)
        assert batch.ByteSize() < 64 * 1024
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictBatch(batch, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("structures: the answer would be about")
        # nothing was computed (warm-up is not counted)
        assert metric(srv.metrics_port, "macefield_batch_structures_count") == 0
