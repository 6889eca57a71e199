"""Calibrate the CPU memory estimate: peak resident growth of one engine pass against the estimate's inputs.

    python bench/memory_model.py [--repeat 4 6] [--largest 8] [--out bench/results/memory_model_cpu.json]

For 16-, 64- and 128-channel FieldMACE models (max_ell 2, 1, 3) and each output tier (0 energy, 1 forces,
2 full response), one pass over alpha-quartz (PBE cell, ``--repeat``^3 hexagonal cells for each size given,
and ``--largest``^3 = 4608 atoms with the 64-channel model: the default model's channels, at max_ell 1 where
the default has 2) runs in a fresh process;
it reports the peak resident growth (ru_maxrss over the pass, with the server's allocator tuning),
the bytes autograd keeps for the pass (unique storages), their ratio, and what
``macefield_server.serving.memory_measure.measure`` estimates for that structure.  The CPU factors of
``macefield_server/serving/memory.py`` come from these ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_json

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"16ch-l1-ell2": dict(channels=16, max_L=1, max_ell=2), "64ch-l1-ell1": dict(channels=64, max_L=1, max_ell=1),
         "128ch-l1-ell3": dict(channels=128, max_L=1, max_ell=3)}

CHILD = r'''
import json, resource, sys, torch
torch.set_num_threads(1)
from macefield_server.serving.runtime import tune_cpu_allocator
tune_cpu_allocator()
from macefield_client.structures import alpha_quartz
from macefield_server.serving.memory_measure import measure
from macefield_server.engine import build_field_mace, default_architecture
from macefield_server.engine.graph import Structure
from macefield_server.engine.predict import prepare_batch
from macefield_server.engine.response import engine_outputs, respond
from macefield_server.serving.registry import ServedModel
kw, tier, rep = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = build_field_mace(default_architecture([8, 14], r_max=5.0, correlation=3, **kw), dtype=torch.float32).eval()
served = ServedModel("m", model, "")
atoms = alpha_quartz(cell="pbe", repeat=(rep, rep, rep), rattle=0.05)
batch = prepare_batch(model, [Structure.from_atoms(atoms)])
outputs = {0: {"energy"}, 1: {"forces", "stress", "dipole"}, 2: {"forces", "stress", "dipole", "born_charges",
                                                                   "polarizability"}}[tier]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
seen = {}
def pack(t):
    st = t.untyped_storage(); seen[st.data_ptr()] = st.nbytes(); return t
base = rss()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    respond(model, batch.tensors, None, engine_outputs(frozenset(outputs)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
saved = sum(seen.values())
estimate = measure(served).estimate(tier, batch.num_edges, len(atoms))
print(json.dumps({"edges": batch.num_edges, "atoms": len(atoms), "peak_bytes": peak, "saved_bytes": saved,
                  "estimate_bytes": estimate}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, nargs="+", default=[4, 6],
                    help="hexagonal cells per side (default 4 6: 576 and 1944 atoms)")
    ap.add_argument("--largest", type=int, default=8,
                    help="also this size with the 64-channel model (default 8: 4608 atoms; 0: no)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_model_cpu.json"))
    args = ap.parse_args(argv)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'client'}:{REPO / 'server'}", "PATH": "/usr/bin:/bin"}
    rows = []
    cases = [(name, kw, rep) for rep in args.repeat for name, kw in ARCHS.items()]
    if args.largest:
        cases.append(("64ch-l1-ell1", ARCHS["64ch-l1-ell1"], args.largest))
    for name, kw, rep in cases:
        for tier in (0, 1, 2):
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw), str(tier), str(rep)],
                                 capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
            row = dict(json.loads(out), model=name, tier=tier, repeat=rep)
            row["peak_per_saved"] = row["peak_bytes"] / row["saved_bytes"] if row["saved_bytes"] else None
            row["estimate_over_peak"] = row["estimate_bytes"] / row["peak_bytes"]
            rows.append(row)
            print(f"{name:14s} x{rep} tier {tier}: {row['edges']} edges, "
                  f"peak {row['peak_bytes'] / row['edges']:.0f} B/edge, "
                  f"estimate/peak {row['estimate_over_peak']:.2f}", flush=True)
    for name, _, rep in cases:
        by_tier = {r["tier"]: r for r in rows if r["model"] == name and r["repeat"] == rep}
        by_tier[0]["tier0_over_tier1_peak"] = by_tier[0]["peak_bytes"] / by_tier[1]["peak_bytes"]
    result = {"bench": "memory_model", "device": "cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "structure": "alpha-quartz PBE cell, repeat^3 hexagonal cells", "rows": rows,
              "estimate_over_peak_min": min(r["estimate_over_peak"] for r in rows)}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
