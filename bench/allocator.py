#!/usr/bin/env python3
"""glibc allocator tuning (macefield_server.serving.runtime.tune_cpu_allocator) on and off, on the served path.

Each configuration runs in a fresh process (mallopt is process-wide and cannot be undone): the engine
path the batcher takes for one structure (collate + engine pass + split, EngineBackend.run), single
thread, for the embedded default model and a 64-channel max_ell 3 random model (a larger model, as a
foundation checkpoint would be), on 72-atom alpha-quartz, energy + forces and the full response.  Per
point: median CPU seconds, median minor page faults of a call, and the process's peak RSS.  Runs
alternate off/on ``--rounds`` times so that a load change hits both alike.

    python bench/allocator.py [--rounds 3] [--out bench/results/allocator-cpu-<UTC>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = {"energy_forces": ["energy", "forces"],
           "full": ["energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"]}


def child(tuned: bool, repeats: int) -> dict:
    """One configuration in this (fresh) process."""
    import resource

    import torch

    torch.set_num_threads(1)
    from macefield_server.serving.runtime import tune_cpu_allocator

    applied = tune_cpu_allocator() if tuned else False
    from macefield_client.contract import resolve_outputs
    from macefield_client.structures import PBE_QUARTZ_CELL, alpha_quartz
    from macefield_server.engine import build_field_mace, default_architecture
    from macefield_server.engine.graph import Structure, neighbour_list
    from macefield_server.serving.engine_backend import EngineBackend
    from macefield_server.serving.metrics import Metrics
    from macefield_server.serving.registry import ServedModel, load_default_model

    class Item:
        def __init__(self, structure, graph, outputs):
            self.structure, self.graph, self.outputs = structure, graph, outputs
            self.head_index, self.request_id = 0, "bench"

        @property
        def n_atoms(self):
            return self.structure.n_atoms

    torch.manual_seed(0)
    large = build_field_mace(default_architecture([8, 14], heads=["sio2"], channels=64, max_ell=3),
                             dtype=torch.float32).eval()
    models = {"default (64x0e+64x1o, max_ell 2)": load_default_model(),
              "random 64x0e+64x1o, max_ell 3": ServedModel("large", large, "sio2")}
    atoms = alpha_quartz(cell=PBE_QUARTZ_CELL, repeat=(2, 2, 2))
    result = {"tuned": tuned, "applied": applied, "points": []}
    for name, served in models.items():
        backend = EngineBackend(served, Metrics())
        structure = Structure.from_atoms(atoms, electric_field=[0.0, 0.0, 0.01], head=served.default_head)
        graph = neighbour_list(structure, served.cutoff)
        for label, names in OUTPUTS.items():
            outputs = resolve_outputs(names)
            item = Item(structure, graph, outputs)
            backend.evaluate(backend.collate([item]), [item])  # warm
            cpu, faults = [], []
            for _ in range(repeats):
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                backend.evaluate(backend.collate([item]), [item])
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                faults.append(r1.ru_minflt - r0.ru_minflt)
            result["points"].append({"model": name, "outputs": label, "cpu_s": statistics.median(cpu),
                                     "minor_faults": statistics.median(faults)})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "on", args.repeats)))
        return 0
    runs = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = []
    for point in runs[0]["points"]:
        key = (point["model"], point["outputs"])
        row = {"model": key[0], "outputs": key[1]}
        for tuned in (False, True):
            pts = [p for r in runs if r["tuned"] == tuned for p in r["points"] if (p["model"], p["outputs"]) == key]
            row["on" if tuned else "off"] = {"cpu_s": statistics.median(p["cpu_s"] for p in pts),
                                            "minor_faults": statistics.median(p["minor_faults"] for p in pts)}
        row["cpu_on_over_off"] = row["on"]["cpu_s"] / row["off"]["cpu_s"]
        summary.append(row)
    record = {"bench": "allocator", "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "load_avg": os.getloadavg()},
              "structure": "alpha-quartz, PBE cell, 2x2x2 (72 atoms), field (0, 0, 0.01) V/A",
              "threads": 1, "rounds": args.rounds, "repeats": args.repeats,
              "peak_rss_mb": {"off": [r["peak_rss_mb"] for r in runs if not r["tuned"]],
                              "on": [r["peak_rss_mb"] for r in runs if r["tuned"]]},
              "summary": summary, "runs": runs}
    out = args.out or RESULTS / f"allocator-cpu-{record['utc'].replace(':', '').replace('-', '')}.json"
    print(json.dumps(summary, indent=1))
    write_json(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
