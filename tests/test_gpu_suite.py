"""bench/gpu_suite.py: --smoke runs every section on CPU, so the suite cannot rot; without CUDA it stops at once
with its environment written; killed, it leaves no server behind; stopped by SIGTERM, it writes what it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, random_field_model

from macefield_server.engine.cueq import cueq_import_error

sys.path.insert(0, str(REPO / "bench"))
import gpu_suite  # noqa: E402


def test_models_are_made_once_and_the_originals_never_change():
    """The suite's cache: a float32 copy leaves the float64 original bit for bit as it was (the served
    checkpoint is written from such a copy), and asking again returns the same model, not a new one."""
    base = random_field_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cache = gpu_suite.ModelCache({"m": base})
    copy32 = cache.get("m", torch.float32, "cpu", "e3nn")
    assert next(copy32.parameters()).dtype == torch.float32 and not any(p.requires_grad for p in copy32.parameters())
    assert cache.get("m", torch.float32, torch.device("cpu"), "e3nn") is copy32
    assert next(base.parameters()).dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [(e["model"], e["dtype"], e["backend"]) for e in cache.log] == [("m", "float32", "e3nn")]


SUITE = REPO / "bench" / "gpu_suite.py"


def suite_env(**extra: str) -> dict:
    """The suite's environment: this interpreter's import path, ``OUT`` unset unless given."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OUT": "", **extra}


def proc_stat(pid: int) -> dict | None:
    """State, parent, session and start time (clock ticks) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return {"state": fields[0], "ppid": int(fields[1]), "session": int(fields[3]), "start": int(fields[19])}


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every process below ``pid`` in the process table now."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            children.setdefault(stat["ppid"], []).append(int(entry.name))
            starts[int(entry.name)] = stat["start"]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def running(processes: dict[int, int]) -> list[int]:
    """Those of {pid: start time} still running (a zombie or a new process under a reused pid is not)."""
    alive = []
    for pid, start in processes.items():
        stat = proc_stat(pid)
        if stat is not None and stat["start"] == start and stat["state"] not in ("Z", "X"):
            alive.append(pid)
    return alive


def wait_for_record(out: Path, ready, proc: subprocess.Popen, timeout_s: float) -> dict:
    """The suite's JSON in ``out`` once ``ready(record)`` holds (polled every 0.1 s; fails if the suite exits)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        for path in out.glob("gpu_suite-*.json"):
            record = json.loads(path.read_text())
            if ready(record):
                return record
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the suite's JSON never got there in {timeout_s} s")


