"""Helpers for the server tests: requests from ASE atoms, arrays from responses, metrics, a server process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sysconfig
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import grpc
import numpy as np
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

#: (key, shape for N atoms) of every array field of PredictResponse, and its scalar fields: the client's own tables
from macefield_client.contract import arrays_from_response  # noqa: E402


def request_for(atoms, field=(0.0, 0.0, 0.0), head: str = "", outputs: Sequence[str] = (), request_id: str = "",
                model: str = "", **extra) -> pb.PredictRequest:
    return pb.PredictRequest(
        **extra,
        request_id=request_id,
        model=model,
        head=head,
        atomic_numbers=[int(z) for z in atoms.numbers],
        positions=np.asarray(atoms.positions, dtype=float).ravel().tolist(),
        cell=np.asarray(atoms.cell, dtype=float).ravel().tolist(),
        pbc=[bool(p) for p in atoms.pbc],
        electric_field=[float(x) for x in field],
        outputs=list(outputs),
    )


def replace_field(field: str, values):
    """A mutation of a request: the repeated ``field`` replaced by ``values``."""
    def mutate(r):
        del getattr(r, field)[:]
        getattr(r, field).extend(values)
    return mutate


def assign_field(field: str, value):
    """A mutation of a request: the scalar ``field`` set to ``value``."""
    def mutate(r):
        setattr(r, field, value)
    return mutate


@contextlib.contextmanager
def tiny_server(model, default_head: str = "sio2", **config):
    """``model`` served as "tiny" by an in-process server on free ports; ``config``: more ServerConfig fields."""
    from macefield_server.serving.background import BackgroundServer
    from macefield_server.serving.config import ServerConfig
    from macefield_server.serving.registry import ServedModel

    with BackgroundServer(ServerConfig(port=0, metrics_port=0, **config),
                          [ServedModel("tiny", model, default_head)]) as server:
        yield server


@contextlib.contextmanager
def stub_to(port: int):
    """A MaceField stub over a plaintext loopback channel to ``port`` (closed afterwards)."""
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield rpc.MaceFieldStub(channel)
    finally:
        channel.close()


def arrays(response: pb.PredictResponse) -> Dict[str, np.ndarray]:
    """The response's outputs as numpy arrays shaped like the engine's (the contract's mapping)."""
    return arrays_from_response(response)


def assert_matches(response: pb.PredictResponse, reference: Dict[str, np.ndarray], rtol=1e-9, atol=1e-10):
    got = arrays(response)
    assert sorted(got) == sorted(reference), (sorted(got), sorted(reference))
    for key, value in reference.items():
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=atol, err_msg=f"{key} of {response.request_id}")


def scrape(port: int, host: str = "127.0.0.1") -> Dict[str, float]:
    """Every sample of the /metrics page as {'name{label="v",...}': value}."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def metric(port: int, metric_name: str, host: str = "127.0.0.1", **labels) -> float:
    """Sum of the samples of ``metric_name`` whose labels include ``labels`` (the /metrics page on ``host``)."""
    total = 0.0
    for key, value in scrape(port, host).items():
        base, _, rest = key.partition("{")
        if base != metric_name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def lists_models(stub, metadata=None) -> bool:
    """True once the server behind ``stub`` (a MaceFieldStub) answers ListModels (sent with ``metadata``, e.g.
    a token): its models are loaded."""
    import grpc

    try:
        stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
        return True
    except grpc.RpcError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def common_free_port(hosts: Sequence[str]) -> int:
    """A TCP port free on every address of ``hosts`` (replicas reached by one DNS name, or listed with one port)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {list(hosts)}")


