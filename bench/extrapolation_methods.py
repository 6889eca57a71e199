"""Which extrapolation grade: the alternatives measured on the default model (docs/extrapolation.md).

Every method grades an atom from the same latent features of the default
model's forward pass and is normalised so that its threshold is 1 and no
reference (training) atom is above it (the requirement every method must meet):

* ``maxvol``: the served grade (:mod:`macefield_server.engine.extrapolation`):
  D-optimal active set per head and element, pacemaker's gamma, with the
  residual term for thin directions and the 1% margin;
* ``mahalanobis``: distance to the mean of the element's reference atoms in
  the metric of their covariance (the same thin directions dropped), divided
  by the largest such distance of a reference atom;
* ``nearest``: Euclidean distance, in whitened coordinates, to the nearest
  reference atom of the element, divided by the largest leave-one-frame-out
  nearest distance of a reference atom (time-ordered MD frames: the
  neighbouring frame is nearly the same);
* ``maxvol_readout``: ``maxvol`` on another feature choice, the features the
  energy is linear in (layer-0 invariants and the head's readout-MLP hidden
  activations), as pacemaker uses for ACE;
* ``maxvol_fields_0.05``: ``maxvol`` with every reference frame also taken at
  +-0.05 V/A along x, y and z (``macefield-calibrate --fields 0.05``).

Reported per method: the grade's largest value and the fraction of atoms
above 1 on the held-out frames (last 20%), the largest grade in each
structure that must be flagged (tests/extrapolation_cases.py) and in two
real quartz controls, the geometric-mean grade of rattled quartz, Spearman's
rank correlation of per-atom grade and per-atom force error on the held-out
frames, the grade of perfect quartz in a field, and the time to grade one
72-atom structure.

Usage (from the repository root, data in ../shared/data)::

    python bench/extrapolation_methods.py --out bench/results/extrapolation_methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from results_io import write_json

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))  # the structures to flag are shared with the tests

from extrapolation_cases import (  # noqa: E402
    chain_structure, close_pair_quartz, compressed_quartz, swapped_batio3, wrong_quartz)
from macefield_client.structures import alpha_quartz  # noqa: E402

from macefield_server.engine import load_model, predict, prepare_batch  # noqa: E402
from macefield_server.engine.extrapolation import (  # noqa: E402
    MARGIN, TRUNCATION, element_grade, feature_layout, invariant_features)
from macefield_server.training.calibration import element_statistics  # noqa: E402
from macefield_server.engine.graph import Structure  # noqa: E402
from macefield_server.weights import DEFAULT_MODEL  # noqa: E402

RATTLE = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SEEDS = range(8)


# ------------------------------------------------------------------ features
def features(model, frames, head, kind: str, fields=((0.0, 0.0, 0.0),)):
    """(features (n, d) float64, atomic numbers (n,), frame of each atom (n,)) of ``frames`` on ``head``.

    Each frame is taken at every field of ``fields`` (V/A).
    """
    frames = [(a, np.asarray(f, dtype=float)) for a in frames for f in fields]
    heads = list(model.heads)
    layout = feature_layout(model)
    out, numbers, frame_of = [], [], []
    for start in range(0, len(frames), 8):
        chunk = frames[start:start + 8]
        batch = prepare_batch(model, [Structure.from_atoms(a, electric_field=f, head=head) for a, f in chunk])
        layers = []
        with torch.no_grad():
            t = batch.tensors
            model.enthalpy(t, t["positions"], t["electric_field"], None, layer_features=layers)
            if kind == "invariants":
                f = invariant_features(layers, layout)
            else:  # readout-linear: layer-0 invariants + this head's hidden activations of the last readout
                readout = model.readouts[-1]
                hidden = readout.non_linearity(readout.linear_1(layers[-1]))
                width = hidden.shape[1] // len(heads)
                h = heads.index(head)
                f = torch.cat([invariant_features(layers[:1], layout[:1]), hidden[:, h * width:(h + 1) * width]], 1)
        out.append(f.double().numpy())
        for k, (a, _) in enumerate(chunk):
            numbers.append(a.numbers)
            frame_of.append(np.full(len(a), (start + k) // len(fields)))
    return np.concatenate(out), np.concatenate(numbers), np.concatenate(frame_of)


# ------------------------------------------------------------------- methods
class MaxVol:
    def __init__(self, x, frames):
        s = element_statistics(x, 0)
        thin = s.basis.shape[1] < s.basis.shape[0]
        self.table = (s.coefficients, s.basis if thin else None, 1.0 / s.residual_radius)

    def __call__(self, x):
        return element_grade(torch.as_tensor(x), *self.table) / (1.0 + MARGIN)


class _Whitened:
    """Centred, projected on the directions above the truncation, divided by their standard deviations."""

    def __init__(self, x):
        self.mean = torch.as_tensor(x.mean(axis=0))
        centred = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        keep = s > TRUNCATION * s[0]
        self.transform = torch.as_tensor(vt[keep].T / (s[keep] / np.sqrt(len(x) - 1)))

    def whiten(self, x):
        return (torch.as_tensor(x) - self.mean) @ self.transform


class Mahalanobis(_Whitened):
    def __init__(self, x, frames):
        super().__init__(x)
        self.scale = 1.0
        self.scale = float(self(x).max())

    def __call__(self, x):
        return torch.linalg.vector_norm(self.whiten(x), dim=1) / self.scale


class Nearest(_Whitened):
    def __init__(self, x, frames):
        super().__init__(x)
        self.reference = self.whiten(x)
        self.frames = torch.as_tensor(frames)
        self.scale = 1.0
        self.scale = float(self._nearest(self.reference, exclude=self.frames).max())

    def _nearest(self, q, exclude=None):
        out = []
        for i in range(0, len(q), 1024):
            d = torch.cdist(q[i:i + 1024], self.reference)
            if exclude is not None:
                d[exclude[i:i + 1024, None] == self.frames[None]] = torch.inf
            out.append(d.min(dim=1).values)
        return torch.cat(out)

    def __call__(self, x):
        return self._nearest(self.whiten(x)) / self.scale


METHODS = {"maxvol": (MaxVol, "invariants"), "mahalanobis": (Mahalanobis, "invariants"),
           "nearest": (Nearest, "invariants"), "maxvol_readout": (MaxVol, "readout"),
           "maxvol_fields_0.05": (MaxVol, "invariants")}
#: reference frames of the last variant also at +-0.05 V/A along x, y, z (macefield-calibrate --fields 0.05)
CALIBRATION_FIELDS = {"maxvol_fields_0.05": [(0.0, 0.0, 0.0)] + [tuple(s * 0.05 * np.eye(3)[k]) for k in range(3)
                                                                   for s in (1, -1)]}
#: fields (V/A, along z) at which perfect PBE quartz is graded
PROBE_FIELDS = (0.01, 0.05, 0.1, 0.2)


def fit(method, x, numbers, frames):
    return {int(z): method(x[numbers == z], frames[numbers == z]) for z in np.unique(numbers)}


def grade(graders, x, numbers):
    out = np.full(len(numbers), np.inf)
    for z in np.unique(numbers):
        if int(z) in graders:
            out[numbers == z] = np.asarray(graders[int(z)](x[numbers == z]))
    return out


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "extrapolation_methods.json"))
    parser.add_argument("--repeats", type=int, default=200, help="timing repeats per method")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    import ase.io

    model = load_model(DEFAULT_MODEL)
    sio2 = ase.io.read(DATA / "sio2-quartz-md.xyz", ":")
    bto = ase.io.read(DATA / "batio3-md.xyz", ":")
    split = {"sio2": (sio2[:129], sio2[129:]), "batio3": (bto[:38], bto[38:])}
    chain, chain_energy = chain_structure(load_model(DEFAULT_MODEL, dtype="float64"))
    cases = {
        "wrong_quartz": ([wrong_quartz()], "sio2"),
        "compressed_quartz_15pct": ([compressed_quartz(0.85)], "sio2"),
        "close_pair_0.6A": ([close_pair_quartz(0.6)], "sio2"),
        "O=Si=O_chains": ([chain], "sio2"),
        "batio3_Ba_Ti_swapped": ([swapped_batio3(bto[10])], "batio3"),
        "control_quartz_pbe_cell": ([alpha_quartz(cell="pbe", repeat=(2, 2, 2))], "sio2"),
        "control_quartz_experimental_cell": ([alpha_quartz(repeat=(2, 2, 2))], "sio2"),
    }
    rattled = {amp: [alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=amp, seed=s) for s in SEEDS] for amp in RATTLE}

    force_errors = {}
    for head, (_, valid) in split.items():
        labels = [a.calc.results["forces"] if head == "sio2" else a.arrays["REF_forces"] for a in valid]
        force_errors[head] = np.concatenate([np.linalg.norm(r["forces"] - f, axis=1) for r, f in
                                             zip(predict(model, valid, heads=head, outputs=["forces"]), labels)])

    results = {}
    for name, (method, kind) in METHODS.items():
        feats = {}
        for head, (train, valid) in split.items():
            feats[head, "train"] = features(model, train, head, kind, CALIBRATION_FIELDS.get(name, [(0, 0, 0)]))
            feats[head, "valid"] = features(model, valid, head, kind)
        graders = {head: fit(method, *feats[head, "train"]) for head in split}
        row = {"features": int(feats["sio2", "train"][0].shape[1])}
        for head in split:
            train = grade(graders[head], *feats[head, "train"][:2])
            valid = grade(graders[head], *feats[head, "valid"][:2])
            err = force_errors[head]
            above = valid > 1.0
            row[head] = {
                "reference_max": float(train.max()),
                "holdout_max": float(valid.max()),
                "holdout_fraction_above": float(above.mean()),
                "spearman_grade_vs_force_error": spearman(valid, err),
                "force_error_above_eV_per_A": float(err[above].mean()) if above.any() else None,
                "force_error_inside_eV_per_A": float(err[~above].mean()),
            }
        row["cases_max_grade"] = {}
        for case, (frames, head) in cases.items():
            x, z, _ = features(model, frames, head, kind)
            row["cases_max_grade"][case] = float(grade(graders[head], x, z).max())
        row["rattle_geometric_mean"] = {}
        for amp, frames in rattled.items():
            x, z, _ = features(model, frames, "sio2", kind)
            row["rattle_geometric_mean"][str(amp)] = float(np.exp(np.mean(np.log(grade(graders["sio2"], x, z)))))
        row["quartz_pbe_cell_in_field_z"] = {}
        for e in PROBE_FIELDS:
            x, z, _ = features(model, cases["control_quartz_pbe_cell"][0], "sio2", kind, [(0.0, 0.0, e)])
            row["quartz_pbe_cell_in_field_z"][str(e)] = float(grade(graders["sio2"], x, z).max())
        x, z, _ = features(model, cases["control_quartz_pbe_cell"][0], "sio2", kind)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            grade(graders["sio2"], x, z)
            times.append(time.perf_counter() - t0)
        row["grade_ms_72_atoms"] = 1e3 * float(np.median(times))
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)

    out = {
        "benchmark": "extrapolation_methods",
        "model": str(DEFAULT_MODEL.relative_to(REPO)),
        "data": {"sio2": "sio2-quartz-md.xyz train 0:129, held out 129:161",
                 "batio3": "batio3-md.xyz train 0:38, held out 38:47"},
        "chain_energy_eV_per_atom_vs_quartz": chain_energy,
        "rattle_seeds": len(SEEDS),
        "threads": 1,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": load,
        "torch": torch.__version__,
        "methods": results,
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
