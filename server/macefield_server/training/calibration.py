"""Offline calibration of the extrapolation grade: reference statistics from a model's training frames.

The grade itself (per atom, at serving time) is the engine's
(:mod:`macefield_server.engine.extrapolation`); this module computes what it
is measured against: for each head and element, the D-optimal active set
(MaxVol) of the reference atoms' invariant latent features and the residual
radius for directions the active set does not span.  ``macefield-calibrate``
and the trainer call :func:`calibrate`.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch

from ..engine.extrapolation import (MAXVOL_TOLERANCE, RESIDUAL_FLOOR, TRUNCATION, ElementStatistics,
                                    ExtrapolationStatistics, feature_layout, latent_features, statistics_of,
                                    weights_fingerprint)
from ..engine.graph import Structure, neighbour_list
from ..engine.predict import _passes, predict, prepare_batch


def maxvol(x: np.ndarray, tolerance: float = MAXVOL_TOLERANCE, max_swaps: Optional[int] = None) -> np.ndarray:
    """Row indices of an r x r submatrix of ``x`` (n x r, rank r) with locally maximal |det|.

    On return every row of ``x @ inv(x[rows])`` has all entries within
    ``tolerance`` in absolute value (Goreinov et al., "How to find a good
    submatrix", 2010): a start from a pivoted QR of x^T, then swaps of the
    row with the largest coefficient into the set, each multiplying |det| by
    that coefficient (> tolerance), so the loop ends.
    """

    n, r = x.shape
    if n < r:
        raise ValueError(f"maxvol: {n} rows cannot span {r} dimensions")
    _, _, pivots = scipy.linalg.qr(x.T, mode="economic", pivoting=True)
    rows = np.array(pivots[:r], dtype=np.int64)
    max_swaps = 100 * r if max_swaps is None else max_swaps

    def coefficients():
        return np.linalg.solve(x[rows].T, x.T).T  # x @ inv(x[rows])

    b = coefficients()
    for swap in range(max_swaps):
        i, j = np.unravel_index(int(np.argmax(np.abs(b))), b.shape)
        if abs(b[i, j]) <= tolerance:
            return rows
        # Sherman-Morrison update of x @ inv(A) when row i replaces active row j
        column = b[:, j].copy()
        update = b[i, :].copy()
        update[j] -= 1.0
        b -= np.outer(column / b[i, j], update)
        rows[j] = i
        if swap % 32 == 31:  # keep the rank-1 updates honest
            b = coefficients()
    b = coefficients()
    if np.abs(b).max() > tolerance:
        raise RuntimeError(f"maxvol: no convergence after {max_swaps} swaps (max coefficient {np.abs(b).max():.6g})")
    return rows


# --------------------------------------------------------------- statistics
def element_statistics(x: np.ndarray, z: int, truncation: float = TRUNCATION,
                       origin: Optional[Sequence[Tuple[int, int]]] = None) -> ElementStatistics:
    """The reference region of one element from its reference atoms' features ``x`` (n, d)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n == 0:
        raise ValueError(f"element {z}: no reference atoms")
    gram = x.T @ x
    eigenvalues, vectors = np.linalg.eigh(gram)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    largest = max(float(eigenvalues[0]), 0.0)
    if largest == 0.0:
        raise ValueError(f"element {z}: all reference features are zero")
    # singular values s_k = sqrt(lambda_k): keep s_k > truncation * s_0
    keep = eigenvalues > (truncation ** 2) * largest
    basis = vectors[:, keep]
    projected = x @ basis
    rows = maxvol(projected)
    coefficients = basis @ np.linalg.inv(projected[rows])
    residual = np.linalg.norm(x - projected @ basis.T, axis=1)
    rms = float(np.sqrt(np.mean(np.sum(x * x, axis=1))))
    radius = max(float(residual.max()), RESIDUAL_FLOOR * rms)
    active = [(int(origin[r][0]), int(origin[r][1])) for r in rows] if origin is not None else []
    return ElementStatistics(
        atomic_number=int(z),
        basis=torch.from_numpy(basis.copy()),
        coefficients=torch.from_numpy(coefficients),
        residual_radius=torch.tensor(radius, dtype=torch.float64),
        n_reference=int(n),
        active_set=active,
    )


def reference_features(model, structures: Sequence, head: str, max_edges: int = 12_000, progress=None):
    """(features (n, d) float64, atomic numbers (n,), origin (n, 2) = (structure, atom)) of ``structures``
    on ``head``."""

    r_max = float(model.r_max)
    structures = [s if isinstance(s, Structure) else Structure.from_atoms(s) for s in structures]
    structures = [Structure(s.numbers, s.positions, s.cell, s.pbc, s.electric_field, head) for s in structures]
    graphs = [neighbour_list(s, r_max) for s in structures]
    feats, numbers, origin = [], [], []
    for chunk in _passes(graphs, None, max_edges):
        batch = prepare_batch(model, [structures[i] for i in chunk], graphs=[graphs[i] for i in chunk])
        feats.append(latent_features(model, batch.tensors).to(torch.float64).cpu().numpy())
        for i in chunk:
            numbers.append(structures[i].numbers)
            origin.append(np.stack([np.full(structures[i].n_atoms, i), np.arange(structures[i].n_atoms)], axis=1))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(feats), np.concatenate(numbers), np.concatenate(origin)


def with_fields(structures: Sequence, magnitude: float) -> List:
    """Each structure at zero field and at +-``magnitude`` (V/A) along x, y and z (7 copies, zero field first)."""

    out = []
    for s in structures:
        s = s if isinstance(s, Structure) else Structure.from_atoms(s)
        out.append(Structure(s.numbers, s.positions, s.cell, s.pbc, np.zeros(3), s.head))
        for axis in range(3):
            for sign in (1.0, -1.0):
                field = np.zeros(3)
                field[axis] = sign * magnitude
                out.append(Structure(s.numbers, s.positions, s.cell, s.pbc, field, s.head))
    return out


def calibrate(model, structures: Sequence, head: Optional[str] = None, *, reference: Optional[Dict] = None,
              truncation: float = TRUNCATION, fields: float = 0.0, progress=None) -> ExtrapolationStatistics:
    """Statistics of ``head`` (None: the model's first head) from reference ``structures`` (ase.Atoms or Structure).

    Returns the model's existing statistics with this head's replaced (or new
    ones); attach them with :func:`attach`.  ``reference``: JSON-able
    description of the reference set (files, frames), stored with them.

    ``fields`` (V/A): 0 takes every structure at the field it carries
    (``Structure.electric_field``; ase.Atoms: zero).  A magnitude E > 0 takes
    each at zero field and at +-E along x, y and z instead, declaring fields of
    that size part of the reference: the field enters the features, and a
    model trained at zero field otherwise grades any finite field as
    extrapolation (default model: E = 0.01 V/A raises perfect quartz from
    0.64 to 1.5).  Only for fields the model has been checked at.
    """
    heads = list(getattr(model, "heads", None) or ["Default"])
    head = heads[0] if head in (None, "") else head
    if head not in heads:
        raise ValueError(f"head: unknown head {head!r}; the model has {heads}")
    if not structures:
        raise ValueError("calibration needs at least one reference structure")
    if fields < 0 or not math.isfinite(fields):
        raise ValueError(f"fields: expected a magnitude >= 0 (V/A), got {fields}")
    n_structures = len(structures)
    if fields > 0:
        structures = with_fields(structures, fields)
    x, numbers, origin = reference_features(model, structures, head, progress=progress)
    if fields > 0:
        origin[:, 0] //= 7  # the structure the field copy came from
    per_element = {}
    for z in sorted(set(int(v) for v in numbers)):
        mask = numbers == z
        per_element[z] = element_statistics(x[mask], z, truncation, origin[mask])
    new = ExtrapolationStatistics(feature_layout(model), {head: per_element},
                                  references={head: dict(reference or {}, structures=n_structures,
                                                          atoms=int(len(numbers)), fields_V_per_A=fields)},
                                  truncation=truncation, weights=weights_fingerprint(model))
    existing = statistics_of(model)
    return existing.merged(new) if existing is not None else new


def reference_grades(model, structures: Iterable, head: str) -> np.ndarray:
    """Grades of every atom of ``structures`` on ``head`` (concatenated), e.g. to check a calibration."""

    return np.concatenate([r["extrapolation"] for r in predict(model, list(structures), heads=head,
                                                                 outputs=["extrapolation"])])
