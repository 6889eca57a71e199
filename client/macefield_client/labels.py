"""Reference labels in extended-XYZ frames: where they live and which unit convention they follow.

The one place that converts file conventions into the engine's units (used
by ``macefield eval`` and by the server's trainer).  Internal units: energy
eV, forces eV/A, stress eV/A^3 with stress = (1/Omega) dE/dstrain (ASE sign),
polarization as the cell dipole Omega*P in e*A, Born charges
Z*[k, i, j] = d dipole_i / d u_kj in e, polarizability d dipole/dE in
e*A^2/V (extensive).

Conventions (``kind``) per quantity:

================ ==================== ==============================================================
quantity         kind                 file value
================ ==================== ==============================================================
energy           ``total``            eV (default)
forces           --                   eV/A, (N, 3)
stress           ``ase``              eV/A^3, (1/Omega) dE/dstrain (default); 6 Voigt or 9 values
                 ``pressure_positive`` the negative of that (e.g. raw QE output)
polarization     ``dipole``           cell dipole Omega*P, e*A (default in training configs)
                 ``P``                polarization, e/A^2
born_charges     --                   9 values per atom, row-major Z*[i][j] = d dipole_i / d u_j, e
polarizability   ``extensive``        d dipole/dE, e*A^2/V (default in training configs)
                 ``per_volume``       dP/dE, e/(V*A)
                 ``chi``              alpha / (Omega eps0), dimensionless
                 ``eps_inf``          1 + chi, dimensionless
================ ==================== ==============================================================

``kind="auto"`` (``macefield eval``) decides between the polarization and
polarizability conventions from the values themselves, see
:func:`detect_kind`; the decision and its reason are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: vacuum permittivity in e / (V * Angstrom)
EPS0 = 8.8541878128e-12 / 1.602176634e-19 / 1e10

#: conventions accepted per quantity (None: the quantity's default)
KINDS: Dict[str, Tuple[Optional[str], ...]] = {
    "energy": (None, "total"),
    "forces": (None,),
    "stress": (None, "ase", "pressure_positive"),
    "polarization": (None, "dipole", "P"),
    "born_charges": (None,),
    "polarizability": (None, "extensive", "per_volume", "chi", "eps_inf"),
}

#: key names tried, in order, when a quantity's key is not given (``macefield eval``)
KNOWN_KEYS: Dict[str, Tuple[str, ...]] = {
    "energy": ("REF_energy", "DFT_energy", "total_energy", "energy"),
    "forces": ("REF_forces", "DFT_forces", "forces"),
    "stress": ("REF_stress", "DFT_stress", "stress"),
    "polarization": ("REF_polarisation", "REF_polarization", "REF_dipole", "DFT_dipole", "dipole", "polarization",
                     "polarisation"),
    "born_charges": ("REF_becs", "REF_born_charges", "DFT_becs", "born_charges", "born_charge", "becs"),
    "polarizability": ("REF_polarisability", "REF_polarizability", "DFT_polarizability", "polarizability",
                       "polarisability"),
}

#: keys whose convention the name alone fixes
NAMED_KINDS: Dict[str, str] = {"REF_polarisation": "P", "REF_polarization": "P", "REF_dipole": "dipole",
                               "DFT_dipole": "dipole", "dipole": "dipole"}

#: plausible range of the electronic eps_inf of a real material (used to tell polarizability conventions apart)
EPS_INF_PLAUSIBLE = (1.02, 60.0)
#: |P| above this (e/A^2; 0.5 e/A^2 = 8000 uC/cm^2) cannot be a polarization: the value is a cell dipole
P_IMPLAUSIBLE = 0.5


@dataclass
class LabelSpec:
    """Where one label lives in a frame and its convention (see the module table)."""

    key: str
    kind: Optional[str] = None
    scale: float = 1.0


def lookup(atoms, key: str):
    """``key`` from ``atoms.info``, else ``atoms.arrays``, else ``atoms.calc.results`` (KeyError if absent)."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    if key in results:
        return results[key]
    raise KeyError(key)


def has_key(atoms, key: str) -> bool:
    try:
        lookup(atoms, key)
    except KeyError:
        return False
    return True


def as_array(value) -> np.ndarray:
    """A label value as a float64 array (strings of numbers separated by spaces or commas too)."""
    if isinstance(value, str):
        value = [float(x) for x in value.replace(",", " ").split()]
    return np.asarray(value, dtype=np.float64)


