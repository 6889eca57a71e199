"""Stopping a real ``macefield-serve``: idle streams end at once, the log says what it waits for,
in-flight work finishes, and a second signal stops at once.

The slow model is the test-only ``MACEFIELD_TEST_FAULT=compute_delay_s=S`` (every batch takes S s longer).
"""

from __future__ import annotations

import queue
import signal
import threading
import time

import grpc
import pytest
from conftest import quartz_like
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import ServerProcess, assert_matches, lists_models, metric, request_for, save_tiny_model, wait_for

from macefield_server.engine import load_model, predict

GRACE_S = 30


def start(tmp_path, delay_s: int = 0):
    path = save_tiny_model(tmp_path / "tiny.pt")
    env = {"MACEFIELD_TEST_FAULT": f"compute_delay_s={delay_s}"} if delay_s else None
    proc = ServerProcess(["--model", str(path), "--grace", str(GRACE_S)], env=env)
    stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{proc.port}"))

    wait_for(lambda: lists_models(stub), timeout=180, what="models loaded")
    return proc, stub, path


class OpenStream:
    """A PredictStream whose requests are fed by hand; answers (or the final error) collected on a thread."""

    def __init__(self, stub):
        self.requests: "queue.Queue" = queue.Queue()
        self.answers: "queue.Queue" = queue.Queue()

        def feed():
            while True:
                item = self.requests.get()
                if item is None:
                    return
                yield item

        self.call = stub.PredictStream(feed(), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for response in self.call:
                self.answers.put(response)
            self.answers.put("end")
        except grpc.RpcError as exc:
            self.answers.put(exc)

    def ask(self, request, timeout=60):
        self.requests.put(request)
        return self.answers.get(timeout=timeout)


def test_idle_streams_end_at_once_and_the_server_stops_in_about_a_second(tmp_path):
    proc, stub, _ = start(tmp_path)
    try:
        streams = [OpenStream(stub) for _ in range(3)]
        for i, s in enumerate(streams):  # each stream served one step and is now idle
            assert s.ask(request_for(quartz_like(seed=i), request_id=f"s{i}")).request_id == f"s{i}"
        wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="PredictStream") == 3,
                 what="3 open streams")
        t0 = time.monotonic()
        proc.terminate()
        for s in streams:  # each client hears UNAVAILABLE (reconnect elsewhere), promptly
            end = s.answers.get(timeout=10)
            assert isinstance(end, grpc.RpcError) and end.code() == grpc.StatusCode.UNAVAILABLE, end
            assert "shutting down" in end.details()
        assert proc.wait(timeout=10) == 0
        elapsed = time.monotonic() - t0
        assert elapsed < 5.0, f"stopping took {elapsed:.1f} s with only idle streams (grace {GRACE_S} s)"
        log = proc.stderr()
        assert "SIGTERM received: draining" in log and "stopped" in log and "Traceback" not in log
    finally:
        proc.kill()


def test_drain_finishes_in_flight_work_and_logs_what_it_waits_for(tmp_path):
    proc, stub, path = start(tmp_path, delay_s=3)
    try:
        atoms = quartz_like(seed=5)
        call = stub.Predict.future(request_for(atoms, outputs=["forces"], request_id="slow"), timeout=120)
        stream = OpenStream(stub)
        stream.requests.put(request_for(atoms, outputs=["forces"], request_id="streamed"))
        wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="Predict") == 1
                 and metric(proc.metrics_port, "macefield_stream_messages_total", event="read") == 1,
                 what="the Predict in flight and the stream's message read")
        proc.proc.send_signal(signal.SIGINT)
        ref = predict(load_model(path), [atoms], outputs=["forces"])[0]
        assert_matches(call.result(), ref)  # in-flight work finished and answered
        answer = stream.answers.get(timeout=60)
        assert not isinstance(answer, grpc.RpcError), answer
        assert_matches(answer, ref)  # the message it had sent was answered ...
        end = stream.answers.get(timeout=30)  # ... then the stream ended so that the client moves on
        assert isinstance(end, grpc.RpcError) and end.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=60) == 0
        log = proc.stderr()
        assert "Task exception was never retrieved" not in log and "Traceback" not in log
        assert "SIGINT received: draining" in log
        assert "waiting for " in log and "Predict 1" in log  # what the drain waited for
    finally:
        proc.kill()


def test_second_signal_stops_at_once(tmp_path):
    proc, stub, _ = start(tmp_path, delay_s=60)
    try:
        call = stub.Predict.future(request_for(quartz_like(seed=6), outputs=["forces"]), timeout=120)
        wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="Predict") == 1, what="in flight")
        time.sleep(0.5)  # computing (for 60 s)
        proc.terminate()
        wait_for(lambda: "SIGTERM received: draining" in proc.stderr(), timeout=30, what="the drain to begin")
        assert proc.proc.poll() is None  # still draining: the call is in flight for another ~58 s
        t0 = time.monotonic()
        proc.terminate()
        code = proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5.0
        assert code == 128 + signal.SIGTERM
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=10)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        log = proc.stderr()
        assert "second signal (SIGTERM): stopping now" in log and "stopped (forced)" in log
    finally:
        proc.kill()


def test_second_signal_is_heard_after_the_grace_period_ran_out(tmp_path):
    """The grace ends while a pass is computing: the server waits for it off its event loop, so a second
    signal still stops it at once."""
    path = save_tiny_model(tmp_path / "tiny.pt")
    proc = ServerProcess(["--model", str(path), "--grace", "1"], env={"MACEFIELD_TEST_FAULT": "compute_delay_s=60"})
    try:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{proc.port}"))
        wait_for(lambda: lists_models(stub), timeout=180, what="models loaded")
        call = stub.Predict.future(request_for(quartz_like(seed=7), outputs=["forces"]), timeout=120)
        wait_for(lambda: metric(proc.metrics_port, "macefield_in_flight", method="Predict") == 1, what="in flight")
        time.sleep(0.5)
        proc.terminate()
        # the 1 s grace is over when the server aborts the call it was draining; the 60 s pass is still computing
        wait_for(call.done, timeout=30, what="the grace period to end")
        assert "SIGTERM received: draining" in proc.stderr()
        assert proc.proc.poll() is None
        t0 = time.monotonic()
        proc.terminate()
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        assert "second signal (SIGTERM): stopping now" in proc.stderr()
    finally:
        proc.kill()
