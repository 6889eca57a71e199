"""bench/gpu_suite.py --smoke: every section of the GPU suite runs on CPU, so the suite cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def test_gpu_suite_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OUT="")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
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