def wait_gone(processes: dict[int, int], timeout_s: float = 10.0) -> list[int]:
    """Waits up to ``timeout_s`` seconds for every one of {pid: start time} to end; those still running."""
    end = time.monotonic() + timeout_s
    while running(processes) and time.monotonic() < end:
        time.sleep(0.1)
    return running(processes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a machine without CUDA")
@pytest.mark.parametrize("device", [[], ["--device", "cuda"]], ids=["default-device", "device-cuda"])
def test_without_cuda_the_suite_stops_at_once_and_writes_its_environment(tmp_path, device):
    """No CPU fallback for a GPU run: one line with what torch reports, exit code 2 within seconds, and the
    environment (torch, CUDA build, the driver's error, every module's version) in $OUT."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(SUITE), *device], capture_output=True, text=True, timeout=120,
                          env=suite_env(OUT=str(tmp_path)))
    seconds = time.monotonic() - t0
    assert done.returncode == 2, (done.stdout[-3000:], done.stderr[-3000:])
    assert seconds < 60, seconds  # imports only (about 5 s on a quiet machine): no model is built
    line = done.stdout.splitlines()[0]
    assert line.startswith(f"no CUDA device visible: torch {torch.__version__} (CUDA build {torch.version.cuda})")
    assert "torch.cuda.is_available() False" in line and "torch.cuda.init(): " in line
    assert "Traceback" not in done.stderr
    (path,) = tmp_path.glob("gpu_suite-cuda-*.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".txt").name]
    record = json.loads(path.read_text())
    env = record["environment"]
    assert env["problems"] == [line] and record["sections"] == {}
    assert env["torch"] == torch.__version__ and env["torch_cuda_build"] == torch.version.cuda
    assert env["cuda_available"] is False and env["cuda_init_error"]
    assert all(not env[f"{m.split('.')[0]}_version"].startswith("not importable") for m in gpu_suite.REQUIRED_MODULES)
    assert line in path.with_suffix(".txt").read_text()


def test_a_missing_package_is_named_before_anything_runs(tmp_path):
    """A required module that does not import (here torchmetrics, which mace imports when it loads) is named in
    one line, exit code 2, even with --device cpu; nothing is built."""
    shadow = tmp_path / "shadow" / "torchmetrics"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torchmetrics\'")\n')
    env = suite_env(OUT=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, str(SUITE), "--device", "cpu"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, (done.stdout[-3000:], done.stderr[-3000:])
    line = done.stdout.splitlines()[0]
    assert line.startswith("missing packages: mace (") and "torchmetrics (ModuleNotFoundError" in line
    (path,) = tmp_path.glob("gpu_suite-cpu-*.json")
    env = json.loads(path.read_text())["environment"]
    assert env["problems"] == [line] and env["torchmetrics_version"].startswith("not importable")


def test_killed_suite_leaves_no_server_behind(tmp_path):
    """SIGKILL (nothing of the suite runs after it) while its servers are serving: each in its own session, they
    die with it."""
    proc = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--sections", "server", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=suite_env())
    try:
        record = wait_for_record(tmp_path, lambda r: "server_pids" in r, proc, 300)
        # serving: they have written all they write to the suite's pipe (a write to it after the kill would end them)
        end = time.monotonic() + 300
        while sum("ready: serving" in p.read_text() for p in tmp_path.glob("*-server-*.log")) < 2:
            assert time.monotonic() < end and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        tree = descendants(proc.pid)
        servers = set(record["server_pids"].values())
        assert servers <= set(tree) and len(servers) == 2
        assert all(proc_stat(pid)["session"] == pid for pid in servers)  # own session and process group
        proc.kill()
        proc.wait(30)
        assert wait_gone(tree) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_during_the_server_section_writes_what_was_measured(tmp_path):
    """SIGTERM after the first client level: the finished correctness section and that level are in the JSON, the
    summary says what stopped the run, the servers are stopped, exit code 128 + 15."""
    proc = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--sections", "correctness", "server",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=suite_env())
    try:
        wait_for_record(tmp_path, lambda r: "1" in r["sections"].get("server", {}).get("results", {}), proc, 300)
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (stdout[-3000:], stderr[-3000:])
    assert wait_gone(tree) == []
    (path,) = tmp_path.glob("gpu_suite-smoke-*.json")
    record = json.loads(path.read_text())
    assert record["terminated"]["signal"] == "SIGTERM" and record["terminated"]["during"] == "server"
    sections = record["sections"]
    assert "error" not in sections["correctness"] and sections["correctness"]["seconds"] > 0
    assert "1" in sections["server"]["results"] and "md_step" not in sections
    assert set(sections["server"]["exit_codes"]) == {"batching", "no-batching"}
    assert "stopped by SIGTERM during server" in path.with_suffix(".txt").read_text()
    assert f"stopped by SIGTERM: what was measured is in {path}" in stdout


def test_a_stop_signal_swallowed_by_a_library_callback_still_stops_the_suite():
    """asyncio logs and drops any exception (Terminated included) raised in a plain callback: a SIGTERM that lands
    there must still stop the suite at its next check (the race that let a stopped suite run on and exit 0)."""
    import asyncio
    import logging

    previous = {sig: signal.getsignal(sig) for sig in gpu_suite.STOP_SIGNALS}
    heard = []
    logging.getLogger("asyncio").disabled = True
    try:
        gpu_suite.stop_on_signals(heard.append)

        async def signal_inside_a_callback():
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.call_soon(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))
            loop.call_later(0.2, done.set_result, None)
            await done

        asyncio.run(signal_inside_a_callback())  # returns normally: the raise in the callback was swallowed
        assert heard == ["SIGTERM"]
        with pytest.raises(gpu_suite.Terminated) as stop:
            gpu_suite.check_stop()
        assert stop.value.signum == signal.SIGTERM
    finally:
        logging.getLogger("asyncio").disabled = False
        gpu_suite._STOPPED.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_gpu_suite_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=suite_env())
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    (path,) = tmp_path.glob("gpu_suite-smoke-*.json")
    record = json.loads(path.read_text())
    assert path.with_suffix(".txt").read_text().startswith("gpu_suite on cpu (smoke)")
    sections = record["sections"]
    assert set(sections) == {"correctness", "engine", "server", "md_step"}
    assert not [n for n in record["notes"] if "budget" in n]  # nothing skipped
    cueq = cueq_import_error() is None
    assert record["environment"]["cueq"] == cueq
    # each model made once per (dtype, device, backend): the cueq conversions of the correctness section are reused
    made = [(c["model"], c["dtype"], c["device"], c["backend"]) for c in record["conversions"]]
    assert len(made) == len(set(made))
    assert sum(b == "cueq" for *_, b in made) == (4 if cueq else 0)
    # the servers' logs are in the output folder (the device tool brings them back), with the suite's files
    logs = sorted(tmp_path.glob("gpu_suite-smoke-*-server-*.log"))
    assert [p.name for p in logs] == sorted(sections["server"]["logs"]) and len(logs) == 2
    assert all("ready: serving" in p.read_text() for p in logs)
    assert len(list(tmp_path.iterdir())) == 4  # JSON, text, two logs: within the device tool's 8 files

    # correctness: cueq against e3nn for both models and dtypes, within the targets
    if cueq:
        assert set(sections["correctness"]["cueq_vs_e3nn"]) == {"default_float64", "default_float32", "mh0_float64",
                                                                "mh0_float32"}
        assert all(c["pass"] for n, c in record["checks"].items() if n.startswith("cueq_vs_e3nn"))
        # smoke models are built in float64: the strict float64 target applies (a float32 checkpoint gets 1e-8)
        assert sections["correctness"]["coupling_tensor_precision"] == {"default": "float64", "mh0": "float64"}
        assert record["checks"]["cueq_vs_e3nn_default_float64"]["target"] == "<= 1e-10"
    # engine: every backend, tier and second-order strategy at two batch sizes
    kinds = {(r["dtype"], r["backend"], r["outputs"], r["second_order"]) for r in sections["engine"]["series"]}
    expected = {(d, "e3nn", "energy_forces", "loop") for d in ("float32", "float64")}
    expected |= {(d, "e3nn", "full", s) for d in ("float32", "float64") for s in ("loop", "vmap")}
    if cueq:
        expected |= {(d, "cueq", o, "loop") for d in ("float32", "float64") for o in ("energy_forces", "full")}
    assert kinds == expected
    for row in sections["engine"]["series"]:
        assert [p["structures"] for p in row["points"]] == [1, 2]
        assert all(p["structures_per_s"] > 0 and p["us_per_atom"] > 0 for p in row["points"])
    # server: the ensemble MD of the client, each step's replicas in one batch, with and without alpha
    ensemble = sections["server"]["ensemble"]
    assert set(ensemble["results"]) == {"2_efp", "2_alpha"}, ensemble
    assert all(r["steps_per_s"] > 0 and r["calls_per_step"] == 1 and r["mean_batch"] == 2
               for r in ensemble["results"].values())
    # server: both clients levels, four modes each, every request answered
    for level in ("1", "2"):
        row = sections["server"]["results"][level]
        assert set(row) == {"predict_batching", "stream_batching", "predict_no_batching", "direct"}
        assert all(v["completed"] >= int(level) and v["throughput_sps"] > 0 for v in row.values())
    assert sections["server"]["exit_codes"] == {"batching": 0, "no-batching": 0}
    # md step: every stage timed, and the stream round trip
    stages = sections["md_step"]["stage_ms"]
    assert set(stages) == {"decode", "validation", "neighbour_list", "collate_cpu", "host_to_device", "compute",
                           "device_to_host", "split", "encode"}
    assert all(v > 0 for v in stages.values())  # timings of a busy CPU: their sizes mean nothing here
    assert sections["md_step"]["stream_round_trip_ms"] > 0 and sections["md_step"]["server_timing_ms"]["compute"] > 0
    # host against device: the host path's breakdown for both sizes, with the device-list path's preparation
    rows = {r["name"]: r for r in sections["md_step"]["host_path"]}
    assert set(rows) == {"quartz-72", "quartz-576"}
    for name, row in rows.items():
        assert row["stages"]["device_collate"]["us_per_atom"] > 0 and row["cpu_model_total"]["us_per_atom"] > 0
        check = record["checks"][f"host_path_{name}"]
        assert check["limited_by"] in ("host", "device") and check["device_nl_limited_by"] in ("host", "device")
        assert check["device_collate_us_per_atom"] > 0


def test_hysteresis_section_only_when_named(tmp_path):
    """The optional hysteresis section (the published 200 ps BaTiO3 loop on a GPU) runs its code path with
    --smoke (10 steps of the 135-atom cell on the embedded default model, its own server stopped after it),
    and the default sections do not include it."""
    assert "hysteresis" not in gpu_suite.parse_args(["--smoke"]).sections
    assert gpu_suite.parse_args([]).hysteresis_period_ps == 200.0
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--sections", "hysteresis", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=suite_env())
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    (path,) = tmp_path.glob("gpu_suite-smoke-*.json")
    loop = json.loads(path.read_text())["sections"]["hysteresis"]
    assert "error" not in loop and loop["exit_code"] == 0 and loop["n_atoms"] == 135
    assert loop["steps"] == 10 and loop["protocol"]["amplitude_V_A"] == 0.3636
    assert 0.0 < loop["saturation_polarization_uC_cm2"] < 100.0  # P driven along +E0 for 20 fs
    assert (tmp_path / path.name.replace(".json", "-server-hysteresis.log")).is_file()
    assert "hysteresis, period 0.02 ps (10 steps" in path.with_suffix(".txt").read_text()
