"""Scaling out, with real processes on loopback: three ``macefield-serve`` replicas on 127.0.0.2,
127.0.0.3 and 127.0.0.4, clients balancing over them with gRPC's round_robin (client-side health checking),
and the same through a real Envoy proxy.

Every answer is compared with the engine's own evaluation of the same model in this process; load runs
closed-loop (each client sends its next request when the last is answered).  The replicas use a small
random float64 model (tests/serving.py ``save_tiny_model``) and serve with ``max_connection_age`` 6 s
(grace 4 s), so connections are also recycled under load as they would be in production.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import struct
import subprocess
import threading
import time
from typing import Dict, List

import grpc
import numpy as np
import pytest
from ase.md.verlet import VelocityVerlet
from ase.units import fs
from conftest import REPO, quartz_like
from envoy_proxy import EnvoyProcess, require_envoy
from serving import ServerProcess, common_free_port, save_tiny_model, wait_for

from macefield_client import Client
from macefield_client.core.channel import REPLICAS_SERVICE_CONFIG, SERVICE_CONFIG, resolve_target, service_config
from macefield_client.ase import MACEFieldCalculator
from macefield_server.engine import load_model, predict

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
OUTPUTS = ["energy", "forces"]
#: seconds after which each replica sends a client connection GOAWAY (clients re-resolve), and the grace after it
MAX_AGE_S, MAX_AGE_GRACE_S = 6, 4


class Replicas:
    """Three ``macefield-serve`` processes, one per loopback address, all on one port."""

    def __init__(self, model_path):
        self.model_path = model_path
        self.port = common_free_port(HOSTS)
        self.procs: Dict[str, ServerProcess] = {}
        with concurrent.futures.ThreadPoolExecutor(len(HOSTS)) as pool:
            list(pool.map(self.start, HOSTS))
        for host in HOSTS:
            self.wait_ready(host)

    @property
    def addresses(self) -> List[str]:
        return [f"{h}:{self.port}" for h in HOSTS]

    def start(self, host: str) -> ServerProcess:
        self.procs[host] = ServerProcess(
            ["--model", str(self.model_path), "--grace", "30", "--max-connection-age", str(MAX_AGE_S),
             "--max-connection-age-grace", str(MAX_AGE_GRACE_S)], host=host, port=self.port)
        return self.procs[host]

    def wait_ready(self, host: str, timeout: float = 180) -> None:
        with Client(f"{host}:{self.port}", retry=0) as c:
            c.wait_ready(timeout)

    def restart(self, host: str) -> None:
        self.start(host)
        self.wait_ready(host)

    def ensure_all_up(self) -> None:
        for host, proc in list(self.procs.items()):
            if proc.proc.poll() is not None:
                self.restart(host)

    def served(self, method: str = "Predict") -> Dict[str, float]:
        """OK answers of ``method`` per replica (its own /metrics)."""
        return {h: p.metric("macefield_requests_total", method=method, code="OK") for h, p in self.procs.items()}

    def stream_answers(self) -> Dict[str, float]:
        return {h: p.metric("macefield_stream_messages_total", event="answered") for h, p in self.procs.items()}

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("scale") / "tiny.pt")


@pytest.fixture(scope="module")
def replicas(model_path):
    group = Replicas(model_path)
    yield group
    group.close()


@pytest.fixture(scope="module")
def references(model_path):
    """Four (atoms, field, engine result) the load cycles through; the engine evaluated here, in this process."""
    model = load_model(model_path)
    cases = []
    for i in range(4):
        atoms = quartz_like(seed=10 + i)
        field = (0.0, 0.01 * i, 0.02)
        cases.append((atoms, field, predict(model, [atoms], electric_fields=[list(field)], outputs=OUTPUTS)[0]))
    return cases


def check_answer(result, reference) -> None:
    np.testing.assert_allclose(result.energy, reference["energy"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.forces, reference["forces"], rtol=1e-9, atol=1e-10)


class ClosedLoop:
    """``n`` clients (threads, a Client each), each sending its next request when the last is answered; clients
    with an odd index use a Session (one PredictStream), the others Predict.  Every answer is checked."""

    def __init__(self, target, references, n: int = 8, unary_retry=None):
        self.references = references
        self.unary_retry = unary_retry  #: the Predict clients' RetryPolicy (0: every failure is an error)
        self.stop = threading.Event()
        self.errors: List[str] = []
        self.answered = [0] * n
        self.reconnects = [0] * n
        self.retries = 0  #: unary calls retried (answered UNAVAILABLE or cut, then resent)
        self.threads = [threading.Thread(target=self._run, args=(target, k), daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, target, k: int) -> None:
        def retried(*_):
            self.retries += 1

        retry = self.unary_retry if k % 2 == 0 else None
        with Client(target, timeout=60, on_retry=retried, retry=retry) as client:
            session = client.session(outputs=OUTPUTS) if k % 2 else None
            i = k
            while not self.stop.is_set():
                atoms, field, reference = self.references[i % len(self.references)]
                try:
                    if session is not None:
                        result = session.predict(atoms, electric_field=field)
                    else:
                        result = client.predict(atoms, electric_field=field, outputs=OUTPUTS)
                    check_answer(result, reference)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    self.errors.append(f"client {k}: {type(exc).__name__}: {exc}")
                else:
                    self.answered[k] += 1
                i += 1
            if session is not None:
                self.reconnects[k] = session.reconnects
                session.close()

    def total(self) -> int:
        return sum(self.answered)

    def wait_for_answers(self, n: int, timeout: float = 120) -> None:
        start = self.total()
        wait_for(lambda: self.total() >= start + n or self.errors, timeout=timeout, what=f"{n} more answers")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "a client hung"


@pytest.mark.parametrize("given, expected, health_checked", [
    (["10.0.0.1", "10.0.0.2:7000"], "ipv4:10.0.0.1:50051,10.0.0.2:7000", True),
    ("10.0.0.1:7000, 10.0.0.2", "ipv4:10.0.0.1:7000,10.0.0.2:50051", True),
    (["::1", "[fe80::1]:7000"], "ipv6:[::1]:50051,[fe80::1]:7000", True),
    (["localhost:7000", "127.0.0.2:7000"], "ipv4:127.0.0.1:7000,127.0.0.2:7000", True),  # names resolved now
    (["node7:7000"], "node7:7000", False),  # one server: as a plain target
    ("dns:///macefield-headless.ns.svc:50051", "dns:///macefield-headless.ns.svc:50051", True),
    ("envoy.local:50051", "envoy.local:50051", False),  # a proxy: round_robin, no health check through it
])
def test_replica_targets(given, expected, health_checked):
    target = resolve_target(given)
    assert target == expected
    assert service_config(target) == (REPLICAS_SERVICE_CONFIG if health_checked else SERVICE_CONFIG)
    assert '"round_robin"' in service_config(target)


@pytest.mark.parametrize("given, message", [
    (["10.0.0.1", "::1"], "mixes IPv4 and IPv6"),
    ([], "empty list"),
    (["no-such-host.invalid:7000", "10.0.0.1"], "cannot resolve 'no-such-host.invalid'"),
])
def test_bad_replica_lists_are_refused(given, message):
    with pytest.raises(ValueError, match=message):
        Client(given)


def assert_spread(replicas, client, references, n: int = 60) -> None:
    """``n`` Predict calls, each answer checked; every replica served at least 20 % of them (its /metrics)."""
    before = replicas.served()
    for i in range(n):
        atoms, field, reference = references[i % len(references)]
        check_answer(client.predict(atoms, electric_field=field, outputs=OUTPUTS), reference)
    after = replicas.served()
    share = {h: after[h] - before[h] for h in HOSTS}
    assert sum(share.values()) == n, share
    assert all(k >= 0.2 * n for k in share.values()), f"each replica should serve >= 20% of {n} requests: {share}"


def test_client_spreads_requests_over_three_replicas(replicas, references):
    with Client(replicas.addresses) as client:
        assert client.target == "ipv4:" + ",".join(replicas.addresses)
        client.wait_ready(60)
        assert_spread(replicas, client, references)


def test_async_client_spreads_requests_over_three_replicas(replicas, references):
    import asyncio

    from macefield_client import AsyncClient

    async def run():
        async with AsyncClient(",".join(replicas.addresses)) as client:
            await client.wait_ready(60)
            before = replicas.served()
            for i in range(30):
                atoms, field, reference = references[i % len(references)]
                check_answer(await client.predict(atoms, electric_field=field, outputs=OUTPUTS), reference)
            return before

    before = asyncio.run(run())
    after = replicas.served()
    assert all(after[h] - before[h] >= 6 for h in HOSTS), (before, after)


@pytest.mark.parametrize("args, message", [
    (["--max-connection-age", "-1"], "max_connection_age_s: must be between 0 (off) and 2147483 seconds"),
    (["--max-connection-age-grace", "nan"], "max_connection_age_grace_s: must be between 0"),
    # gRPC takes int32 milliseconds: these overflowed when the server started (a traceback, exit 1)
    (["--max-connection-age", "inf"], "max_connection_age_s: must be between 0 (off) and 2147483 seconds, got inf"),
    (["--max-connection-age", "3e6"], "max_connection_age_s: must be between 0 (off) and 2147483 seconds"),
    (["--liveness-timeout", "-5"], "liveness_timeout_s: must be between 0"),
    (["--health-port", "-2"], "health_port: -1 (off)"),
    (["--port", "7000", "--health-port", "7000"], "health_port: 7000 is also port"),
    (["--metrics-port", "7001", "--health-port", "7001"], "health_port: 7001 is also metrics_port"),
])
def test_scale_out_server_options_are_checked(args, message, capsys):
    """``macefield-serve``'s own entry point (in this process: it stops at the configuration, exit code 2)."""
    from macefield_server.cli.serve import main

    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_port_another_server_holds_is_refused_not_shared(replicas):
    """gRPC's default SO_REUSEPORT would let a second server bind a replica's port (or a health port on it) and
    the kernel would split new connections between the two: both listeners bind without it, so the second
    server fails to start, saying which address, with exit code 2."""
    import asyncio

    from macefield_server.serving.app import MaceFieldServer
    from macefield_server.serving.config import ServerConfig
    from macefield_server.cli.serve import main

    replicas.ensure_all_up()

    async def start(**ports):
        server = MaceFieldServer(ServerConfig(host=HOSTS[0], metrics_port=-1, **ports))
        try:
            await server.start()
        finally:
            await server.stop_now()

    with pytest.raises(OSError, match=f"could not bind the gRPC port {HOSTS[0]}:{replicas.port}"):
        asyncio.run(start(port=replicas.port))
    with pytest.raises(OSError, match=f"could not bind the health port {HOSTS[0]}:{replicas.port}"):
        asyncio.run(start(port=0, health_port=replicas.port))
    assert main(["--host", HOSTS[0], "--port", str(replicas.port), "--metrics-port", "-1"]) == 2