class ServerProcess:
    """``macefield-serve`` in a child process (module entry point, same interpreter) on ``host``; ``port`` 0 and
    /metrics on an ephemeral port unless given."""

    def __init__(self, args: Sequence[str], env: Optional[dict] = None, host: str = "127.0.0.1", port: int = 0,
                 metrics_port: int = 0):
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.host = host
        self._log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "macefield_server.cli.serve", "--host", host, "--port", str(port),
             "--metrics-port", str(metrics_port), "--threads", "1", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=full_env,
        )
        while True:  # libraries may print before the server's JSON line
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server did not start: {self.stderr()}")
            if line.startswith("{") and '"listening"' in line:
                break
        info = json.loads(line)
        self.port, self.metrics_port, self.health_port = info["port"], info["metrics_port"], info.get("health_port")
        self.address = f"{host}:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        """Block until the server prints its ``ready`` line (models loaded and warm), for fixtures that serve a model
        to many tests: a client's retries ride out the loading, but not on a machine loaded enough to make it slow.
        Raises (and kills the server) if it exits or is not ready within ``timeout`` s; returns ``self``."""
        seen = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("{") and '"ready"' in line:
                    seen.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not seen.is_set():
            why = "exited" if not reader.is_alive() else f"was not ready after {timeout:.0f} s"
            self.kill()
            raise RuntimeError(f"server {why}: {self.stderr()}")
        return self

    def metric(self, name: str, **labels) -> float:
        """``name`` summed over the samples with ``labels`` on this server's /metrics."""
        return metric(self.metrics_port, name, host=self.host, **labels)

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def save_tiny_model(path: Path, seed: int = 3) -> Path:
    from conftest import random_field_model

    from macefield_server.engine import save_model

    return save_model(random_field_model(heads=("sio2", "other"), seed=seed), path)


# Installed first thing in every client subprocess (PYTHONPATH): any import of
# these packages fails as if they were not installed; at exit it writes which
# imports were refused, so the test knows the guard was active.
BLOCKER = textwrap.dedent(
    """
    import atexit, importlib.abc, os, sys

    BLOCKED = ("torch", "macefield_server", "e3nn", "mace")
    refused = []

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                refused.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (torch-free test environment)", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())

    @atexit.register
    def _report():
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        with open(os.environ["TORCHFREE_REPORT"], "a") as fh:
            fh.write(f"active pid={os.getpid()} refused={refused} loaded={loaded}\\n")
    """
)


#: the project's commands: console script -> the module that runs it with ``python -m``
COMMANDS = {"macefield": "macefield_client.cli", "macefield-ipi": "macefield_client.ipi",
            "macefield-serve": "macefield_server.cli.serve", "macefield-health": "macefield_server.cli.health",
            "macefield-train": "macefield_server.cli.train", "macefield-calibrate": "macefield_server.cli.calibrate",
            "macefield-convert": "macefield_server.cli.convert"}


def project_command(name: str) -> List[str]:
    """The argv prefix that runs the project's command ``name`` with the interpreter under test.

    Its console script in that interpreter's scripts folder when installed there (a virtual environment whose
    ``bin`` is not on PATH included), else ``python -m`` its module: never whatever PATH happens to find.
    """
    script = Path(sysconfig.get_path("scripts")) / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", COMMANDS[name]]


def interruptible(command: Sequence[str]) -> List[str]:
    """``command`` (a Python command line) started with SIGINT at its default, so that the child turns a SIGINT
    into KeyboardInterrupt even when the test run itself ignores SIGINT (a shell's background job does, and its
    children inherit that)."""
    assert command[0] == sys.executable, command
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", reset, *command]


def torch_free_env(tmp_path: Path):
    """(environment, report path) for a subprocess in which torch (and the server package) cannot be imported.

    The guard goes first on PYTHONPATH; what was there stays after it (a checkout tested without installing it).
    """
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(BLOCKER)
    report = tmp_path / "torchfree.txt"
    path = os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TORCHFREE_REPORT=str(report), MACEFIELD_SERVER="")
    return env, report


def assert_torch_free(report: Path) -> None:
    """Every guarded process ran with the guard active and loaded nothing blocked."""
    lines = report.read_text().splitlines()
    assert lines and all(line.startswith("active") and "loaded=[]" in line for line in lines), lines


def run_torch_free(args, env_report, timeout=180, **kwargs):
    """Run ``args`` torch-free (``kwargs``: e.g. ``cwd``); assert exit 0 and :func:`assert_torch_free`."""
    env, report = env_report
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert_torch_free(report)
    return proc


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), MB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
