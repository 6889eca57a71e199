"""The real ``macefield-serve`` process: health transitions, reflection, SIGTERM drain, exit code."""

from __future__ import annotations

import grpc
import pytest
from conftest import quartz_like
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import ServerProcess, metric, request_for, save_tiny_model, wait_for

from macefield_server.engine import load_model, predict

GRACE_S = 20


@pytest.fixture
def server(tmp_path):
    path = save_tiny_model(tmp_path / "tiny.pt")
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"""
grace_s: {GRACE_S}
warmup_passes: 20       # a long warm-up: health must say NOT_SERVING meanwhile
models:
  - name: quartz
    path: {path}
    default_head: other
batching:
  max_wait_ms: 2000     # requests stay queued (in flight) until the batch closes
  max_structures: 64
"""
    )
    proc = ServerProcess(["--config", str(config)])
    yield proc, path
    proc.kill()


def health_status(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_transitions_and_sigterm_drain(server):
    proc, path = server
    channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}")
    stub = rpc.MaceFieldStub(channel)

    # listening, but the model is not loaded and warm yet
    assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request_for(quartz_like()), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    wait_for(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING, timeout=180, what="SERVING")
    assert health_status(channel, "macefield.v1.MaceField") == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"macefield.v1.MaceField", "grpc.health.v1.Health"} <= services
    # the served process keeps large freed blocks on the glibc heap (tune_cpu_allocator, on by default)
    assert "glibc allocator tuned for large short-lived blocks: True" in proc.stderr()
    (info_model,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert info_model.name == "quartz" and info_model.default_head == "other" and info_model.source == str(path)

    # requests in flight when SIGTERM arrives are finished
    cases = [quartz_like(seed=i) for i in range(4)]
    calls = [stub.Predict.future(request_for(a, field=(0.0, 0.0, 0.01 * i), outputs=["forces"], request_id=f"d{i}"),
                                 timeout=60) for i, a in enumerate(cases)]
    wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="Predict") == 4, what="4 in flight")
    proc.terminate()

    model = load_model(path)
    for i, (call, atoms) in enumerate(zip(calls, cases)):
        response = call.result()
        assert response.request_id == f"d{i}" and response.head == "other"
        ref = predict(model, [atoms], electric_fields=[0.0, 0.0, 0.01 * i], heads="other", outputs=["forces"])[0]
        assert response.energy == pytest.approx(float(ref["energy"]), rel=1e-10)

    # draining: no longer SERVING and new work refused (or the port already closed)
    def not_serving():
        try:
            return health_status(channel) != health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return True

    wait_for(not_serving, timeout=30, what="NOT_SERVING after SIGTERM")
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request_for(quartz_like()), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.wait(timeout=GRACE_S + 15) == 0, proc.stderr()
