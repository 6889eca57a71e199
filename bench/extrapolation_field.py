"""The extrapolation grade and the field range of the default model in a field (docs/extrapolation.md, the card).

Measures, on the shipped default model (float32 as stored; the O=Si=O chain
structure is relaxed with a float64 copy, as in the tests):

* held-out frames (the validation split: SiO2 129-160, BaTiO3 38-46): the
  fraction of atoms with grade > 1 and the largest grade at E = 0 and at
  0.05, 0.1 and 0.36 V/A along x and z, with field_extrapolation;
* the structures that must be flagged (tests/extrapolation_cases.py) and the
  real-quartz controls at E = 0, 0.05 and 0.36 V/A along x and z;
* rattled and strained quartz; an element without reference atoms;
* what the field-free grade gives up: the grade of an atom whose
  surroundings change only beyond r_max (3x3x3 quartz, atoms farther than
  6 A from atom 0 rattled by 0.3 A), and how the held-out per-atom grade
  relates to the per-atom force error (Spearman, mean errors above/inside 1);
* field_extrapolation per head: E_ref, and its value at 0.05 / 0.1 / 0.36 V/A.

``--card`` writes the measured "flags" list into the default card's
extrapolation section (JSON, markdown, and the card embedded in default.pt).

Usage (from the repository root, data in ../shared/data)::

    python bench/extrapolation_field.py --out bench/results/extrapolation_field.json --card
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))  # the structures to flag are shared with the tests

from extrapolation_cases import (  # noqa: E402
    chain_structure, close_pair_quartz, compressed_quartz, swapped_batio3, wrong_quartz)
from macefield_client.structures import alpha_quartz  # noqa: E402

from macefield_server.engine import load_model, predict, save_model  # noqa: E402
from macefield_server.engine.extrapolation import statistics_of  # noqa: E402
from macefield_server.weights import DEFAULT_CARD, DEFAULT_MODEL  # noqa: E402
from extrapolation_methods import spearman  # noqa: E402  (the rank correlation used there too)

FIELDS = [(0.0, "-")] + [(e, d) for e in (0.05, 0.1, 0.36) for d in ("x", "z")]
CASE_FIELDS = [(0.0, "-"), (0.05, "x"), (0.05, "z"), (0.36, "x"), (0.36, "z")]
HELD_OUT = {"sio2": ("sio2-quartz-md.xyz", slice(129, 161)), "batio3": ("batio3-md.xyz", slice(38, 47))}


def vector(magnitude: float, direction: str) -> np.ndarray:
    e = np.zeros(3)
    if direction != "-":
        e["xyz".index(direction)] = magnitude
    return e


def evaluate(model, atoms_list, head, field, outputs=("energy",)):
    return predict(model, atoms_list, heads=head, electric_fields=field, outputs=list(outputs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "extrapolation_field.json"))
    parser.add_argument("--card", action="store_true", help="write the measured flags into the default model's card")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ase.io

    model = load_model(DEFAULT_MODEL)
    stats = statistics_of(model)
    out = {"benchmark": "extrapolation_field",
           "command": "python bench/extrapolation_field.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": str(DEFAULT_MODEL.relative_to(REPO)), "method": stats.method, "features": stats.n_features,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "load_average_before": os.getloadavg()}

    # ------------------------------------------------ held-out frames in a field
    held = {}
    frames_of = {}
    for head, (name, frames) in HELD_OUT.items():
        frames_of[head] = ase.io.read(DATA / name, index=":")
        atoms = frames_of[head][frames]
        rows = []
        for magnitude, direction in FIELDS:
            res = evaluate(model, atoms, head, vector(magnitude, direction))
            g = np.concatenate([r["extrapolation"] for r in res])
            fx = [float(r["field_extrapolation"]) for r in res]
            rows.append({"field_V_per_A": magnitude, "direction": direction, "atoms": int(g.size),
                         "atoms_above": int(np.sum(g > 1)), "percent_above": 100 * float(np.mean(g > 1)),
                         "max_grade": float(g.max()), "field_extrapolation": [min(fx), max(fx)]})
            print(head, json.dumps(rows[-1]), flush=True)
        held[head] = {"file": name, "frames": [frames.start, frames.stop], "rows": rows,
                      "field_reference_V_per_A": stats.field_reference(head)}
    out["held_out"] = held

    # ------------------------------------------------ force errors against the grade (held out, E = 0)
    quality = {}
    for head, (name, frames) in HELD_OUT.items():
        atoms = frames_of[head][frames]
        res = evaluate(model, atoms, head, None, outputs=("forces",))
        key = "REF_forces" if "REF_forces" in atoms[0].arrays else None
        ref = np.concatenate([a.arrays[key] if key else a.calc.results["forces"] for a in atoms])
        err = np.linalg.norm(np.concatenate([r["forces"] for r in res]) - ref, axis=1)
        g = np.concatenate([r["extrapolation"] for r in res])
        quality[head] = {"spearman_grade_force_error": spearman(g, err),
                         "force_error_above_1_eV_per_A": float(err[g > 1].mean()) if np.any(g > 1) else None,
                         "force_error_inside_eV_per_A": float(err[g <= 1].mean())}
        print(head, json.dumps(quality[head]), flush=True)
    out["force_error_vs_grade"] = quality

    # ------------------------------------------------ structures to flag, controls, in a field
    chain, below = chain_structure(load_model(DEFAULT_MODEL, dtype="float64"))
    bto_frame = frames_of["batio3"][10]  # a training frame
    cases = {
        "wrong quartz": ("sio2", wrong_quartz(), True),
        "15% compressed quartz": ("sio2", compressed_quartz(0.85), True),
        "O 0.6 A from Si": ("sio2", close_pair_quartz(0.6), True),
        "O=Si=O chains": ("sio2", chain, True),
        "BaTiO3 with Ba and Ti swapped": ("batio3", swapped_batio3(bto_frame), True),
        "PBE quartz 2x2x2": ("sio2", alpha_quartz(cell="pbe", repeat=(2, 2, 2)), False),
        "experimental quartz 2x2x2": ("sio2", alpha_quartz(repeat=(2, 2, 2)), False),
        "5% compressed quartz": ("sio2", compressed_quartz(0.95), False),
        "BaTiO3 training frame 10": ("batio3", bto_frame, False),
    }
    table = {}
    for label, (head, atoms, flag) in cases.items():
        per_field = []
        for magnitude, direction in CASE_FIELDS:
            [r] = evaluate(model, [atoms], head, vector(magnitude, direction))
            per_field.append({"field_V_per_A": magnitude, "direction": direction,
                              "max_grade": float(r["extrapolation_max"]),
                              "field_extrapolation": float(r["field_extrapolation"])})
        table[label] = {"head": head, "must_flag": flag, "fields": per_field,
                        "flagged_at_every_field": all(p["max_grade"] > 1 for p in per_field),
                        "inside_at_every_field": all(p["max_grade"] <= 1 for p in per_field)}
        print(label, [round(p["max_grade"], 3) for p in per_field], flush=True)
    out["cases"] = table
    out["chain_energy_below_quartz_eV_per_atom"] = below

    # ------------------------------------------------ rattle, strain, unknown element
    amplitudes = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    rattled = [alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=a, seed=s) for a in amplitudes for s in range(8)]
    g = np.array([r["extrapolation"] for r in evaluate(model, rattled, "sio2", None)]).reshape(len(amplitudes), -1)
    out["rattled_quartz_geomean"] = dict(zip(map(str, amplitudes), np.exp(np.log(g).mean(axis=1)).tolist()))
    volumes = (0.85, 0.90, 0.95, 1.05, 1.10)
    strained = [compressed_quartz(v) for v in volumes]
    out["strained_quartz_max"] = dict(zip(map(str, volumes), [float(r["extrapolation_max"]) for r in
                                                              evaluate(model, strained, "sio2", None)]))
    [on_bto] = evaluate(model, [alpha_quartz(cell="pbe")], "batio3", None)
    out["quartz_on_head_batio3_max"] = float(on_bto["extrapolation_max"])
    print(out["rattled_quartz_geomean"], out["strained_quartz_max"], flush=True)

    # ------------------------------------------------ receptive field: changes beyond r_max
    big = alpha_quartz(cell="pbe", repeat=(3, 3, 3))
    far = big.copy()
    d = far.get_distances(0, range(len(far)), mic=True)
    moved = d > 6.0
    rng = np.random.default_rng(0)
    far.positions[moved] += rng.normal(scale=0.3, size=(int(moved.sum()), 3))
    before, after = (r["extrapolation"] for r in evaluate(model, [big, far], "sio2", None))
    out["receptive_field"] = {"r_max_A": float(model.r_max), "moved": "atoms > 6 A from atom 0, 0.3 A rattle (seed 0)",
                              "atom0_before": float(before[0]), "atom0_after": float(after[0]),
                              "max_after": float(after.max())}
    print(out["receptive_field"], flush=True)

    # ------------------------------------------------ field range per head
    out["field_range"] = {h: {"field_reference_V_per_A": stats.field_reference(h),
                              "at": {str(e): e / stats.field_reference(h) for e in (0.05, 0.1, 0.36)},
                              "elements": {str(z): {"born_charge_norm_e": s.born_charge_norm,
                                                    "force_rms_eV_per_A": s.force_rms, "kappa_A_per_V": s.kappa}
                                           for z, s in sorted(stats.heads[h].items())}}
                          for h in stats.heads}
    out["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.card:
        write_flags(out, model)
    return 0


def _fmt(x: float) -> str:
    return "+inf" if np.isinf(x) else f"{x:.3g}"


def flags_text(out) -> list:
    """The card's "flags" list, from the measurements (no number typed by hand)."""
    c = out["cases"]

    def at(label):
        grades = [p["max_grade"] for p in c[label]["fields"]]
        same = max(grades) - min(grades) <= 1e-6 * max(grades)
        return _fmt(grades[0]) + (" at 0, 0.05 and 0.36 V/A (x and z) alike" if same else
                                  " (" + ", ".join(_fmt(g) for g in grades) + " at 0, 0.05x, 0.05z, 0.36x, 0.36z V/A)")

    h, q = out["held_out"], out["force_error_vs_grade"]
    held = "; ".join(
        f"{head}: {h[head]['rows'][0]['percent_above']:.2f}% of atoms above 1 "
        f"(max {h[head]['rows'][0]['max_grade']:.3g}) "
        f"at E = 0 and at every field up to 0.36 V/A (largest: {max(r['percent_above'] for r in h[head]['rows']):.2f}%)"
        for head in h)
    errors = "; ".join(f"{head} {q[head]['force_error_above_1_eV_per_A']:.2f} against "
                       f"{q[head]['force_error_inside_eV_per_A']:.2f} eV/A" for head in q)
    s = out["strained_quartz_max"]
    rattle = ", ".join(f"{v:.3g} at {a} A" for a, v in out["rattled_quartz_geomean"].items())
    rf = out["receptive_field"]
    fr = out["field_range"]
    return [
        f"Held-out frames (the last 20%): {held}. Mean per-atom force error above / inside 1: {errors}.",
        f"Wrong alpha-quartz (space group 152 with O at z = 0.7858, every Si 2-coordinated): {at('wrong quartz')}.",
        f"2x2x2 PBE quartz compressed by 15% in volume: {at('15% compressed quartz')}; volume x0.90 / x0.95 / x1.05 / "
        f"x1.10: {s['0.9']:.3g} / {s['0.95']:.3g} / {s['1.05']:.3g} / {s['1.1']:.3g}.",
        f"One O moved to 0.6 A from its Si inside 2x2x2 PBE quartz: {at('O 0.6 A from Si')}.",
        f"The O=Si=O chain structure this model finds by relaxing the wrong quartz "
        f"({out['chain_energy_below_quartz_eV_per_atom']:.2f} eV/atom relative to real quartz: a basin that exists "
        f"only in the model): {at('O=Si=O chains')}.",
        f"A BaTiO3 training frame with the Ba and Ti sublattices swapped: {at('BaTiO3 with Ba and Ti swapped')}.",
        f"An element without training atoms in the head (quartz on head batio3): "
        f"{_fmt(out['quartz_on_head_batio3_max'])}.",
        f"Controls inside: PBE / experimental 2x2x2 quartz {at('PBE quartz 2x2x2')} / "
        f"{at('experimental quartz 2x2x2')}; 5% compressed {at('5% compressed quartz')}; "
        f"BaTiO3 training frame 10 {at('BaTiO3 training frame 10')}.",
        f"Random displacements of 2x2x2 PBE quartz (geometric mean over atoms and 8 seeds): {rattle}.",
        f"Receptive field: the grade sees r_max = {rf['r_max_A']:g} A around an atom; 3x3x3 quartz with every atom "
        f"farther than 6 A from atom 0 rattled by 0.3 A: atom 0 {rf['atom0_before']:.3g} -> {rf['atom0_after']:.3g}, "
        f"the moved atoms flag themselves (max {rf['max_after']:.3g}).",
        "Field range: field_extrapolation at 0.05 / 0.1 / 0.36 V/A: " + "; ".join(
            f"{head} " + " / ".join(f"{v:.3g}" for v in f["at"].values())
            + f" (E_ref {f['field_reference_V_per_A']:.3g} V/A)"
            for head, f in fr.items()) + ".",
    ]


def write_flags(out, model) -> None:
    from macefield_server.cli.calibrate import write_card

    card = json.loads(DEFAULT_CARD.read_text())
    section = dict(card["extrapolation"])
    section["flags"] = flags_text(out)
    section["flags_command"] = out["command"]
    card["extrapolation"] = section
    write_card(DEFAULT_CARD, card)
    save_model(model, DEFAULT_MODEL, metadata={"card": card})
    print(f"wrote the flags into {DEFAULT_CARD.name} (+ .md) and {DEFAULT_MODEL.name}")


if __name__ == "__main__":
    sys.exit(main())
