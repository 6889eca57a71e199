"""deploy/slurm: the scripts the sbatch example runs on each node, run here for real.

No Slurm here: ``start-replica.sh`` (what ``srun`` starts on every GPU node) runs as two processes bound to
127.0.0.2 and 127.0.0.3, ``replica-list.sh`` waits for both and prints the list, and the MD example of the
sbatch file runs against that list, torch-free; SIGTERM (what the end of the job sends) drains every
replica and removes its address file.  The sbatch file itself is checked for syntax, its ``#SBATCH``
directives and the commands it names.  SIGTERM goes to each script's process group, as Slurm signals
every process of a step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import REPO
from serving import common_free_port, metric, save_tiny_model, torch_free_env

SLURM = REPO / "deploy" / "slurm"
HOSTS = ("127.0.0.2", "127.0.0.3")
SBATCH_OPTIONS = {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output"}


def test_sbatch_file_is_valid_bash_with_known_directives_and_existing_commands():
    text = (SLURM / "macefield.sbatch").read_text()
    for script in ("macefield.sbatch", "start-replica.sh", "replica-list.sh"):
        assert subprocess.run(["bash", "-n", str(SLURM / script)]).returncode == 0, script
        assert os.access(SLURM / script, os.X_OK), f"{script} is not executable"
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", text, re.M))
    assert set(directives) <= SBATCH_OPTIONS and {"nodes", "gpus-per-node"} <= set(directives), directives
    assert directives["gpus-per-node"] == "1" and directives["ntasks-per-node"] == "1"  # one server per GPU node
    assert '"$here/start-replica.sh"' in text and '"$here/replica-list.sh" "$REPLICA_DIR"' in text
    (md,) = re.findall(r"python (client/examples/\S+\.py)((?: --[a-z-]+)+|.*)", text)[:1]
    help_text = subprocess.run([sys.executable, str(REPO / md[0]), "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    for option in re.findall(r"(--[a-z-]+)", md[1]):
        assert option in help_text, f"{md[0]} has no {option}"


def test_replicas_started_by_the_node_script_serve_md_clients_given_the_list(tmp_path):
    model = save_tiny_model(tmp_path / "tiny.pt")
    replica_dir = tmp_path / "replicas"
    port = common_free_port(HOSTS)
    bindir = str(Path(sys.executable).parent)  # macefield-serve / macefield-health of this environment
    procs, outputs = [], []
    for host in HOSTS:
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
                   REPLICA_DIR=str(replica_dir), MACEFIELD_PORT=str(port), MACEFIELD_METRICS_PORT="0",
                   MACEFIELD_BIND=host, MACEFIELD_ADVERTISE=host,
                   MACEFIELD_SERVE_ARGS=f"--model {model} --threads 1 --grace 30")
        proc = subprocess.Popen([str(SLURM / "start-replica.sh")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own group
        lines: list = []
        threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True).start()
        procs.append(proc)
        outputs.append(lines)
    try:
        listed = subprocess.run([str(SLURM / "replica-list.sh"), str(replica_dir), str(len(HOSTS)), "150"],
                                capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0, listed.stderr + "".join(sum(outputs, []))
        servers = listed.stdout.strip()
        assert sorted(servers.split(",")) == sorted(f"{h}:{port}" for h in HOSTS)
        metrics_ports = [json.loads(next(ln for ln in out if '"listening"' in ln))["metrics_port"] for out in outputs]
        # the sbatch file's MD step (fewer steps, a small cell), torch-free, MACEFIELD_SERVER = the list
        env, report = torch_free_env(tmp_path)
        env["MACEFIELD_SERVER"] = servers
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env["PYTHONPATH"], os.environ.get("PYTHONPATH")]))
        runs = [subprocess.Popen([sys.executable, str(REPO / "client" / "examples" / "nvt_quartz.py"), "--steps",
                                  "3", "--repeat", "1", "1", "1", "--log-every", "1", "--seed", str(seed)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed in range(2)]
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-2000:]
            assert f"server ipv4:{servers}" in out
        assert all(ln.startswith("active") and "loaded=[]" in ln for ln in report.read_text().splitlines())
        answered = [metric(p, "macefield_stream_messages_total", host=h, event="answered")
                    for h, p in zip(HOSTS, metrics_ports)]
        assert sum(answered) >= 2 * 4, answered  # every MD step of both runs was answered by a replica
        for proc in procs:  # the end of the job: Slurm sends SIGTERM to every process of the step
            os.killpg(proc.pid, signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0] * len(HOSTS), "".join(sum(outputs, []))[-3000:]
        assert not list(replica_dir.glob("*.addr"))
    finally:
        for proc in procs:  # the script and the server it started, whatever state the test left them in
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
