"""Errors of predictions against reference labels, in the units of the model card (numpy only).

Used by ``macefield eval`` and by the server's trainer (validation metrics
and the model card), so both report the same numbers under the same names.

Per frame (:func:`frame_errors`), then per data set (:func:`summarise`):
energy MAE/RMSE (meV/atom, also with the mean offset removed), forces
MAE/RMSE (meV/A), stress MAE/RMSE (meV/A^3), Born charges MAE/RMSE (e),
polarizability relative error (|alpha_pred - alpha_ref|_F / |alpha_ref|_F per
frame, averaged), eps_inf (diagonal of 1 + chi averaged over the periodic
frames, predicted and reference, and the largest relative error of that
average), polarization MAE/RMSE (e/A^2) after folding the difference by the
quanta e*a_k/Omega to its shortest equivalent (two values that differ by whole
quanta are the same state), and the dipole MAE (e*A) of frames that are not
periodic.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .constants import E_PER_A2_TO_UC_PER_CM2, EPS0


#: one metric: a number, or one number per axis (eps_inf's diagonal, a frame's error vector)
Metric = Union[float, List[float]]

#: integer lattice translations tried around the fractional fold (the shortest equivalent vector is among them)
_NEAR = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.float64)


def fold_dipole(diff: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """The shortest vector equal to a dipole difference (3,) e*A modulo the quanta e*a_k (rows of ``cell``).

    Folded to fractional [-1/2, 1/2) first, then the shortest of that vector and
    its 26 neighbours (they differ for skewed, e.g. hexagonal, cells).
    """
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    frac = np.linalg.solve(cell.T, np.asarray(diff, dtype=np.float64).reshape(3))
    candidates = (frac - np.floor(frac + 0.5) + _NEAR) @ cell
    return candidates[int(np.argmin(np.einsum("ij,ij->i", candidates, candidates)))]


def frame_errors(pred: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], *, n_atoms: int,
                 cell: Optional[np.ndarray] = None, periodic: bool = True) -> Dict[str, Metric]:
    """Error sums and per-frame errors of one structure (internal units in, card units out).

    ``pred``: engine outputs (energy eV, forces, stress, dipole e*A,
    born_charges, polarizability e*A^2/V).  ``labels``: the same quantities
    in internal units (:func:`macefield_client.labels.convert`), the
    polarization label as the cell dipole (key "polarization").  ``cell``:
    (3, 3) lattice vectors as rows (needed for eps_inf and folded P).
    """
    r: Dict[str, Metric] = {"n_atoms": n_atoms}
    volume = abs(float(np.linalg.det(cell))) if (periodic and cell is not None) else None
    if "energy" in labels and "energy" in pred:
        r["energy_error_meV_per_atom"] = 1000.0 * (float(pred["energy"]) - float(labels["energy"])) / n_atoms
        r["energy_pred_eV"] = float(pred["energy"])
    for q, unit in (("forces", "_meV_per_A"), ("stress", "_meV_per_A3"), ("born_charges", "")):
        if q in labels and q in pred:
            d = np.asarray(pred[q], dtype=np.float64) - np.asarray(labels[q], dtype=np.float64)
            factor = 1.0 if q == "born_charges" else 1000.0
            r[f"{q}_abs_sum{unit}"] = factor * float(np.abs(d).sum())
            r[f"{q}_sq_sum"] = factor**2 * float((d**2).sum())
            r[f"{q}_count"] = int(d.size)
    if "polarizability" in labels and "polarizability" in pred:
        pa, ra = np.asarray(pred["polarizability"]), np.asarray(labels["polarizability"])
        r["polarizability_rel_error"] = float(np.linalg.norm(pa - ra) / np.linalg.norm(ra))
        if volume is not None:
            r["eps_inf_pred"] = (1.0 + np.diag(pa) / (volume * EPS0)).tolist()
            r["eps_inf_ref"] = (1.0 + np.diag(ra) / (volume * EPS0)).tolist()
    if "polarization" in labels and "dipole" in pred:
        diff = np.asarray(pred["dipole"]) - np.asarray(labels["polarization"])
        if volume is not None and cell is not None:  # volume is None whenever cell is
            r["polarization_folded_error_e_per_A2"] = (fold_dipole(diff, cell) / volume).tolist()
        else:  # a molecule's dipole is not branch-ambiguous
            r["dipole_error_e_A"] = diff.tolist()
    return r


def summarise(rows: Sequence[Mapping]) -> Dict[str, Metric]:
    """Aggregate per-frame rows (one data set) into the card's metrics."""
    out: Dict[str, Metric] = {"frames": len(rows)}
    if not rows:
        return out

    def have(k):
        return [r for r in rows if k in r]

    e = np.array([r["energy_error_meV_per_atom"] for r in have("energy_error_meV_per_atom")])
    if e.size:
        out["energy_mae_meV_per_atom"] = float(np.abs(e).mean())
        out["energy_rmse_meV_per_atom"] = float(np.sqrt((e**2).mean()))
        # a constant offset per head is physically irrelevant for forces etc.; report it too
        out["energy_mae_offset_removed_meV_per_atom"] = float(np.abs(e - e.mean()).mean())
    for q, unit in (("forces", "meV_per_A"), ("stress", "meV_per_A3"), ("born_charges", "e")):
        rs = have(f"{q}_count")
        if rs:
            count = sum(r[f"{q}_count"] for r in rs)
            abs_key = f"{q}_abs_sum_{unit}" if q != "born_charges" else "born_charges_abs_sum"
            out[f"{q}_mae_{unit}"] = sum(r[abs_key] for r in rs) / count
            out[f"{q}_rmse_{unit}"] = float(np.sqrt(sum(r[f"{q}_sq_sum"] for r in rs) / count))
    rs = have("polarizability_rel_error")
    if rs:
        out["polarizability_rel_error"] = float(np.mean([r["polarizability_rel_error"] for r in rs]))
    rs = have("eps_inf_pred")
    if rs:
        pred = np.mean([r["eps_inf_pred"] for r in rs], axis=0)
        ref = np.mean([r["eps_inf_ref"] for r in rs], axis=0)
        out["eps_inf_pred_diag"] = pred.tolist()
        out["eps_inf_dft_diag"] = ref.tolist()
        out["eps_inf_rel_error_max"] = float(np.max(np.abs(pred - ref) / ref))
        per_frame = np.array([np.abs(np.array(r["eps_inf_pred"]) - r["eps_inf_ref"]) / np.array(r["eps_inf_ref"])
                              for r in rs])
        out["eps_inf_rel_error_per_frame_mean"] = float(per_frame.mean())
    rs = have("dipole_error_e_A")
    if rs:
        d = np.array([r["dipole_error_e_A"] for r in rs])
        out["dipole_mae_e_A"] = float(np.abs(d).mean())
    rs = have("polarization_folded_error_e_per_A2")
    if rs:
        d = np.array([r["polarization_folded_error_e_per_A2"] for r in rs])
        out["polarization_folded_mae_e_per_A2"] = float(np.abs(d).mean())
        out["polarization_folded_rmse_e_per_A2"] = float(np.sqrt((d**2).mean()))
    return out


