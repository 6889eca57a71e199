"""Faults: injected compute errors at the batch boundary ($MACEFIELD_TEST_FAULT), broken
checkpoints at start-up, and SIGTERM / SIGINT with counted requests in flight."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import quartz_like, random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import ServerProcess, assert_matches, lists_models, metric, request_for, save_tiny_model, wait_for

from macefield_client import Client, RetryPolicy
from macefield_client.ase import MACEFieldCalculator
from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BatchingConfig, ServerConfig
from macefield_server.engine import load_model, predict
from macefield_server.serving.registry import ServedModel

FIELD = (0.0, 0.01, -0.02)


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=5)


def reference(model, atoms, outputs=("forces",)):
    return predict(model, [atoms], electric_fields=list(FIELD), heads="sio2", outputs=list(outputs))[0]


def faulty_server(monkeypatch, model, fault: str, **batching):
    monkeypatch.setenv("MACEFIELD_TEST_FAULT", fault)  # read once, when the server object is made
    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(**batching))
    return BackgroundServer(config, [ServedModel("tiny", model, "sio2")])


def test_injected_oom_splits_the_batch_and_a_lone_giant_is_resource_exhausted(monkeypatch, model):
    cells = [quartz_like(seed=i) for i in range(4)]  # 9 atoms each: a 36-atom batch, halves of 18
    with faulty_server(monkeypatch, model, "oom_above_atoms=20", max_wait_ms=200) as srv:
        monkeypatch.delenv("MACEFIELD_TEST_FAULT")
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        batch = pb.PredictBatchRequest(
            structures=[request_for(a, field=FIELD, outputs=["forces"], request_id=f"b{i}")
                        for i, a in enumerate(cells)])
        response = stub.PredictBatch(batch, timeout=120)
        for r, atoms in zip(response.results, cells):
            assert_matches(r, reference(model, atoms))
            assert r.timing.batch_structures <= 2  # computed in a split pass
        assert metric(srv.metrics_port, "macefield_oom_splits_total", model="tiny") >= 1
        giant = quartz_like(repeat=(1, 1, 3))  # 27 atoms: does not fit even alone
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request_for(giant, field=FIELD), timeout=120)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "27 atoms" in info.value.details()
        assert_matches(stub.Predict(request_for(cells[0], field=FIELD, outputs=["forces"]), timeout=120),
                       reference(model, cells[0]))


def test_injected_error_fails_only_its_batch(monkeypatch, model):
    cells = [quartz_like(seed=10 + i) for i in range(5)]
    with faulty_server(monkeypatch, model, "error_on_batch=2", max_wait_ms=1) as srv:
        monkeypatch.delenv("MACEFIELD_TEST_FAULT")
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))

        def call(atoms, i):
            return stub.Predict(request_for(atoms, field=FIELD, outputs=["forces"], request_id=f"e{i}"), timeout=120)

        assert_matches(call(cells[0], 0), reference(model, cells[0]))  # batch 1
        with pytest.raises(grpc.RpcError) as info:  # batch 2: the injected error
            call(cells[1], 1)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "injected compute error" in info.value.details()
        for i in (2, 3, 4):  # later batches are served, with the right numbers
            assert_matches(call(cells[i], i), reference(model, cells[i]))
        assert metric(srv.metrics_port, "macefield_requests_total", code="INTERNAL") == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_checkpoint_is_one_clear_error_at_start_up(tmp_path, damage):
    path = save_tiny_model(tmp_path / "model.pt")
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a checkpoint" * 64)
    proc = ServerProcess(["--model", str(broken)])
    try:
        assert proc.wait(timeout=120) != 0
        errors = [line for line in proc.stderr().splitlines() if " ERROR " in line or "Error" in line]
        assert len(errors) == 1 and str(broken) in errors[0], proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_every_accepted_request(tmp_path, sig):
    path = save_tiny_model(tmp_path / "tiny.pt")
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"""
grace_s: 60
models:
  - name: quartz
    path: {path}
batching:
  max_wait_ms: 3000     # requests stay queued (in flight) until the batch closes
  max_structures: 64