def test_comma_separated_string_and_the_cli_reach_every_replica(replicas, references, tmp_path):
    import sys

    from ase.io import read, write

    frames = []
    for atoms, field, _ in references * 3:  # 12 frames, one PredictBatch each (--batch-size 1)
        frame = atoms.copy()
        frame.info["electric_field"] = np.array(field)
        frames.append(frame)
    write(tmp_path / "in.xyz", frames)
    before = replicas.served("PredictBatch")
    done = subprocess.run([sys.executable, "-m", "macefield_client.cli", "predict", str(tmp_path / "in.xyz"),
                           "--server", ",".join(replicas.addresses), "--batch-size", "1", "--outputs", "energy",
                           "forces", "-o", str(tmp_path / "out.xyz"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = replicas.served("PredictBatch")
    assert all(after[h] > before[h] for h in HOSTS), (before, after)
    for frame, (_, _, reference) in zip(read(tmp_path / "out.xyz", ":"), references * 3):
        np.testing.assert_allclose(frame.info["MACE_energy"], reference["energy"], rtol=1e-10)


def test_docs_client_side_example_runs_against_three_replicas(replicas, model_path, tmp_path):
    """docs/scaling.md's client-side example, torch-free, with the test replicas' addresses."""
    import re
    import sys

    from serving import run_torch_free, torch_free_env

    from macefield_client.structures import alpha_quartz

    replicas.ensure_all_up()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "docs" / "scaling.md").read_text(), re.S)
                if "scaling example: client-side" in b]
    for host in HOSTS:
        assert block.count(f"{host}:50051") == 2  # the list and the comma-separated form in its comment
        block = block.replace(f"{host}:50051", f"{host}:{replicas.port}")
    script = tmp_path / "client_side.py"
    script.write_text(block)
    env_report = torch_free_env(tmp_path)
    env_report[0]["PYTHONPATH"] = os.pathsep.join(filter(None, [env_report[0]["PYTHONPATH"],
                                                                 os.environ.get("PYTHONPATH")]))
    before = replicas.served("PredictBatch")
    out = run_torch_free([sys.executable, str(script)], env_report, timeout=300).stdout
    after = replicas.served("PredictBatch")
    assert all(after[h] > before[h] for h in HOSTS), (before, after)  # predict_many went to all three
    model = load_model(model_path)
    expected = [float(predict(model, [alpha_quartz(rattle=0.05, seed=i)], electric_fields=[[0, 0, 0.02]],
                              outputs=["energy"])[0]["energy"]) for i in range(3)]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("energies:")]
    assert [float(x) for x in re.findall(r"-?\d+\.\d+", line)] == [round(e, 4) for e in expected]
    assert "MD energy:" in out


