"""What the workflows share: unit conversions, the continuous polarization, structures in and out.

Units inside every workflow are the wire's (:mod:`macefield_client.contract.constants`): eV, Angstrom,
V/A, e, atomic mass units (amu), fs.  Conversions to the units users read (cm^-1, uC/cm^2, MV/cm) are
named here once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..contract.constants import E_PER_A2_TO_UC_PER_CM2, EPS0, V_PER_A_TO_MV_PER_CM

#: speed of light, cm/s (exact)
C_CM_PER_S = 2.99792458e10
#: 1 THz in cm^-1 (1e12 / c): 33.35641
THZ_TO_CM1 = 1e12 / C_CM_PER_S
#: sqrt(eV / (A^2 amu)) as a cyclic frequency in THz: 15.633302 (omega^2 of a dynamical matrix in
#: eV/(A^2 amu) -> f = sqrt(omega^2) / (2 pi) in THz)
EV_A2_AMU_TO_THZ = math.sqrt(1.602176634e-19 / 1.66053906660e-27) * 1e10 / (2.0 * math.pi) / 1e12
#: the same as a wavenumber: sqrt(omega^2 [eV/(A^2 amu)]) -> cm^-1 (521.47)
EV_A2_AMU_TO_CM1 = EV_A2_AMU_TO_THZ * THZ_TO_CM1


def omega2_to_cm1(omega2: np.ndarray) -> np.ndarray:
    """Eigenvalues of the dynamical matrix (eV/(A^2 amu)) as wavenumbers, cm^-1; negative (unstable) modes
    are returned as negative numbers (the phonopy convention)."""
    omega2 = np.asarray(omega2, dtype=float)
    return np.sign(omega2) * np.sqrt(np.abs(omega2)) * EV_A2_AMU_TO_CM1


def cm1_to_omega2(cm1: np.ndarray) -> np.ndarray:
    """Inverse of :func:`omega2_to_cm1`."""
    cm1 = np.asarray(cm1, dtype=float)
    return np.sign(cm1) * (cm1 / EV_A2_AMU_TO_CM1) ** 2


def follow_branch(p: np.ndarray, p_ref: np.ndarray, quantum: np.ndarray) -> np.ndarray:
    """``p`` (e/A^2) moved by the integer combination of polarization quanta (rows of ``quantum``, e*a_k/Omega)
    that brings it closest to ``p_ref``: the branch that continues ``p_ref``."""
    n = np.rint(np.linalg.solve(np.asarray(quantum, dtype=float).T, np.asarray(p, dtype=float) - p_ref))
    return np.asarray(p, dtype=float) - np.asarray(quantum, dtype=float).T @ n


class ContinuousPolarization:
    """P followed across polarization quanta along a trajectory: no jumps of e*a_k/Omega between steps.

    Each new value is moved by the integer combination of the quanta that puts it closest to the value
    predicted from the previous steps (the previous value, or with two of them the linear extrapolation
    2 P(n-1) - P(n-2)), so a run whose P changes smoothly gives a continuous P(t) even when it changes by a
    sizeable part of a quantum per step (fast switching in a large cell, whose quanta are small).
    """

    def __init__(self) -> None:
        self.previous: np.ndarray | None = None
        self.before: np.ndarray | None = None

    def __call__(self, p: np.ndarray, quantum: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        if self.previous is not None:
            guess = self.previous if self.before is None else 2.0 * self.previous - self.before
            p = follow_branch(p, guess, quantum)
        self.before = self.previous
        self.previous = p.copy()
        return p


def to_atoms(structure: Any):
    """An ``ase.Atoms`` copy of ``structure`` (Atoms or a file path: its first frame)."""
    from ase import Atoms

    if isinstance(structure, Atoms):
        atoms = structure.copy()
        atoms.calc = None
        return atoms
    import ase.io

    return ase.io.read(str(structure), index=0)


def json_ready(value: Any) -> Any:
    """numpy arrays and numbers as lists and floats, non-finite floats as strings: what ``json.dump`` takes."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


__all__ = ["C_CM_PER_S", "E_PER_A2_TO_UC_PER_CM2", "EPS0", "EV_A2_AMU_TO_CM1", "EV_A2_AMU_TO_THZ", "THZ_TO_CM1",
           "V_PER_A_TO_MV_PER_CM", "ContinuousPolarization", "cm1_to_omega2", "follow_branch", "json_ready",
           "omega2_to_cm1", "to_atoms"]
