"""Physical constants and unit conversions, the same on both sides of the wire.

Internal (and wire) units: energy eV, length Angstrom, field V/Angstrom,
charge e.  Derived: polarization e/Angstrom^2, polarizability e*Angstrom^2/V.
"""

from __future__ import annotations

#: vacuum permittivity in e / (V * Angstrom) (CODATA 2018: 8.8541878128e-12 F/m, e = 1.602176634e-19 C)
EPS0 = 8.8541878128e-12 / 1.602176634e-19 / 1e10  # = 0.0055263494...
#: 1 e/Angstrom^2 in micro-Coulomb per cm^2
E_PER_A2_TO_UC_PER_CM2 = 1602.176634
#: 1 V/Angstrom in MV/cm
V_PER_A_TO_MV_PER_CM = 100.0
#: the Bohr radius in Angstrom (CODATA 2018)
BOHR = 0.5291772105638411
#: the Hartree energy in eV (CODATA 2018)
HARTREE = 27.211386024367243

__all__ = ["EPS0", "E_PER_A2_TO_UC_PER_CM2", "V_PER_A_TO_MV_PER_CM", "BOHR", "HARTREE"]
