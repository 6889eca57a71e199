"""A real ``macefield-serve`` process killed (SIGKILL) and restarted under an open client session.

The next call either reconnects (the server came back within the retry
policy) or raises ServerUnavailable naming the target; it never hangs.  The
hang guard is a generous bound on a call that would otherwise block forever,
not a performance assertion.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading

import numpy as np
import pytest
from conftest import quartz_like
from serving import ServerProcess, save_tiny_model

from macefield_client import AsyncClient, Client, RequestTimeout, RetryPolicy, ServerUnavailable
from macefield_client.ase import MACEFieldCalculator
from macefield_server.engine import load_model, predict

FIELD = np.array([0.0, 0.02, 0.04])
HANG_GUARD_S = 240


def bounded(fn, limit=HANG_GUARD_S):
    """fn() on a thread; fails the test if it has not returned (or raised) after ``limit`` s."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"call still blocked after {limit} s: the client hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]


async def async_session(target):
    client = AsyncClient(target, timeout=60, retry=RetryPolicy(attempts=400, initial_backoff=0.1, max_backoff=0.5))
    return client.session(outputs=["forces"])


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_model(tmp_path / "tiny.pt")


def test_session_reconnects_after_restart_and_raises_clear_error_when_gone(checkpoint):
    model = load_model(checkpoint)
    procs = [ServerProcess(["--model", str(checkpoint)])]
    port = procs[0].port
    target = f"127.0.0.1:{port}"
    try:
        # patient: rides out a restart (server start-up answers UNAVAILABLE, then the port is refused)
        patient = Client(target, timeout=60, retry=RetryPolicy(attempts=400, initial_backoff=0.1, max_backoff=0.5))
        atoms = quartz_like(seed=8)
        calc = MACEFieldCalculator(client=patient, electric_field=FIELD)
        atoms.calc = calc
        bounded(atoms.get_forces)  # waits (retrying) until the first server is warm
        session = calc._session
        before = session.reconnects  # (streams refused while the server was loading count too)
        loop = asyncio.new_event_loop()  # the asyncio client, on an event loop running in its own thread
        threading.Thread(target=loop.run_forever, daemon=True).start()

        def run(coro):
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        asession = run(async_session(target))
        run(asession.predict(atoms, electric_field=FIELD))
        abefore = asession.reconnects

        procs[0].kill()  # SIGKILL: no drain, the stream's connection just drops
        procs.append(ServerProcess(["--model", str(checkpoint), "--port", str(port)]))
        atoms.positions[0] += 0.02
        forces = bounded(atoms.get_forces)
        ref = predict(model, [atoms], electric_fields=FIELD, outputs=["forces"])[0]
        np.testing.assert_allclose(forces, ref["forces"], rtol=1e-9, atol=1e-10)
        assert session.reconnects > before
        r = bounded(lambda: run(asession.predict(atoms, electric_field=FIELD)))
        np.testing.assert_allclose(r.forces, ref["forces"], rtol=1e-9, atol=1e-10)
        assert asession.reconnects > abefore
        atoms.positions[1] += 0.02
        bounded(atoms.get_forces)  # the new stream keeps working

        # impatient: few retries and a short deadline, so a frozen or dead server is a clear error
        impatient = Client(target, timeout=5, retry=RetryPolicy(attempts=3, initial_backoff=0.1))
        with impatient.session(outputs=["forces"]) as s:
            s.predict(atoms, electric_field=FIELD)
            procs[1].proc.send_signal(signal.SIGSTOP)  # frozen: connection open, nobody answers
            try:
                with pytest.raises(RequestTimeout, match=target):
                    bounded(lambda: s.predict(atoms, electric_field=FIELD))
                with pytest.raises(RequestTimeout, match=target):
                    bounded(lambda: impatient.predict(atoms))
            finally:
                procs[1].proc.send_signal(signal.SIGCONT)
            r = bounded(lambda: s.predict(atoms, electric_field=FIELD))  # thawed: a new stream works
            np.testing.assert_allclose(r.forces, atoms.get_forces(), rtol=1e-9, atol=1e-10)
            procs[1].kill()
            with pytest.raises(ServerUnavailable, match=target) as info:
                bounded(lambda: s.predict(atoms, electric_field=FIELD))
            assert re.search(r"unavailable after \d+ attempts", str(info.value)), str(info.value)
        with pytest.raises(ServerUnavailable, match=target):
            bounded(lambda: impatient.predict(atoms))
        impatient.close()
        calc.close()

        async def gone():
            async with AsyncClient(target, timeout=5, retry=RetryPolicy(attempts=3, initial_backoff=0.1)) as c:
                async with c.session() as s:
                    await s.predict(atoms)

        with pytest.raises(ServerUnavailable, match=target):
            bounded(lambda: run(gone()))
        run(asession.close())
        loop.call_soon_threadsafe(loop.stop)
    finally:
        for proc in procs:
            proc.kill()


def test_default_retry_policy_rides_out_a_measured_restart(tmp_path):
    """kill -9 of a server on the embedded default model and an immediate restart on the same port: a session
    step sent meanwhile, with the *default* retry policy, is answered by the restarted server (the retry budget
    must outlast such a restart; an earlier budget of 6.2-7.8 s did not)."""
    import time

    import grpc
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
    from macefield_client.structures import alpha_quartz
    from serving import wait_for

    procs = [ServerProcess([])]
    port = procs[0].port
    target = f"127.0.0.1:{port}"
    stub = rpc.MaceFieldStub(grpc.insecure_channel(target))

    def serving():
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    try:
        wait_for(serving, timeout=240, interval=0.1, what="first start")
        atoms = alpha_quartz(cell="pbe", rattle=0.02)
        with Client(target) as client, client.session(outputs=["forces"]) as session:
            first = session.predict(atoms)
            procs[0].proc.kill()
            t0 = time.monotonic()
            box = {}
            thread = threading.Thread(target=lambda: box.update(result=bounded(lambda: session.predict(atoms))),
                                      daemon=True)
            thread.start()  # the step goes out while nothing listens
            procs.append(ServerProcess(["--port", str(port)]))
            wait_for(serving, timeout=240, interval=0.05, what="restart")
            restart_s = time.monotonic() - t0
            thread.join(HANG_GUARD_S)
            assert "result" in box, box  # answered, no ServerUnavailable
            np.testing.assert_allclose(box["result"].forces, first.forces, rtol=1e-6, atol=1e-6)
            assert session.reconnects >= 1
        # the ride-out above is the check; the margin is reported (11.8 s on an idle 2-core CPU, the memory
        # measurement read from its cache, against a 30.2 s shortest budget) and must exist on the machine running this
        shortest, _ = RetryPolicy().budget()
        assert shortest > restart_s, f"default retry budget {shortest:.1f} s, restart took {restart_s:.1f} s"
        print(f"restart of the default-model server: {restart_s:.1f} s; default retry budget {shortest:.1f} s")
    finally:
        for proc in procs:
            proc.kill()