def compact_frame(row: Mapping) -> Dict:
    """Card form of one frame's errors (means instead of sums)."""
    r = {k: row[k] for k in ("dataset", "frame") if k in row}
    if "energy_error_meV_per_atom" in row:
        r["energy_error_meV_per_atom"] = row["energy_error_meV_per_atom"]
    for q, unit in (("forces", "meV_per_A"), ("stress", "meV_per_A3")):
        if f"{q}_count" in row:
            r[f"{q}_mae_{unit}"] = row[f"{q}_abs_sum_{unit}"] / row[f"{q}_count"]
    if "born_charges_count" in row:
        r["born_charges_mae_e"] = row["born_charges_abs_sum"] / row["born_charges_count"]
    for k in ("polarizability_rel_error", "eps_inf_pred", "eps_inf_ref", "polarization_folded_error_e_per_A2",
              "dipole_error_e_A"):
        if k in row:
            r[k] = row[k]
    return r


#: (metric key, label, unit, scale) rows of the printed error table
TABLE_ROWS: List[tuple] = [
    ("energy_mae_meV_per_atom", "energy MAE", "meV/atom", 1.0),
    ("energy_rmse_meV_per_atom", "energy RMSE", "meV/atom", 1.0),
    ("forces_mae_meV_per_A", "forces MAE", "meV/A", 1.0),
    ("forces_rmse_meV_per_A", "forces RMSE", "meV/A", 1.0),
    ("stress_mae_meV_per_A3", "stress MAE", "meV/A^3", 1.0),
    ("born_charges_mae_e", "Z* MAE", "e", 1.0),
    ("born_charges_rmse_e", "Z* RMSE", "e", 1.0),
    ("polarizability_rel_error", "alpha rel. error", "%", 100.0),
    ("eps_inf_rel_error_max", "eps_inf rel. error (max of diag)", "%", 100.0),
    ("polarization_folded_mae_e_per_A2", "P MAE (folded)", "uC/cm^2", E_PER_A2_TO_UC_PER_CM2),
    ("dipole_mae_e_A", "dipole MAE (not periodic)", "e*A", 1.0),
]


def format_table(summary: Mapping[str, Metric]) -> str:
    """The summary as an aligned text table (only the metrics present)."""
    lines = [f"{'quantity':<34} {'value':>12}  unit"]
    for key, label, unit, scale in TABLE_ROWS:
        if key in summary:
            value = summary[key]
            assert not isinstance(value, list), f"{key}: a number, not a list"
            lines.append(f"{label:<34} {value * scale:>12.4g}  {unit}")
    if "eps_inf_pred_diag" in summary:
        pred_diag, ref_diag = summary["eps_inf_pred_diag"], summary["eps_inf_dft_diag"]
        assert isinstance(pred_diag, list) and isinstance(ref_diag, list), "eps_inf diagonals: lists of 3 numbers"
        pred = " ".join(f"{x:.4f}" for x in pred_diag)
        ref = " ".join(f"{x:.4f}" for x in ref_diag)
        lines.append(f"{'eps_inf diag (model | reference)':<34} {pred} | {ref}")
    return "\n".join(lines)


__all__ = ["fold_dipole", "frame_errors", "summarise", "compact_frame", "format_table"]
