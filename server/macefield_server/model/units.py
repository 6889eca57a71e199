"""Physical constants and unit conventions shared by the engine, server and docs.

Internal units: energy eV, length Angstrom, field V/Angstrom, charge e.
``UNITS`` (unit of every result field) is the wire API's table, owned by the
torch-free client package, so engine, server and client cannot disagree.
"""

from macefield_client.results import UNITS  # noqa: F401

#: vacuum permittivity in e / (V * Angstrom)
EPS0 = 8.8541878128e-12 / 1.602176634e-19 / 1e10  # = 0.0055263494...
#: 1 e/Angstrom^2 in micro-Coulomb per cm^2
E_PER_A2_TO_UC_PER_CM2 = 1602.176634
