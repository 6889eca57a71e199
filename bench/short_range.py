"""Short-range scans of a model: one real pair pushed together inside a validation frame, energy along the way.

For each head of the default model and each pair type of its data (SiO2:
Si-O, O-O, Si-Si; BaTiO3: Ba-O, Ti-O, O-O, Ba-Ti), the closest pair of that
type in the first validation frame (the first frame of the last 20% of the
file) is pushed together, moving the second atom of the pair along the bond,
from the shortest distance of that pair type in the whole file down to
0.6 A in steps of 0.05 A (:mod:`macefield_server.training.short_range`),
and F is evaluated in float64.  Reported per scan: the start distance, the
lowest F along the scan relative to F at the start (eV; 0 when F only rises)
and where it is, the largest drop between neighbouring points and where it
ends, every distance at which F falls, the steps over which the universal ZBL
repulsion of the moved atom itself falls (it passes a third atom: F may fall
there) and the falls elsewhere, whether F rises monotonically, and the
profile: distances, F relative to the start, and the moved atom's distance
to the nearest atom other than its anchor (a scan that passes near a third
atom probes that pair too).

Usage (from the repository root, data in ../shared/data)::

    python bench/short_range.py --model server/macefield_server/weights/default.pt \\
        --out bench/results/short_range_default.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from results_io import RESULTS, write_json

import numpy as np
import torch

from macefield_server.engine.checkpoint import load_model
from macefield_server.training.short_range import DEFAULT_PAIRS, unphysical_falls, validation_frame_scans
from macefield_server.training.data import read_frames
from macefield_server.engine.graph import Structure, pairs

#: data file of each head of the default model (in the shared data folder)
FILES = {"sio2": "sio2-quartz-md.xyz", "batio3": "batio3-md.xyz"}


def nearest_other(structure: Structure, moved: int, anchor: int) -> float:
    """Distance (A) from atom ``moved`` to the nearest atom (any periodic image) other than ``anchor``."""
    i, j, _, d = pairs(structure.positions, structure.cell, structure.pbc, 4.0)
    mine = (i == moved) & (j != anchor)
    return float(d[mine].min()) if mine.any() else float("inf")


def head_scans(model, head: str, path: Path, step: float = 0.05, stop: float = 0.6):
    """{pair name: result} for the pair types of ``head`` in the first validation frame of ``path``."""
    frames = [Structure.from_atoms(a, head=head) for a in read_frames(path)]
    out = {}
    for name, (scan, energy) in validation_frame_scans(model, frames, DEFAULT_PAIRS[head], step=step,
                                                       stop=stop).items():
        rel = energy - energy[0]
        k = int(np.argmin(rel))
        drops = -np.diff(energy)
        worst = int(np.argmax(drops))
        out[name] = {
            "frame_distance_A": scan.start,
            "start_A": float(scan.distances[0]),
            "stop_A": float(scan.distances[-1]),
            "points": int(len(scan.distances)),
            "min_energy_rel_start_eV": float(rel[k]),
            "min_at_A": float(scan.distances[k]),
            "largest_drop_eV": float(max(0.0, drops[worst])),
            "largest_drop_at_A": float(scan.distances[worst + 1]) if drops[worst] > 0 else None,
            "falls_at_A": [float(d) for d, x in zip(scan.distances[1:], drops) if x >= 0],
            # steps (their end, A) over which the universal ZBL repulsion of the moved atom itself falls (it passes
            # a third atom): F may fall there; a fall elsewhere, below the data's shortest distance, is taken as one
            # the model should not have (a rule of thumb: ZBL is the physics only well below bonding distances)
            "zbl_falls_at_A": [float(d) for d, x in zip(scan.distances[1:], scan.exempt) if x],
            "unphysical_falls_at_A": [float(d) for d in unphysical_falls(scan, energy)],
            "energy_at_stop_rel_start_eV": float(rel[-1]),
            "monotonic_rise": bool(np.all(np.diff(energy) > 0)),
            "rises_wherever_zbl_rises": not unphysical_falls(scan, energy).size,
            # the profile, and how close the moved atom comes to any atom other than its anchor (A): a scan that
            # passes near a third atom probes that pair too
            "distances_A": [float(d) for d in scan.distances],
            "energy_rel_start_eV": [float(e) for e in rel],
            "moved_to_nearest_other_atom_A": [nearest_other(st, scan.moved, scan.anchor) for st in scan.structures()],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="server/macefield_server/weights/default.pt")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of the MD data files")
    ap.add_argument("--step", type=float, default=0.05, help="scan step, A")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "short_range_default.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float64").eval()
    t0 = time.time()
    heads = {}
    for head in model.heads:
        if head in FILES:
            heads[head] = head_scans(model, head, args.data / FILES[head], step=args.step)
            for name, r in heads[head].items():
                print(f"{head:7s} {name:6s} {r['start_A']:.3f} -> {r['stop_A']:.2f} A: "
                      f"min {r['min_energy_rel_start_eV']:9.2f} eV at {r['min_at_A']:.2f} A, "
                      f"monotonic {r['monotonic_rise']}, falls where ZBL rises at {r['unphysical_falls_at_A']}",
                      flush=True)
    write_json(args.out, {
        "benchmark": "short_range",
        "model": str(args.model),
        "core_repulsion": (model.core_repulsion.spec() if hasattr(model, "core_repulsion") else None),
        "dtype": "float64",
        "step_A": args.step,
        "hardware": f"{platform.machine()} CPU, {args.threads} torch thread(s), no GPU",
        "seconds": time.time() - t0,
        "heads": heads,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
