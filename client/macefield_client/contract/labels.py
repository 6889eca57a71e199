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

from .constants import EPS0


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

#: plausible range of the electronic eps_inf of a solid (used to tell polarizability conventions apart)
EPS_INF_PLAUSIBLE = (1.3, 60.0)
#: a polarization value further than this many quanta (e*a_k/Omega) from zero is a cell dipole, not P
P_QUANTA_IMPLAUSIBLE = 10.0

#: keys whose polarizability convention the name fixes (this project's own CLI output)
NAMED_POLARIZABILITY = {"MACE_polarizability": "chi", "MACE_alpha": "extensive", "MACE_eps_inf": "eps_inf",
                        "MACE_molecular_polarizability": "extensive"}


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


def _periodic_volume(atoms) -> float:
    """The cell volume, A^3, of a frame periodic in all three directions; ValueError for any other."""
    volume = _volume(atoms)
    if volume is None:
        raise ValueError("a cell periodic in all three directions is needed for its volume")
    return volume


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
    """The first of :data:`KNOWN_KEYS` that some frame has (None: no such label)."""
    for key in KNOWN_KEYS[quantity]:
        if any(has_key(a, key) for a in frames):
            return key
    return None


def detect_kind(frames: Sequence, quantity: str, key: str) -> Tuple[Optional[str], str]:
    """(kind, reason) for a label whose convention was not given; ValueError when the values cannot tell.

    The kind is None for a quantity with a single convention (:data:`KINDS`).

    Never guesses between conventions that the values do not separate:

    * a key that names its convention (:data:`NAMED_KINDS`,
      :data:`NAMED_POLARIZABILITY`) uses it;
    * polarization: a value more than :data:`P_QUANTA_IMPLAUSIBLE` quanta
      (e*a_k/Omega) from zero cannot be any branch of P, so it is a cell dipole;
      smaller values could be either (a small dipole, or P): refused;
    * polarizability: every convention (extensive, per_volume, chi, eps_inf) is
      tried on every periodic frame; exactly one may give a median eps_inf
      (trace/3) within :data:`EPS_INF_PLAUSIBLE`, otherwise refused (the
      values of extensive alpha, chi and eps_inf of a 72-atom cell all look
      like a dielectric constant);
    * with no periodic frame only the volume-free conventions exist (dipole,
      extensive).
    Other quantities have one convention.
    """
    if quantity not in ("polarization", "polarizability"):
        return (KINDS[quantity][1] if len(KINDS[quantity]) > 1 else None), "the only convention"
    if quantity == "polarization" and key in NAMED_KINDS:
        return NAMED_KINDS[key], f"the key {key!r} names it"
    if quantity == "polarizability" and key in NAMED_POLARIZABILITY:
        return NAMED_POLARIZABILITY[key], f"the key {key!r} names it"
    periodic = [a for a in frames if a.pbc.all() and has_key(a, key)]
    if not periodic:
        return ("dipole" if quantity == "polarization" else "extensive"), "no periodic frame: the only convention"
    option = "--polarization-unit dipole|P" if quantity == "polarization" else \
        "--polarizability-unit extensive|per_volume|chi|eps_inf"
    if quantity == "polarization":
        quanta = float(np.median([np.linalg.norm(as_array(lookup(a, key))) /
                                  np.linalg.norm(np.asarray(a.get_cell()) / _volume(a), axis=1).max()
                                  for a in periodic]))
        if quanta > P_QUANTA_IMPLAUSIBLE:
            return "dipole", f"as P it would lie {quanta:.3g} polarization quanta from zero: a cell dipole"
        raise ValueError(f"polarization: cannot tell whether {key!r} is a cell dipole (e*A) or P (e/A^2) from its "
                         f"values (median {quanta:.3g} quanta from zero); give {option}")
    volumes = [_periodic_volume(a) for a in periodic]
    eps = {}
    for kind in ("extensive", "per_volume", "chi", "eps_inf"):
        values = [1.0 + np.trace(convert("polarizability", lookup(a, key), a, kind)) / 3.0 / (v * EPS0)
                  for a, v in zip(periodic, volumes)]
        eps[kind] = float(np.median(values))
    plausible = [k for k, v in eps.items() if EPS_INF_PLAUSIBLE[0] <= v <= EPS_INF_PLAUSIBLE[1]]
    shown = ", ".join(f"{k}: eps_inf {v:.4g}" for k, v in eps.items())
    if len(plausible) != 1:
        raise ValueError(f"polarizability: cannot tell the convention of {key!r} from its values ({shown}); "
                         f"give {option}")
    return plausible[0], f"the only convention giving a plausible eps_inf ({shown})"


__all__ = ["LabelSpec", "KINDS", "KNOWN_KEYS", "EPS0", "lookup", "has_key", "as_array", "full_stress", "convert",
           "find_key", "detect_kind"]
