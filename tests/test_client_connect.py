"""Connecting: a host without a port means 50051, waiting is visible, scripts can wait for readiness."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from conftest import quartz_like
from serving import ServerProcess, free_port, save_tiny_model

from macefield_client import AsyncClient, Client, ServerUnavailable
from macefield_client.core.channel import resolve_target
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as pb_grpc


@pytest.mark.parametrize("given, expected", [
    ("localhost", "localhost:50051"),
    ("127.0.0.1", "127.0.0.1:50051"),
    ("::1", "[::1]:50051"),
    ("[::1]", "[::1]:50051"),
    ("[::1]:7000", "[::1]:7000"),
    ("node12:7000", "node12:7000"),
    ("grpc://node12", "node12:50051"),
    ("dns:///macefield.svc:7000", "dns:///macefield.svc:7000"),
    ("dns:///macefield.svc", "dns:///macefield.svc:50051"),
    ("ipv4:10.0.0.1:7000,10.0.0.2", "ipv4:10.0.0.1:7000,10.0.0.2:50051"),
    ("unix:/tmp/macefield.sock", "unix:/tmp/macefield.sock"),
])
def test_target_without_port_gets_the_server_default(given, expected):
    assert resolve_target(given) == expected
    with Client(given) as client:
        assert client.target == expected


@pytest.mark.parametrize("target", ["grpcs://node12:50051", "https://node12", "node12:"])
def test_targets_that_cannot_mean_what_they_say_are_refused(target):
    with pytest.raises(ValueError, match="target: "):
        resolve_target(target)
    proc = subprocess.run([sys.executable, "-m", "macefield_client.cli", "info", "--server", target],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("macefield: target: ") and "Traceback" not in proc.stderr


def test_wait_ready_and_info_wait_for_a_server_that_starts_later(tmp_path):
    path = save_tiny_model(tmp_path / "tiny.pt")
    port = free_port()
    target = f"127.0.0.1:{port}"
    # nothing listens yet: wait_ready gives up after its timeout, naming the target
    with Client(target) as client:
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match=f"{target} not ready after 1 s"):
            client.wait_ready(timeout=1.0)
        assert time.monotonic() - t0 < 5.0
    # the CLI waits (and says so) while the server starts
    cli = subprocess.Popen([sys.executable, "-m", "macefield_client.cli", "info", "--server", target, "--wait", "180"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc = ServerProcess(["--model", str(path), "--port", str(port)])
    try:
        out, err = cli.communicate(timeout=240)
        assert cli.returncode == 0, err
        assert "model tiny" in out
        assert f"waiting for server at {target}" in err
        notices = [line for line in err.splitlines() if "waiting for server" in line]
        assert 1 <= len(notices) <= 60  # at most one every 2 s, not one per poll
        with Client(target) as client:
            info = client.wait_ready(timeout=30)
            assert info.default_model.name == "tiny"
            assert client.predict(quartz_like()).forces.shape == (9, 3)

        async def async_ready():
            async with AsyncClient(target) as client:
                return await client.wait_ready(timeout=30)

        assert asyncio.run(async_ready()).default_model.name == "tiny"
    finally:
        proc.kill()
        if cli.poll() is None:
            cli.kill()


def test_retries_are_announced(tmp_path):
    target = f"127.0.0.1:{free_port()}"
    seen = []
    with Client(target, retry=2, on_retry=lambda *args: seen.append(args)) as client:
        with pytest.raises(ServerUnavailable, match="after 3 attempts"):
            client.list_models(timeout=5)
    assert [(t, a, n) for t, a, n, _, _ in seen] == [(target, 1, 3), (target, 2, 3)]
    assert all(delay > 0 and details for _, _, _, delay, details in seen)
    proc = subprocess.run([sys.executable, "-m", "macefield_client.cli", "info", "--server", target, "--retries", "2",
                           "--timeout", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count(f"waiting for server at {target} (attempt") == 2
    assert "(attempt 1/3" in proc.stderr and "Traceback" not in proc.stderr


class CancelsFirst(pb_grpc.MaceFieldServicer):
    """A MaceField service whose ListModels is CANCELLED by the server the first ``n`` times (what a real
    server shutting down answers for calls it had received but not yet handled, grpc/grpc#41785), then
    answered; the real part under test is the client's retry of it."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def ListModels(self, request, context):
        import grpc

        from macefield_client.proto.macefield.v1 import macefield_pb2 as pb

        self.calls += 1
        if self.calls <= self.n:
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return pb.ListModelsResponse()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_unary_call_the_server_cancels_is_sent_again(asynchronous):
    from concurrent import futures

    import grpc

    from macefield_client import MACEFieldError

    servicer = CancelsFirst(2)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_MaceFieldServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        if asynchronous:
            async def call():
                async with AsyncClient(f"127.0.0.1:{port}") as client:
                    return await client.list_models()
            info = asyncio.run(call())
        else:
            with Client(f"127.0.0.1:{port}") as client:
                info = client.list_models()
        assert servicer.calls == 3 and info.models == []
        servicer.calls = 0
        with Client(f"127.0.0.1:{port}", retry=1) as client, pytest.raises(MACEFieldError, match="CANCELLED"):
            client.list_models()  # the retries are bounded by the policy: 2 attempts, both cancelled
        assert servicer.calls == 2
    finally:
        server.stop(None)