def test_kill_9_of_a_replica_under_load_loses_no_request(replicas, references):
    replicas.ensure_all_up()
    victim = replicas.procs[HOSTS[1]]
    load = ClosedLoop(replicas.addresses, references)
    try:
        load.wait_for_answers(40)
        served_before = replicas.served()
        assert served_before[HOSTS[1]] > 0
        # kill while the victim holds calls (a session's open stream, or a unary call being computed): those are
        # what must be resent (a stream stays in flight while open; a unary call only while computed)
        wait_for(lambda: victim.metric("macefield_in_flight") >= 1, timeout=60,
                 what="calls in flight on the replica to be killed", interval=0.005)
        victim.proc.kill()  # SIGKILL: connections reset, nothing drained
        victim.proc.wait(10)
        after_kill = load.total()
        load.wait_for_answers(60)
        others = {h: replicas.procs[h].metric("macefield_requests_total", method="Predict", code="OK")
                  for h in (HOSTS[0], HOSTS[2])}
    finally:
        load.finish()
    assert not load.errors, load.errors[:5]
    assert load.total() >= after_kill + 60 and all(n > 0 for n in load.answered), load.answered
    assert load.retries + sum(load.reconnects) >= 1, "calls in flight on the killed replica should have been resent"
    assert all(others[h] > served_before[h] for h in others), (served_before, others)
    replicas.restart(HOSTS[1])


