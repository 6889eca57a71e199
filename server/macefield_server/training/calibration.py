"""Offline calibration of the extrapolation grade and field range: reference statistics from training frames.

The grade and the field range themselves (at serving time) are the engine's
(:mod:`macefield_server.engine.extrapolation`); this module computes what they
are measured against, for each head and element: the D-optimal active set
(MaxVol) of the reference atoms' field-free invariant features and the residual
radius for directions the active set does not span (the grade), and the field
susceptibility kappa = mean ||Z*||_2 / sigma_F (the field range).
``macefield-calibrate`` calls :func:`calibrate`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch

from macefield_client.contract.labels import as_array, find_key, lookup

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


#: Born charges for the field susceptibility are evaluated on every this-many-th reference structure
#: (a mean over thousands of atoms; default model: every 8th frame against all frames changes E_ref by < 5 %)
BORN_CHARGE_STRIDE = 8


def reference_forces(model, structures: Sequence, head: str) -> Tuple[np.ndarray, str]:
    """(forces (n, 3) eV/A of every atom of ``structures``, source): the frames' force labels when every frame has
    them (ASE Atoms with ``REF_forces``, ``DFT_forces`` or ``forces``), else the model's forces at E = 0."""
    atoms_like = [s for s in structures if not isinstance(s, Structure)]
    if len(atoms_like) == len(structures):
        key = find_key(structures, "forces")
        if key is not None:
            try:
                forces = [as_array(lookup(a, key)).reshape(len(a), 3) for a in structures]
            except (KeyError, ValueError):
                forces = None
            if forces is not None:
                return np.concatenate(forces), f"labels ({key})"
    zero = [_at_zero_field(s, head) for s in structures]
    results = predict(model, zero, heads=head, outputs=["forces"])
    return np.concatenate([r["forces"] for r in results]), "model (E = 0)"


def _at_zero_field(s, head: str) -> Structure:
    s = s if isinstance(s, Structure) else Structure.from_atoms(s)
    return Structure(s.numbers, s.positions, s.cell, s.pbc, np.zeros(3), head)


def field_susceptibility(model, structures: Sequence, head: str, stride: int = BORN_CHARGE_STRIDE) -> Dict:
    """Per element of ``structures``: ``{Z: (mean ||Z*||_2 in e, RMS force component in eV/A)}`` and the sources.

    Z*: the model's Born charges at E = 0 on every ``stride``-th structure
    (spectral norm per atom, mean over the element's atoms); sigma_F: the RMS
    Cartesian force component of the element over all ``structures``
    (:func:`reference_forces`).  Their ratio kappa (A/V) is the field range's
    scale (:mod:`macefield_server.engine.extrapolation`).
    """
    if stride < 1:
        raise ValueError(f"stride: expected >= 1, got {stride}")
    numbers = np.concatenate([np.asarray(s.numbers) for s in structures])
    forces, force_source = reference_forces(model, structures, head)
    sampled = list(structures)[::stride]
    born = predict(model, [_at_zero_field(s, head) for s in sampled], heads=head, outputs=["born_charges"])
    born_numbers = np.concatenate([np.asarray(s.numbers) for s in sampled])
    norms = np.linalg.norm(np.concatenate([r["born_charges"] for r in born]), ord=2, axis=(1, 2))
    out = {}
    for z in sorted(set(int(v) for v in numbers)):
        mine = born_numbers == z
        znorm = float(norms[mine].mean()) if mine.any() else 0.0
        out[z] = (znorm, float(np.sqrt(np.mean(forces[numbers == z] ** 2))))
    return {"elements": out, "forces": force_source, "born_charges": f"model at E = 0, every {stride}th structure "
            f"({len(sampled)} of {len(structures)})"}


def calibrate(model, structures: Sequence, head: Optional[str] = None, *, reference: Optional[Dict] = None,
              truncation: float = TRUNCATION, born_charge_stride: int = BORN_CHARGE_STRIDE,
              progress=None) -> ExtrapolationStatistics:
    """Statistics of ``head`` (None: the model's first head) from reference ``structures`` (ase.Atoms or Structure).

    Returns the model's existing statistics with this head's replaced (or new
    ones); attach them with :func:`attach`.  ``reference``: JSON-able
    description of the reference set (files, frames), stored with them.

    The grade's features are taken before any field coupling, so the
    structures' fields do not matter; the field susceptibility is measured at
    E = 0 (:func:`field_susceptibility`, Born charges on every
    ``born_charge_stride``-th structure).
    """
    heads = list(getattr(model, "heads", None) or ["Default"])
    head = heads[0] if head in (None, "") else head
    if head not in heads:
        raise ValueError(f"head: unknown head {head!r}; the model has {heads}")
    if not structures:
        raise ValueError("calibration needs at least one reference structure")
    structures = list(structures)
    x, numbers, origin = reference_features(model, structures, head, progress=progress)
    susceptibility = field_susceptibility(model, structures, head, born_charge_stride)
    per_element = {}
    for z in sorted(set(int(v) for v in numbers)):
        mask = numbers == z
        per_element[z] = element_statistics(x[mask], z, truncation, origin[mask])
        per_element[z].born_charge_norm, per_element[z].force_rms = susceptibility["elements"][z]
    new = ExtrapolationStatistics(feature_layout(model), {head: per_element},
                                  references={head: dict(reference or {}, structures=len(structures),
                                                          atoms=int(len(numbers)),
                                                          forces=susceptibility["forces"],
                                                          born_charges=susceptibility["born_charges"])},
                                  truncation=truncation, weights=weights_fingerprint(model))
    existing = statistics_of(model)
    return existing.merged(new) if existing is not None else new


def reference_grades(model, structures: Iterable, head: str, electric_field=None) -> np.ndarray:
    """Grades of every atom of ``structures`` on ``head`` (concatenated), e.g. to check a calibration;
    ``electric_field`` (3,) V/A applies that field to every structure (None: zero)."""

    structures = list(structures)
    fields = None if electric_field is None else [np.asarray(electric_field, dtype=float)] * len(structures)
    return np.concatenate([r["extrapolation"] for r in predict(model, structures, heads=head, electric_fields=fields,
                                                                 outputs=["extrapolation"])])
