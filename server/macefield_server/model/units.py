"""Physical constants and unit conventions shared by the engine, server and docs.

Internal units: energy eV, length Angstrom, field V/Angstrom, charge e.
"""

#: vacuum permittivity in e / (V * Angstrom)
EPS0 = 8.8541878128e-12 / 1.602176634e-19 / 1e10  # = 0.0055263494...
#: 1 e/Angstrom^2 in micro-Coulomb per cm^2
E_PER_A2_TO_UC_PER_CM2 = 1602.176634

UNITS = {
    "energy": "eV",
    "forces": "eV/A",
    "stress": "eV/A^3",
    "dipole": "e*A",
    "polarization": "e/A^2",
    "polarization_quantum": "e/A^2",
    "born_charges": "e",
    "polarizability": "e*A^2/V",
    "chi": "dimensionless",
    "eps_inf": "dimensionless",
    "electric_field": "V/A",
    "volume": "A^3",
}