def test_rolling_restart_with_sigterm_loses_no_request(replicas, references):
    replicas.ensure_all_up()
    load = ClosedLoop(replicas.addresses, references)
    try:
        load.wait_for_answers(24)
        for host in HOSTS:
            proc = replicas.procs[host]
            proc.terminate()  # drain: NOT_SERVING, GOAWAY, in-flight calls answered, open streams end UNAVAILABLE
            assert proc.wait(timeout=60) == 0, proc.stderr()[-3000:]
            replicas.restart(host)  # same address and port
            served = replicas.procs[host].metric("macefield_requests_total", code="OK")
            wait_for(lambda: replicas.procs[host].metric("macefield_requests_total", code="OK") > served
                     or load.errors, timeout=60, what=f"clients back on {host}")
            load.wait_for_answers(16)
    finally:
        load.finish()
    assert not load.errors, load.errors[:5]
    assert all(n > 0 for n in load.answered), load.answered
    assert sum(load.reconnects) >= 1, "the sessions' streams should have been ended by the drains and reopened"


def test_ase_md_session_moves_to_another_replica_when_its_replica_dies(replicas, model_path):
    replicas.ensure_all_up()
    steps, kill_after = 12, 5

    def trajectory(server, on_step=None):
        atoms = quartz_like(seed=3)
        atoms.set_velocities(np.random.default_rng(0).normal(0.0, 0.01, size=(len(atoms), 3)))
        calc = MACEFieldCalculator(server, electric_field=(0.0, 0.0, 0.02))
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=1.0 * fs)
        energies, positions = [], []

        def record():
            energies.append(atoms.get_potential_energy())
            positions.append(atoms.get_positions().copy())
            if on_step is not None:
                on_step(len(energies), calc)

        dyn.attach(record, interval=1)
        dyn.run(steps)
        reconnects = calc._session.reconnects
        calc.close()
        return np.array(energies), np.array(positions), reconnects

    killed = {}

    def kill_the_sessions_replica(step, calc):
        if step == 2:
            killed["before"] = replicas.stream_answers()
        if step == kill_after:
            now = replicas.stream_answers()
            (host,) = [h for h in HOSTS if now[h] > killed["before"][h]]  # one replica served the session
            killed["host"] = host
            replicas.procs[host].proc.kill()
            replicas.procs[host].proc.wait(10)

    e_failover, x_failover, reconnects = trajectory(replicas.addresses, kill_the_sessions_replica)
    assert reconnects >= 1 and "host" in killed
    survivor = next(h for h in HOSTS if h != killed["host"])
    e_ref, x_ref, ref_reconnects = trajectory(f"{survivor}:{replicas.port}")  # the same run, nothing dies
    assert ref_reconnects == 0
    assert len(e_failover) == len(e_ref) == steps + 1
    # the step resent on another replica gives the same numbers: the two trajectories agree
    np.testing.assert_allclose(e_failover, e_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_failover, x_ref, rtol=0, atol=1e-12)
    replicas.restart(killed["host"])


