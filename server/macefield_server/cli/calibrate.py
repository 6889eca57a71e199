"""``macefield-calibrate MODEL DATA.xyz [...] [--head H] [--frames SLICE] -o OUT.pt``: extrapolation statistics.

Computes the reference statistics of the extrapolation grade and of the field
range (see :mod:`macefield_server.engine.extrapolation`) for one head from
reference structures, normally the frames the model was trained on, and
writes the model with them in the native
format (tensors + JSON; weights, metadata and the statistics of other heads
are kept, those of this head replaced).  Run it once per head::

    macefield-calibrate model.pt train_sio2.xyz --head sio2 -o calibrated.pt
    macefield-calibrate calibrated.pt train_bto.xyz --head batio3 -o calibrated.pt

Any model the server loads works: native checkpoints, mace-torch ``.model``
files and reference MACEField pickles (``--trust-pickle``; the output is then
the upgraded model in the native format).  It prints a JSON summary: per
element the number of reference atoms, the rank of their features, the
active-set size, the largest grade of a reference atom (at most
1/(1 + margin): every reference atom is inside by construction), and the
field susceptibility (mean ||Z*||_2 at E = 0, RMS force component, kappa),
and per head E_ref (V/A), the field at which ``field_extrapolation`` reaches 1.

The grade's features are field-free, so the reference frames are taken as
read; their fields do not matter.  ``--holdout-frames START:STOP`` also
grades held-out frames of the same files (e.g. the validation split) and
reports the fraction of atoms above the threshold, at zero field and, with
``--holdout-fields E [E ...]``, at each of those fields (V/A) along x and z.
``--card CARD.json`` records all of it in that model card (its
``extrapolation`` section, per head, with the command; the markdown card
beside it is regenerated when it is a ``macefield-train`` card) and embeds the
card in the written checkpoint's metadata, as ``macefield-train`` does.
Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np



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

    out: List[Any] = []
    described: List[Dict[str, Any]] = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference file not found: {path}")
        structures = read(path, index=":")
        chosen = structures[frames]
        if not chosen:
            raise ValueError(
                f"{path}: no frames in {frames.start}:{frames.stop}:{frames.step} (it has {len(structures)})"
            )
        out.extend(chosen)
        indices = range(len(structures))[frames]
        described.append({"file": Path(path).name, "frames": [indices.start, indices.stop, indices.step],
                          "structures": len(chosen)})
    return out, described


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="macefield-calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="native .pt, mace-torch .model or reference MACEField pickle")
    parser.add_argument("data", nargs="+",
                        help="reference structures (any format ASE reads), normally the training frames")
    parser.add_argument("--head", help="head the statistics are for (default: the model's first head)")
    parser.add_argument("--frames", default=":", help="frames of each file to use, START:STOP[:STEP] (default: all)")
    parser.add_argument("-o", "--output", required=True, help="native checkpoint to write (may be MODEL itself)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling MODEL (runs code from it)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip re-evaluating the reference frames through the engine (the grade check)")
    parser.add_argument("--holdout-frames", metavar="START:STOP[:STEP]",
                        help="also grade these frames of the same files (held out, e.g. validation) and report them")
    parser.add_argument("--holdout-fields", type=float, nargs="+", default=[], metavar="E",
                        help="with --holdout-frames: also grade them at these field magnitudes (V/A) along x and z")
    parser.add_argument("--born-charge-stride", type=int, default=None, metavar="K",
                        help="Born charges for the field susceptibility on every K-th reference frame "
                             "(default: training.calibration.BORN_CHARGE_STRIDE, every 8th)")
    parser.add_argument("--card", metavar="CARD.json",
                        help="record the calibration in this model card (and its .md) and embed it in OUTPUT")
    args = parser.parse_args(argv)
    # torch and the engine only after the arguments: --help and usage errors answer at once
    from ..engine.checkpoint import CheckpointError, load_model, save_model
    from ..engine.extrapolation import attach
    from ..training.calibration import calibrate, reference_grades

    try:
        frames_slice = parse_slice(args.frames)
        model = load_model(args.model, trust_pickle=args.trust_pickle)
        heads = list(model.heads)
        head = args.head or heads[0]
        if head not in heads:
            raise ValueError(f"--head: unknown head {head!r}; the model has {heads}")
        frames, described = read_frames(args.data, frames_slice)
        holdout, held_files = (
            read_frames(args.data, parse_slice(args.holdout_frames)) if args.holdout_frames else (None, None)
        )
        card = json.loads(Path(args.card).read_text()) if args.card else None
        if args.holdout_fields and not args.holdout_frames:
            raise ValueError("--holdout-fields needs --holdout-frames")
        if any(not (e > 0) for e in args.holdout_fields):
            raise ValueError(f"--holdout-fields: expected magnitudes > 0 (V/A), got {args.holdout_fields}")
        stats = calibrate(model, frames, head, reference={"files": described},
                          **({} if args.born_charge_stride is None
                             else {"born_charge_stride": args.born_charge_stride}))
    except (CheckpointError, FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        print(f"macefield-calibrate: {exc}", file=sys.stderr)
        return 2
    attach(model, stats)
    summary: Dict[str, Any] = {
        "output": str(args.output), "head": head, "method": stats.method, "threshold": stats.threshold,
        "margin": stats.margin, "features": stats.n_features,
        "elements": {str(z): s.describe() | {"active_set": len(s.active_set)}
                     for z, s in sorted(stats.heads[head].items())},
        "field_reference_V_per_A": stats.field_reference(head),
        "reference": stats.references[head]}
    if not args.no_check or card is not None:
        grades = reference_grades(model, frames, head)
        numbers = np.concatenate([a.numbers for a in frames])
        for z, entry in summary["elements"].items():
            entry["max_reference_grade"] = float(grades[numbers == int(z)].max())
        summary["max_reference_grade"] = float(grades.max())
    if holdout is not None:
        held = reference_grades(model, holdout, head)
        summary["holdout"] = {"files": held_files, "structures": len(holdout), "atoms": int(held.size),
                              "atoms_above": int(np.sum(held > stats.threshold)),
                              "fraction_above": float(np.mean(held > stats.threshold)), "max": float(held.max())}
        at_fields = []
        for magnitude in args.holdout_fields:
            for axis, name in ((0, "x"), (2, "z")):
                field = np.zeros(3)
                field[axis] = magnitude
                g = reference_grades(model, holdout, head, electric_field=field)
                at_fields.append({"field_V_per_A": magnitude, "direction": name,
                                  "atoms_above": int(np.sum(g > stats.threshold)),
                                  "fraction_above": float(np.mean(g > stats.threshold)), "max": float(g.max()),
                                  "field_extrapolation": magnitude / summary["field_reference_V_per_A"]})
        if at_fields:
            summary["holdout"]["at_fields"] = at_fields
    metadata = None
    if card is not None:
        words = argv if argv is not None else sys.argv[1:]
        command = "macefield-calibrate " + " ".join(shlex.quote(a) for a in words)
        card = record_in_card(card, stats, summary, command)
        write_card(Path(args.card), card)
        metadata = {"card": card}
    save_model(model, args.output, metadata=metadata)
    print(json.dumps(summary, indent=2))
    return 0


def record_in_card(card: dict, stats, summary: dict, command: str) -> dict:
    """``card`` with this head's calibration in its ``extrapolation`` section (prose already there is kept)."""
    from ..training.card import EXTRAPOLATION_MEANING

    section = dict(card.get("extrapolation") or {})
    if section.get("method") != stats.method:  # measured on other features: every head is recalibrated anew
        section = {k: v for k, v in section.items() if k not in ("heads", "commands", "flags", "flags_command")}
    section.update(meaning=EXTRAPOLATION_MEANING, method=stats.method, threshold=stats.threshold, margin=stats.margin,
                   features=stats.n_features)
    heads = dict(section.get("heads") or {})
    heads[summary["head"]] = {
        "command": command,
        "reference": summary["reference"],
        "elements": {z: {"n_reference": e["n_reference"], "rank": e["rank"],
                         "born_charge_norm_e": e["born_charge_norm_e"], "force_rms_eV_per_A": e["force_rms_eV_per_A"],
                         "kappa_A_per_V": e["kappa_A_per_V"]}
                     for z, e in summary["elements"].items()},
        "field_reference_V_per_A": summary["field_reference_V_per_A"],
        "reference_max_grade": summary["max_reference_grade"],
        **({"holdout": summary["holdout"]} if "holdout" in summary else {}),
    }
    section["heads"] = heads
    section["commands"] = [h["command"] for h in heads.values()]
    return dict(card, extrapolation=section)


def write_card(path: Path, card: dict) -> None:
    """The JSON card, and the markdown beside it (``X.card.md``) when it is a ``macefield-train`` card."""
    path.write_text(json.dumps(card, indent=1) + "\n")
    if all(k in card for k in ("architecture", "training", "validation")) and path.name.endswith(".card.json"):
        from ..training.card import card_markdown

        path.with_name(path.name[: -len(".card.json")] + ".card.md").write_text(card_markdown(card))


if __name__ == "__main__":
    sys.exit(main())
