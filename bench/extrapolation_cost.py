"""Cost of the extrapolation grade: energy + forces with and without it (target: at most +10%).

Times what the server runs for one batch (``respond`` + ``split_results``,
the served path's ``EngineBackend``) on the shipped default model (calibrated,
float32 as stored unless ``--dtype``), for 72-atom alpha-quartz frames
(../shared/data/sio2-quartz-md.xyz, else a 2x2x2 PBE alpha-quartz cell),
alone and in batches, at zero field and at each ``--fields`` magnitude (V/A,
along z; default 0 and 0.05).  "With the grade" includes the field range
(``field_extrapolation``), which always comes with it.  The two variants alternate call by call, so that load
from other processes hits both alike; medians over ``--repeats`` calls.
``grade_only_ms`` times the grade itself on the features of one pass (its
ratio to the pass is the overhead's estimate that load disturbs least).

Usage::

    python bench/extrapolation_cost.py --out bench/results/extrapolation_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from results_io import write_json

import torch

from macefield_server.engine import load_model, prepare_batch
from macefield_server.engine.extrapolation import field_extrapolation, grade_from_layers
from macefield_server.engine.graph import Structure
from macefield_server.engine.extrapolation import statistics_of
from macefield_server.engine.predict import graded_head_indices, split_results
from macefield_server.engine.response import respond
from macefield_server.weights import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sio2-quartz-md.xyz"
PLAIN = frozenset({"energy", "forces"})
GRADED = PLAIN | {"extrapolation"}


def quartz_frames(n: int):
    if DATA.exists():
        import ase.io

        return ase.io.read(DATA, f":{n}"), f"{DATA.name} frames 0:{n}"
    from macefield_client.structures import alpha_quartz

    return ([alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=0.03, seed=s) for s in range(n)],
            "alpha_quartz(pbe, 2x2x2)")


def serve_once(model, batch, outputs, graded):
    """What the batcher computes for one batch (respond, then one dict per structure)."""
    return split_results(batch, respond(model, batch.tensors, None, outputs), outputs, graded)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "extrapolation_cost_cpu.json"))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default: as stored")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fields", type=float, nargs="+", default=[0.0, 0.05], metavar="E",
                        help="field magnitudes along z, V/A (default 0 0.05)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    model = load_model(DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    graded = graded_head_indices(model)
    frames, source = quartz_frames(max(args.batch_sizes))
    rows = []
    for size, magnitude in [(s, e) for e in args.fields for s in args.batch_sizes]:
        field = [0.0, 0.0, magnitude]
        batch = prepare_batch(model, [Structure.from_atoms(a, electric_field=field, head="sio2")
                                      for a in frames[:size]])
        for outputs in (PLAIN, GRADED, PLAIN, GRADED):  # warm-up both
            serve_once(model, batch, outputs, graded)
        plain, with_grade = [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: serve_once(model, batch, PLAIN, graded)))
            with_grade.append(timed(lambda: serve_once(model, batch, GRADED, graded)))
        layers = []
        with torch.no_grad():
            t = batch.tensors
            model.enthalpy(t, t["positions"], t["electric_field"], None, field_free_features=layers)
        grade_only = [timed(lambda: (grade_from_layers(model, t, layers),
                                     field_extrapolation(model, t, t["electric_field"]))) for _ in range(args.repeats)]
        a, b = statistics.median(plain), statistics.median(with_grade)
        row = {
            "structures": size,
            "field_V_per_A": [0.0, 0.0, magnitude],
            "atoms": int(sum(len(f) for f in frames[:size])),
            "energy_forces_ms": 1e3 * a,
            "energy_forces_grade_ms": 1e3 * b,
            "overhead": b / a - 1.0,
            "grade_only_ms": 1e3 * statistics.median(grade_only),
            # less noisy under load than the difference of two medians: the grade's own time over the pass's
            "grade_only_over_energy_forces": statistics.median(grade_only) / a,
            "energy_forces_ms_p10_p90": [1e3 * q for q in statistics.quantiles(plain, n=10)[::8]],
            "energy_forces_grade_ms_p10_p90": [1e3 * q for q in statistics.quantiles(with_grade, n=10)[::8]],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = {
        "benchmark": "extrapolation_cost",
        "command": "python bench/extrapolation_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": str(DEFAULT_MODEL.relative_to(REPO)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": args.device,
        "threads": args.threads,
        "structures_source": source,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "cpus_on_machine": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "target": "energy + forces + grade (and field range) at most 10% above energy + forces, "
                  "at zero and finite field",
        "method": statistics_of(model).method,
        "max_overhead": max(r["overhead"] for r in rows),
        # conservative: the larger of the measured difference and the grade's own share, over all batch sizes
        "overhead_bound": max(max(r["overhead"], r["grade_only_over_energy_forces"]) for r in rows),
        "met": max(max(r["overhead"], r["grade_only_over_energy_forces"]) for r in rows) <= 0.10,
        "rows": rows,
    }
    write_json(args.out, out, say=False)
    print(f"wrote {args.out}: overhead {100 * out['max_overhead']:.1f}% measured, "
          f"{100 * out['overhead_bound']:.1f}% bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
