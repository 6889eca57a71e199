"""bench/gpu_suite.py --smoke: every section of the GPU suite runs on CPU, so the suite cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

from macefield_server.model.cueq import cueq_import_error


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

    # correctness: cueq against e3nn for both models and dtypes, within the targets
    if cueq:
        assert set(sections["correctness"]["cueq_vs_e3nn"]) == {"default_float64", "default_float32", "mh0_float64",
                                                                "mh0_float32"}
        assert all(c["pass"] for n, c in record["checks"].items() if n.startswith("cueq_vs_e3nn"))
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