def full_stress(values: np.ndarray) -> np.ndarray:
    """(3, 3) stress from 9 row-major or 6 Voigt (xx yy zz yz xz xy) values."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 9:
        return values.reshape(3, 3)
    if values.size == 6:
        xx, yy, zz, yz, xz, xy = values
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"stress: expected 6 or 9 values, got {values.size}")


def _volume(atoms) -> Optional[float]:
    return abs(float(np.linalg.det(np.asarray(atoms.get_cell())))) if atoms.pbc.all() else None


def convert(quantity: str, raw, atoms, kind: Optional[str] = None, scale: float = 1.0) -> np.ndarray:
    """One label from its file convention to internal units (module docstring); ValueError names the problem."""
    if quantity not in KINDS:
        raise KeyError(quantity)
    if kind not in KINDS[quantity]:
        raise ValueError(f"keys.{quantity}.kind: expected one of {[k for k in KINDS[quantity] if k]}, got {kind!r}")
    value = as_array(raw) * float(scale)
    n = len(atoms)
    volume = _volume(atoms)
    if quantity == "energy":
        return value.reshape(())
    if quantity == "forces":
        return value.reshape(n, 3)
    if quantity == "stress":
        s = full_stress(value)
        return -s if kind == "pressure_positive" else s
    if quantity == "polarization":
        v = value.reshape(3)
        if kind == "P":
            if volume is None:
                raise ValueError("polarization kind 'P' needs a cell periodic in all three directions")
            v = v * volume
        return v
    if quantity == "born_charges":
        return value.reshape(n, 3, 3)
    a = value.reshape(3, 3)  # polarizability
    if kind in ("per_volume", "chi", "eps_inf"):
        if volume is None:
            raise ValueError(f"polarizability kind {kind!r} needs a cell periodic in all three directions")
        if kind == "eps_inf":
            a = a - np.eye(3)
        a = a * volume * (EPS0 if kind != "per_volume" else 1.0)
    return a


def find_key(frames: Sequence, quantity: str) -> Optional[str]:
    """The first of :data:`KNOWN_KEYS` present in the first frame (None: no such label)."""
    if not frames:
        return None
    for key in KNOWN_KEYS[quantity]:
        if has_key(frames[0], key):
            return key
    return None


def detect_kind(frames: Sequence, quantity: str, key: str) -> Tuple[str, str]:
    """(kind, reason) for a label whose convention was not given.

    * A key that names its convention (:data:`NAMED_KINDS`) uses it.
    * polarization: the median |value| over periodic frames above
      :data:`P_IMPLAUSIBLE` means a cell dipole (as P it would exceed
      8000 uC/cm^2); otherwise P.
    * polarizability: ``extensive`` and ``per_volume`` (the two conventions
      of the common data sets, a factor Omega apart) are tried on every
      periodic frame; the one whose median eps_inf (trace/3) falls in
      :data:`EPS_INF_PLAUSIBLE` is used.  If neither or both do, ValueError
      asks for the convention explicitly (``chi`` and ``eps_inf`` are never
      guessed: their values look alike).
    Other quantities have one convention.
    """
    if quantity not in ("polarization", "polarizability"):
        return (KINDS[quantity][1] if len(KINDS[quantity]) > 1 else None), "the only convention"
    if key in NAMED_KINDS and quantity == "polarization":
        return NAMED_KINDS[key], f"the key {key!r} names it"
    periodic = [a for a in frames if a.pbc.all()]
    if not periodic:
        return ("dipole" if quantity == "polarization" else "extensive"), "no periodic frame: only this convention applies"
    if quantity == "polarization":
        size = float(np.median([np.linalg.norm(as_array(lookup(a, key))) for a in periodic]))
        if size > P_IMPLAUSIBLE:
            return "dipole", f"median |value| {size:.3g} > {P_IMPLAUSIBLE}: not a polarization in e/A^2"
        return "P", f"median |value| {size:.3g} <= {P_IMPLAUSIBLE}: read as P in e/A^2"
    plausible = []
    traces = {}
    for kind in ("extensive", "per_volume"):
        eps = []
        for a in periodic:
            alpha = convert("polarizability", lookup(a, key), a, kind)
            eps.append(1.0 + np.trace(alpha) / 3.0 / (_volume(a) * EPS0))
        traces[kind] = float(np.median(eps))
        if EPS_INF_PLAUSIBLE[0] <= traces[kind] <= EPS_INF_PLAUSIBLE[1]:
            plausible.append(kind)
    shown = ", ".join(f"{k}: eps_inf {v:.4g}" for k, v in traces.items())
    if len(plausible) != 1:
        raise ValueError(
            f"polarizability: cannot tell the convention of {key!r} from its values ({shown}); "
            "give it with --polarizability-unit extensive|per_volume|chi|eps_inf")
    return plausible[0], f"the only convention giving a plausible eps_inf ({shown})"


__all__ = ["LabelSpec", "KINDS", "KNOWN_KEYS", "EPS0", "lookup", "has_key", "as_array", "full_stress", "convert",
           "find_key", "detect_kind"]
