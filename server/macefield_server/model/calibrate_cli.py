"""``macefield-calibrate MODEL DATA.xyz [...] [--head H] [--frames SLICE] -o OUT.pt``: extrapolation statistics.

Computes the reference statistics of the extrapolation grade (see
:mod:`.extrapolation`) for one head from reference structures, normally the
frames the model was trained on, and writes the model with them in the native
format (tensors + JSON; weights, metadata and the statistics of other heads
are kept, those of this head replaced).  Run it once per head::

    macefield-calibrate model.pt train_sio2.xyz --head sio2 -o calibrated.pt
    macefield-calibrate calibrated.pt train_bto.xyz --head batio3 -o calibrated.pt

Any model the server loads works: native checkpoints, mace-torch ``.model``
files and reference MACEField pickles (``--trust-pickle``; the output is then
the upgraded model in the native format).  It prints a JSON summary: per
element the number of reference atoms, the rank of their features, the
active-set size and the largest grade of a reference atom (at most
1/(1 + margin): every reference atom is inside by construction).
Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, load_model, save_model
from .extrapolation import attach, calibrate, reference_grades


def parse_slice(text: str) -> slice:
    """``"0:129"``, ``":129"``, ``"::2"`` -> slice (Python semantics, like ase.io.read's index)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--frames: expected START:STOP[:STEP], got {text!r}")
    try:
        values = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"--frames: expected integers in START:STOP[:STEP], got {text!r}") from None
    return slice(*values)


def read_frames(paths, frames: slice):
    from ase.io import read

    out, described = [], []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference file not found: {path}")
        structures = read(path, index=":")
        chosen = structures[frames]
        if not chosen:
            raise ValueError(f"{path}: no frames in {frames.start}:{frames.stop}:{frames.step} (it has {len(structures)})")
        out.extend(chosen)
        indices = range(len(structures))[frames]
        described.append({"file": Path(path).name, "frames": [indices.start, indices.stop, indices.step],
                          "structures": len(chosen)})
    return out, described


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="macefield-calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="native .pt, mace-torch .model or reference MACEField pickle")
    parser.add_argument("data", nargs="+", help="reference structures (any format ASE reads), normally the training frames")
    parser.add_argument("--head", help="head the statistics are for (default: the model's first head)")
    parser.add_argument("--frames", default=":", help="frames of each file to use, START:STOP[:STEP] (default: all)")
    parser.add_argument("-o", "--output", required=True, help="native checkpoint to write (may be MODEL itself)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling MODEL (runs code from it)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip re-evaluating the reference frames through the engine (the grade check)")
    args = parser.parse_args(argv)
    try:
        frames_slice = parse_slice(args.frames)
        model = load_model(args.model, trust_pickle=args.trust_pickle)
        heads = list(model.heads)
        head = args.head or heads[0]
        if head not in heads:
            raise ValueError(f"--head: unknown head {head!r}; the model has {heads}")
        frames, described = read_frames(args.data, frames_slice)
        stats = calibrate(model, frames, head, reference={"files": described})
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"macefield-calibrate: {exc}", file=sys.stderr)
        return 2
    attach(model, stats)
    summary = {"output": str(args.output), "head": head, "method": stats.method, "threshold": stats.threshold,
               "margin": stats.margin, "features": stats.n_features,
               "elements": {str(z): s.describe() | {"active_set": len(s.active_set)}
                            for z, s in sorted(stats.heads[head].items())},
               "reference": stats.references[head]}
    if not args.no_check:
        grades = reference_grades(model, frames, head)
        numbers = np.concatenate([a.numbers for a in frames])
        for z, entry in summary["elements"].items():
            entry["max_reference_grade"] = float(grades[numbers == int(z)].max())
    save_model(model, args.output)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
