"""``macefield md`` when its server dies mid-run: a real ``macefield-serve`` process (a small random float64
model: the failure path is the same for any model) is killed (SIGKILL) while a torch-free ``macefield md`` runs
against it.  The command must write what was recorded (the npz and the extended XYZ), say on stderr that the
server failed and name the failure, and exit 1."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from serving import ServerProcess, assert_torch_free, save_tiny_model, torch_free_env, wait_for


def test_md_writes_what_was_recorded_when_the_server_dies(tmp_path):
    import ase.io

    from macefield_client import Client
    from macefield_client.structures import alpha_quartz

    server = ServerProcess(["--model", str(save_tiny_model(tmp_path / "tiny.pt"))])
    try:
        with Client(server.address) as client:  # retried while the model loads: the server is serving after it
            client.predict(alpha_quartz(), head="sio2")
        env, report = torch_free_env(tmp_path)
        npz, xyz = tmp_path / "cut.npz", tmp_path / "cut.xyz"
        proc = subprocess.Popen([sys.executable, "-m", "macefield_client.cli", "md", "alpha-quartz", "--server",
                                 server.address, "--retries", "0", "--head", "sio2", "--replicas", "2",
                                 "--temperature", "300", "--record-every", "1", "--equilibrate", "0", "--seed", "2",
                                 "--steps", "100000", "--out", str(npz), "--extxyz", str(xyz)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # some steps answered (one PredictBatch call per step), then the server dies
            wait_for(lambda: server.metric("macefield_requests_total", method="PredictBatch", code="OK") >= 20,
                     timeout=120, what="20 MD steps answered")
            server.kill()
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        server.kill()
    assert proc.returncode == 1, (stdout, stderr)
    assert_torch_free(report)
    assert "stopped by a server failure" in stderr and "ServerUnavailable" in stderr, stderr
    assert "macefield: " in stderr.splitlines()[-1] and server.address in stderr.splitlines()[-1], stderr
    records = np.load(npz)["record_time_fs"]
    assert records.shape[0] == 2 and 10 <= records.shape[1] < 100_000 and np.all(np.diff(records[0]) == 1.0)
    frames = ase.io.read(xyz, index=":")
    assert len(frames) == 2 * records.shape[1]
