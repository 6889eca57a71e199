"""Validation metrics per head, in the units of the model card.

Per dataset: energy MAE/RMSE (meV/atom), forces MAE/RMSE (meV/A), stress
MAE/RMSE (meV/A^3), Born charges MAE/RMSE (e), polarizability relative error
(|alpha_pred - alpha_ref|_F / |alpha_ref|_F per frame, averaged), eps_inf
(diagonal of 1 + chi averaged over the frames, predicted and DFT, and the
relative error of that average), folded polarization MAE/RMSE (e/A^2).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from macefield_client.contract.accuracy import compact_frame, frame_errors as structure_errors, summarise  # noqa: F401

from ..engine.response import respond
from .data import Sample, make_batch

_OUTPUTS = frozenset({"energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"})


def frame_errors(model, samples: Sequence[Sample], batch_size: int = 1, on_output=None) -> List[Dict[str, Any]]:
    """Per-frame errors (card units, :func:`macefield_client.accuracy.frame_errors`) of ``model`` on ``samples``.

    Graphs must be built.  ``on_output(out, batch)``, if given, also sees every
    raw engine output (the trainer computes its validation loss from the same pass).
    """
    rows: List[Dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = make_batch(chunk, model, next(model.parameters()).dtype)
        raw = respond(model, batch.tensors, None, _OUTPUTS)
        if on_output is not None:
            on_output(raw, batch)
        out = {k: v.detach().double().cpu().numpy() for k, v in raw.items() if isinstance(v, torch.Tensor)}
        atom = 0
        for g, s in enumerate(chunk):
            sl = slice(atom, atom + s.n_atoms)
            atom += s.n_atoms
            pred = {"energy": out["energy"][g], "forces": out["forces"][sl], "stress": out["stress"][g],
                    "dipole": out["dipole"][g], "born_charges": out["born_charges"][sl],
                    "polarizability": out["polarizability"][g]}
            row: Dict[str, Any] = {"dataset": s.dataset, "frame": s.index}
            row.update(structure_errors(pred, s.labels, n_atoms=s.n_atoms, cell=s.structure.cell,
                                        periodic=s.structure.periodic))
            rows.append(row)
    return rows