"""
    )
    proc = ServerProcess(["--config", str(config)])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}")
        stub = rpc.MaceFieldStub(channel)
        wait_for(lambda: lists_models(stub), timeout=180, what="SERVING")
        cases = [quartz_like(seed=20 + i) for i in range(6)]
        unary = [stub.Predict.future(request_for(a, field=FIELD, outputs=["forces"], request_id=f"u{i}"), timeout=120)
                 for i, a in enumerate(cases)]
        batch = stub.PredictBatch.future(pb.PredictBatchRequest(
            structures=[request_for(a, field=FIELD, outputs=["forces"], request_id=f"b{i}")
                        for i, a in enumerate(cases)]),
            timeout=120)
        stream = stub.PredictStream(iter([request_for(a, field=FIELD, outputs=["forces"], request_id=f"s{i}")
                                          for i, a in enumerate(cases)]), timeout=120)
        accepted = len(unary) + 1 + 1  # 6 Predict, 1 PredictBatch, 1 PredictStream (6 messages)
        wait_for(lambda: sum(metric(proc.metrics_port, "macefield_in_flight", method=m)
                             for m in ("Predict", "PredictBatch", "PredictStream")) == accepted, what="all in flight")
        proc.proc.send_signal(sig)

        model = load_model(path)
        refs = [predict(model, [a], electric_fields=list(FIELD), outputs=["forces"])[0] for a in cases]
        answered = 0
        for call, ref in zip(unary, refs):
            assert_matches(call.result(), ref)
            answered += 1
        for r, ref in zip(batch.result().results, refs):
            assert_matches(r, ref)
        answered += 1
        streamed = list(stream)
        assert [r.request_id for r in streamed] == [f"s{i}" for i in range(6)]
        for r, ref in zip(streamed, refs):
            assert_matches(r, ref)
        answered += 1
        assert answered == accepted  # none lost
        assert proc.wait(timeout=90) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.kill()


def test_md_rides_out_a_kill_9_mid_run(tmp_path):
    """ASE MD over a PredictStream session; the server is SIGKILLed mid-run and restarted on the same port."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    path = save_tiny_model(tmp_path / "tiny.pt")
    procs = [ServerProcess(["--model", str(path)])]
    port = procs[0].port
    try:
        client = Client(f"127.0.0.1:{port}", timeout=60,
                        retry=RetryPolicy(attempts=400, initial_backoff=0.1, max_backoff=0.5))
        atoms = quartz_like(seed=4)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        atoms.calc = MACEFieldCalculator(client=client, electric_field=list(FIELD))
        dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        energies, box = [], {}
        dyn.attach(lambda: energies.append(atoms.get_potential_energy()), interval=1)

        def md():
            try:
                dyn.run(40)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                box["error"] = exc

        thread = threading.Thread(target=md, daemon=True)
        thread.start()
        wait_for(lambda: len(energies) >= 8 or "error" in box, timeout=240, what="MD under way")
        procs[0].kill()  # SIGKILL while the session streams
        procs.append(ServerProcess(["--model", str(path), "--port", str(port)]))
        thread.join(240)  # hang guard, not a performance bound
        assert not thread.is_alive(), "MD hung after the restart"
        assert "error" not in box, box.get("error")
        assert len(energies) == 41 and np.all(np.isfinite(energies))
        # the last step's numbers came from the restarted server: the engine's
        ref = predict(load_model(path), [atoms], electric_fields=list(FIELD), outputs=["forces"])[0]
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-9, atol=1e-10)
        assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"]), rel=1e-10)
        atoms.calc.close()
    finally:
        for proc in procs:
            proc.kill()


def test_liveness_goes_not_serving_while_the_compute_hangs_and_comes_back(monkeypatch, model):
    """liveness_timeout_s: a compute thread stuck in one batch (a 3 s injected delay standing in for a hung CUDA
    kernel) turns the ``liveness`` health NOT_SERVING once queued work has seen no batch finish for 1 s, while
    the event loop (and readiness) still answer; the batch finishing turns it SERVING again.  An idle server
    stays SERVING however long it waits."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from macefield_server.serving.app import LIVENESS_SERVICE, SERVICE_NAME

    monkeypatch.setenv("MACEFIELD_TEST_FAULT", "compute_delay_s=3")
    config = ServerConfig(port=0, metrics_port=-1, liveness_timeout_s=1.0)
    with BackgroundServer(config, [ServedModel("tiny", model, "sio2")]) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        health = health_pb2_grpc.HealthStub(channel)

        def status(service=LIVENESS_SERVICE):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(1.6)
        assert status() == serving  # idle for longer than the timeout: nothing is stuck
        call = rpc.MaceFieldStub(channel).Predict.future(request_for(quartz_like(), field=FIELD, outputs=["forces"]),
                                                         timeout=60)
        wait_for(lambda: status() == not_serving, timeout=3, interval=0.1, what="liveness NOT_SERVING")
        assert not call.done() and status(SERVICE_NAME) == serving  # still computing; still ready
        assert_matches(call.result(), reference(model, quartz_like()))
        wait_for(lambda: status() == serving, timeout=3, interval=0.1, what="liveness SERVING again")
