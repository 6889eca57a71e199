"""Validation metrics per head, in the units of the model card.

Per dataset: energy MAE/RMSE (meV/atom), forces MAE/RMSE (meV/A), stress
MAE/RMSE (meV/A^3), Born charges MAE/RMSE (e), polarizability relative error
(|alpha_pred - alpha_ref|_F / |alpha_ref|_F per frame, averaged), eps_inf
(diagonal of 1 + chi averaged over the frames, predicted and DFT, and the
relative error of that average), folded polarization MAE/RMSE (e/A^2).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from ..model.response import respond
from ..model.units import EPS0
from .data import Sample, make_batch
from .losses import fold_dipole

_OUTPUTS = frozenset({"energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"})


def frame_errors(model, samples: Sequence[Sample], batch_size: int = 1, on_output=None) -> List[Dict[str, float]]:
    """Per-frame errors (card units) of ``model`` on ``samples``; graphs must be built.

    ``on_output(out, batch)``, if given, also sees every raw engine output
    (the trainer computes its validation loss from the same pass).
    """
    dtype = next(model.parameters()).dtype
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = make_batch(chunk, model, dtype)
        out = respond(model, batch.tensors, None, _OUTPUTS)
        if on_output is not None:
            on_output(out, batch)
        out = {k: v.detach().double() for k, v in out.items() if isinstance(v, torch.Tensor)}
        atom = 0
        for g, s in enumerate(chunk):
            n = s.n_atoms
            sl = slice(atom, atom + n)
            atom += n
            lab = s.labels
            volume = float(out["volume"][g])
            r: Dict[str, float] = {"dataset": s.dataset, "frame": s.index, "n_atoms": n}
            if "energy" in lab:
                r["energy_error_meV_per_atom"] = 1000.0 * (float(out["energy"][g]) - float(lab["energy"])) / n
                r["energy_pred_eV"] = float(out["energy"][g])
            if "forces" in lab:
                d = out["forces"][sl].numpy() - lab["forces"]
                r["forces_abs_sum_meV_per_A"] = 1000.0 * float(np.abs(d).sum())
                r["forces_sq_sum"] = 1e6 * float((d**2).sum())
                r["forces_count"] = d.size
            if "stress" in lab:
                d = out["stress"][g].numpy() - lab["stress"]
                r["stress_abs_sum_meV_per_A3"] = 1000.0 * float(np.abs(d).sum())
                r["stress_sq_sum"] = 1e6 * float((d**2).sum())
                r["stress_count"] = d.size
            if "born_charges" in lab:
                d = out["born_charges"][sl].numpy() - lab["born_charges"]
                r["born_charges_abs_sum"] = float(np.abs(d).sum())
                r["born_charges_sq_sum"] = float((d**2).sum())
                r["born_charges_count"] = d.size
            if "polarizability" in lab:
                pa = out["polarizability"][g].numpy()
                ra = lab["polarizability"]
                r["polarizability_rel_error"] = float(np.linalg.norm(pa - ra) / np.linalg.norm(ra))
                r["eps_inf_pred"] = (1.0 + np.diag(pa) / (volume * EPS0)).tolist()
                r["eps_inf_ref"] = (1.0 + np.diag(ra) / (volume * EPS0)).tolist()
            if "polarization" in lab:
                diff = torch.as_tensor(out["dipole"][g].numpy() - lab["polarization"]).view(1, 3)
                cell = torch.as_tensor(s.structure.cell).view(1, 3, 3)
                folded = fold_dipole(diff, cell).view(3).numpy() / volume
                r["polarization_folded_error_e_per_A2"] = folded.tolist()
            rows.append(r)
    return rows


def summarise(rows: Sequence[Dict]) -> Dict[str, float]:
    """Aggregate per-frame rows (one dataset) into the card's metrics."""
    out: Dict[str, float] = {"frames": len(rows)}
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
        pred = np.mean([r["eps_inf_pred"] for r in rs], axis=0)
        ref = np.mean([r["eps_inf_ref"] for r in rs], axis=0)
        out["eps_inf_pred_diag"] = pred.tolist()
        out["eps_inf_dft_diag"] = ref.tolist()
        out["eps_inf_rel_error_max"] = float(np.max(np.abs(pred - ref) / ref))
        per_frame = np.array([np.abs(np.array(r["eps_inf_pred"]) - r["eps_inf_ref"]) / np.array(r["eps_inf_ref"]) for r in rs])
        out["eps_inf_rel_error_per_frame_mean"] = float(per_frame.mean())
    rs = have("polarization_folded_error_e_per_A2")
    if rs:
        d = np.array([r["polarization_folded_error_e_per_A2"] for r in rs])
        out["polarization_folded_mae_e_per_A2"] = float(np.abs(d).mean())
        out["polarization_folded_rmse_e_per_A2"] = float(np.sqrt((d**2).mean()))
    return out


def compact_frame(row: Dict) -> Dict:
    """Card form of one frame's errors (means instead of sums)."""
    r = {"dataset": row["dataset"], "frame": row["frame"]}
    if "energy_error_meV_per_atom" in row:
        r["energy_error_meV_per_atom"] = row["energy_error_meV_per_atom"]
    for q, unit in (("forces", "meV_per_A"), ("stress", "meV_per_A3")):
        if f"{q}_count" in row:
            r[f"{q}_mae_{unit}"] = row[f"{q}_abs_sum_{unit}"] / row[f"{q}_count"]
    if "born_charges_count" in row:
        r["born_charges_mae_e"] = row["born_charges_abs_sum"] / row["born_charges_count"]
    for k in ("polarizability_rel_error", "eps_inf_pred", "eps_inf_ref", "polarization_folded_error_e_per_A2"):
        if k in row:
            r[k] = row[k]
    return r