def test_sigterm_sends_goaway_at_once_while_in_flight_work_finishes(model_path, references):
    """On the wire: within a moment of SIGTERM the client's connection leaves READY (the server's HTTP/2 GOAWAY;
    gRPC moves the connection to IDLE) and new connections are refused, while the call in flight is answered."""
    proc = ServerProcess(["--model", str(model_path), "--grace", "30"], host=HOSTS[0],
                         env={"MACEFIELD_TEST_FAULT": "compute_delay_s=3"})
    try:
        with Client(proc.address) as client:
            client.wait_ready(120)
        channel = grpc.insecure_channel(proc.address)
        states = []
        channel.subscribe(lambda s: states.append((time.monotonic(), s)), try_to_connect=True)
        from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
        from serving import request_for

        atoms, field, reference = references[0]
        call = rpc.MaceFieldStub(channel).Predict.future(request_for(atoms, field, outputs=OUTPUTS), timeout=60)
        wait_for(lambda: proc.metric("macefield_in_flight", method="Predict") == 1, what="the call in flight")
        wait_for(lambda: states and states[-1][1] == grpc.ChannelConnectivity.READY, what="READY seen by the callback")
        t0 = time.monotonic()
        proc.terminate()
        wait_for(lambda: states[-1][1] != grpc.ChannelConnectivity.READY, timeout=10, what="GOAWAY")
        call_was_running = not call.done()
        goaway_s = states[-1][0] - t0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOSTS[0], proc.port), timeout=2).close()
        # the connection left READY while the call in flight (3 s of compute) was still being computed: the
        # GOAWAY came at the start of the drain, not at its end
        assert call_was_running, f"GOAWAY only {goaway_s:.2f} s after SIGTERM, once the call had finished"
        assert goaway_s < 2.0, f"GOAWAY {goaway_s:.2f} s after SIGTERM"
        response = call.result()  # ... and answered
        np.testing.assert_allclose(response.energy, reference["energy"], rtol=1e-10)
        assert proc.wait(timeout=30) == 0
        channel.close()
    finally:
        proc.kill()


