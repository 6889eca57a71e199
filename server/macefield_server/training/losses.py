"""Loss terms, including the branch-invariant (folded) polarization loss.

The polarization of a periodic cell is defined only modulo the quanta
e*a_k/Omega (a_k: lattice vectors as rows of the cell): two labels that
differ by an integer combination of the quanta describe the same state.
:func:`fold_dipole` maps a dipole difference (e*A; the quanta are then e*a_k)
onto its representative with fractional coordinates in [-1/2, 1/2) along
every lattice vector, so a prediction that is off by whole quanta costs
nothing, and the gradient is that of the nearest branch.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from macefield_client.contract import EPS0


def fold_dipole(diff: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Fold dipole differences (G, 3) e*A by the quanta e*a_k (cell rows, (G, 3, 3)).

    Returns ``diff - n @ cell`` with integer ``n`` chosen so that the
    fractional coordinates ``diff @ inv(cell)`` of the result lie in [-1/2, 1/2).
    """
    cell = cell.to(diff.dtype)
    frac = torch.linalg.solve(cell.transpose(-1, -2), diff.unsqueeze(-1)).squeeze(-1)  # diff = frac @ cell
    shift = torch.floor(frac.detach() + 0.5)
    return torch.einsum("gk,gkj->gj", frac - shift, cell)


def folded_polarization_residual(
    pred_dipole: torch.Tensor, ref_dipole: torch.Tensor, cell: torch.Tensor, volume: torch.Tensor
) -> torch.Tensor:
    """(G, 3) residual of P in e/A^2 after folding by the polarization quanta e*a_k/Omega."""
    return fold_dipole(pred_dipole - ref_dipole, cell) / volume.view(-1, 1)


def huber(residual: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean Huber loss of a residual (0 for an empty tensor)."""
    if residual.numel() == 0:
        return residual.new_zeros(())
    return torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), delta=delta, reduction="mean")


def residuals(out: Dict[str, torch.Tensor], batch, quantities) -> Dict[str, torch.Tensor]:
    """Residuals (prediction - label) of every labelled quantity, in loss units.

    Energy per atom (eV/atom), forces (eV/A), stress (eV/A^3), folded P
    (e/A^2), Born charges (e), polarizability as susceptibility
    chi = alpha/(Omega eps0) (dimensionless).  Only graphs/atoms that carry
    the label contribute.
    """
    res = {}
    for q in quantities:
        if q not in batch.labels:
            continue
        m = batch.masks[q]
        ref = batch.labels[q]
        if q == "energy":
            res[q] = ((out["energy"] - ref) / batch.n_atoms)[m]
        elif q == "forces":
            res[q] = (out["forces"] - ref)[batch.atom_masks[q]]
        elif q == "born_charges":
            res[q] = (out["born_charges"] - ref)[batch.atom_masks[q]]
        elif q == "stress":
            res[q] = (out["stress"] - ref)[m]
        elif q == "polarization":
            res[q] = folded_polarization_residual(out["dipole"][m], ref[m], batch.cells[m], out["volume"][m])
        elif q == "polarizability":
            res[q] = ((out["polarizability"] - ref) / (out["volume"].view(-1, 1, 1) * EPS0))[m]
    return res


def total_loss(res: Dict[str, torch.Tensor], weights: Dict[str, float], scales: Dict[str, float], delta: float):
    """Weighted sum of Huber losses of the scaled residuals; also returns each term."""
    terms = {}
    total: Optional[torch.Tensor] = None
    for q, r in res.items():
        w = float(weights.get(q, 0.0))
        if w == 0.0 or r.numel() == 0:
            continue
        term = huber(r / scales[q], delta)
        terms[q] = term
        total = w * term if total is None else total + w * term
    if total is None:
        raise ValueError("no loss term: every weight is zero or no dataset labels a weighted quantity")
    return total, terms