class TinyDNS:
    """A DNS server on 127.0.0.1 (UDP) answering A queries for one name with a list that the test changes."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: List[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            qid = struct.unpack(">H", data[:2])[0]
            i, labels = 12, []
            while data[i]:
                labels.append(data[i + 1:i + 1 + data[i]].decode())
                i += 1 + data[i]
            qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
            question = data[12:i + 5]
            known = ".".join(labels).lower() == self.name
            answers = [socket.inet_aton(a) for a in self.addresses] if known and qtype == 1 else []
            header = struct.pack(">HHHHHH", qid, 0x8180 | (0 if known else 3), 1, len(answers), 0, 0)
            records = b"".join(struct.pack(">HHHLH", 0xC00C, 1, 1, 1, 4) + a for a in answers)
            self.sock.sendto(header + question + records, peer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def test_dns_target_spreads_over_replicas_added_later_thanks_to_max_connection_age(replicas):
    """A ``dns:///`` client first sees one replica; the name then gets all three (scale-up).  The replicas'
    max_connection_age GOAWAY makes gRPC re-resolve, and calls spread over all three without a new client."""
    replicas.ensure_all_up()
    dns = TinyDNS("replicas.macefield.test")
    dns.addresses = [HOSTS[0]]
    target = f"dns://127.0.0.1:{dns.port}/replicas.macefield.test:{replicas.port}"
    # gRPC re-resolves at most every 30 s by default; the test shortens that, not the mechanism
    options = [("grpc.dns_min_time_between_resolutions_ms", 500)]
    try:
        with Client(target, options=options) as client:
            before = replicas.served("ListModels")
            for _ in range(5):
                client.list_models()
            first = replicas.served("ListModels")
            assert [first[h] - before[h] for h in HOSTS] == [5, 0, 0]
            dns.addresses = list(HOSTS)
            end = time.monotonic() + 3 * MAX_AGE_S
            while time.monotonic() < end:
                client.list_models()
                now = replicas.served("ListModels")
                if all(now[h] > first[h] for h in HOSTS):
                    break
                time.sleep(0.05)
            assert all(now[h] > first[h] for h in HOSTS), (first, now)
    finally:
        dns.close()


# ---------------------------------------------------------------------------------------- through Envoy

@pytest.fixture(scope="module")
def envoy(replicas):
    binary = require_envoy()
    replicas.ensure_all_up()
    proxy = EnvoyProcess(binary, replicas.addresses)
    try:
        wait_for(lambda: proxy.healthy_upstreams() == len(HOSTS), timeout=30, what="Envoy: 3 healthy replicas")
        yield proxy
    finally:
        proxy.stop()


def test_proxy_spreads_requests_over_three_replicas(replicas, envoy, references):
    with Client(envoy.address) as client:  # one address, one connection: the proxy balances per call
        assert_spread(replicas, client, references)
    ready = subprocess.run([str(REPO / "deploy" / "envoy" / "envoy-ready")], timeout=30,
                           env=dict(os.environ, ENVOY_ADMIN_PORT=envoy.admin.rpartition(":")[2]))
    assert ready.returncode == 0  # the proxy image's HEALTHCHECK script, against this Envoy


def test_proxy_kill_9_of_a_replica_under_load_loses_no_request(replicas, envoy, references):
    replicas.ensure_all_up()
    wait_for(lambda: envoy.healthy_upstreams() == len(HOSTS), timeout=30, what="Envoy: 3 healthy replicas")
    victim = replicas.procs[HOSTS[2]]
    # the Predict clients do not retry at all: Envoy's own retries must cover the calls the kill cuts (and those
    # sent to the dead replica before its health checks take it out); MD sessions resend their step themselves
    load = ClosedLoop(envoy.address, references, unary_retry=0)
    try:
        load.wait_for_answers(40)
        assert victim.metric("macefield_requests_total", code="OK") > 0
        served_before = replicas.served()
        victim.proc.kill()
        victim.proc.wait(10)
        after_kill = load.total()
        wait_for(lambda: envoy.healthy_upstreams() == len(HOSTS) - 1 or load.errors, timeout=10,
                 what="Envoy takes the dead replica out")
        load.wait_for_answers(60)
        others = {h: replicas.procs[h].metric("macefield_requests_total", method="Predict", code="OK")
                  for h in HOSTS[:2]}
        resent = envoy.stat("cluster.macefield.upstream_rq_retry")  # calls Envoy resent to another replica
    finally:
        load.finish()
    assert resent >= 1, "Envoy should have resent the calls cut by the kill to another replica"
    assert not load.errors, load.errors[:5]
    assert load.total() >= after_kill + 60 and all(n > 0 for n in load.answered), load.answered
    assert all(others[h] > served_before[h] for h in others), (served_before, others)
    replicas.restart(HOSTS[2])
    wait_for(lambda: envoy.healthy_upstreams() == len(HOSTS), timeout=30, what="Envoy: the replica is back")


def test_tls_with_a_list_of_replicas_checks_the_one_name_their_certificates_share(model_path, references, tmp_path):
    """TLS to an address list: gRPC would check the whole list as the host name, so the client refuses to start
    without ``tls_server_name``; with it every replica's certificate is checked against that one name (a
    wrong name fails the handshake) and calls spread over both replicas."""
    from pki import self_signed_tls

    from macefield_client import ServerUnavailable

    tls = self_signed_tls(tmp_path, ("macefield-replicas",))
    hosts = HOSTS[:2]
    port = common_free_port(hosts)
    procs = [ServerProcess(["--model", str(model_path), "--tls-cert", str(tls["crt"]), "--tls-key", str(tls["key"])],
                           host=h, port=port) for h in hosts]
    try:
        addresses = [f"{h}:{port}" for h in hosts]
        for address in addresses:  # each one loaded (a list is ready as soon as one replica is)
            with Client(address, tls=str(tls["crt"]), tls_server_name="macefield-replicas", retry=0) as one:
                one.wait_ready(180)
        with pytest.raises(ValueError, match="tls_server_name: a TLS channel to a list of servers"):
            Client(addresses, tls=str(tls["crt"]))
        with Client(addresses, tls=str(tls["crt"]), tls_server_name="macefield-replicas") as client:
            client.wait_ready(180)
            for i in range(10):
                atoms, field, reference = references[i % len(references)]
                check_answer(client.predict(atoms, electric_field=field, outputs=OUTPUTS), reference)
        served = [p.metric("macefield_requests_total", method="Predict", code="OK") for p in procs]
        assert sum(served) == 10 and min(served) >= 2, served
        with Client(addresses, tls=str(tls["crt"]), tls_server_name="not-the-name", retry=0, timeout=10) as wrong:
            with pytest.raises(ServerUnavailable):
                wrong.predict(references[0][0], electric_field=references[0][1], outputs=OUTPUTS)
    finally:
        for proc in procs:
            proc.kill()


def test_client_side_health_checking_keeps_calls_off_a_replica_that_is_not_serving(replicas, model_path, references):
    """A third replica that is still loading (NOT_SERVING for 60 s, held by a test fault) in the list: with
    health checking (the default for a list) no call goes to it, so none is refused and retried; with
    ``health_check=False`` round_robin sends it its share, refused UNAVAILABLE and retried elsewhere."""
    replicas.ensure_all_up()
    loading = ServerProcess(["--model", str(model_path)], host=HOSTS[2],
                            env={"MACEFIELD_TEST_FAULT": "load_delay_s=60"})
    try:
        addresses = replicas.addresses[:2] + [loading.address]
        for health_check, expect_retries in ((None, False), (False, True)):
            retries = []
            with Client(addresses, health_check=health_check, on_retry=lambda *a: retries.append(a)) as client:
                client.wait_ready(60)
                for i in range(12):
                    atoms, field, reference = references[i % len(references)]
                    check_answer(client.predict(atoms, electric_field=field, outputs=OUTPUTS), reference)
            assert bool(retries) == expect_retries, (health_check, retries[:3])
    finally:
        loading.kill()
