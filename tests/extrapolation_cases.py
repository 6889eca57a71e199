"""Structures the default model must flag as extrapolation.

Used by tests/test_extrapolation.py and bench/extrapolation_methods.py.

Each is built from a real structure and checked where it is made:

* :func:`wrong_quartz`: the classic mistake, O at z = 0.7858 in space group
  152 (every Si 2-coordinated);
* :func:`compressed_quartz`: 2x2x2 PBE alpha-quartz, volume -15% (uniform);
* :func:`close_pair_quartz`: real 2x2x2 PBE quartz with one O moved along its
  Si-O bond to 0.6 A from that Si (the server refuses only < 0.5 A);
* :func:`chain_structure`: the O=Si=O chains the default model finds when it
  relaxes the wrong quartz (its spurious basin, ~0.1 eV/atom below quartz);
* :func:`swapped_batio3`: a BaTiO3 MD frame with the Ba and Ti sublattices swapped.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list
from ase.spacegroup import crystal
from ase.stress import full_3x3_to_voigt_6_stress

from macefield_client.structures import alpha_quartz


def wrong_quartz():
    """The structure that was in the README: O at z = 0.7858 (Si ends up 2-coordinated)."""
    return crystal(["Si", "O"], basis=[(0.4697, 0.0, 1 / 3), (0.4135, 0.2669, 0.7858)], spacegroup=152,
                   cellpar=[4.916, 4.916, 5.405, 90, 90, 120])


def si_coordination(atoms, cutoff: float = 2.0) -> np.ndarray:
    """Number of O within ``cutoff`` of each Si."""
    i, j = neighbor_list("ij", atoms, cutoff)
    bonds = (atoms.numbers[i] == 14) & (atoms.numbers[j] == 8)
    return np.bincount(i[bonds], minlength=len(atoms))[atoms.numbers == 14]


def compressed_quartz(volume_fraction: float = 0.85):
    """2x2x2 alpha-quartz at the PBE cell, every length scaled so that the volume is ``volume_fraction`` of it."""
    atoms = alpha_quartz(cell="pbe", repeat=(2, 2, 2))
    volume = atoms.get_volume()
    atoms.set_cell(atoms.cell[:] * volume_fraction ** (1 / 3), scale_atoms=True)
    assert abs(atoms.get_volume() / volume - volume_fraction) < 1e-12
    return atoms


def close_pair_quartz(distance: float = 0.6):
    """2x2x2 PBE alpha-quartz with its first O moved along the bond to its nearest Si.

    The O moves until the pair is ``distance`` apart.
    """
    atoms = alpha_quartz(cell="pbe", repeat=(2, 2, 2))
    i, j, d, vec = neighbor_list("ijdD", atoms, 2.0)
    oxygen = int(np.flatnonzero(atoms.numbers == 8)[0])
    bond = np.flatnonzero((i == oxygen) & (atoms.numbers[j] == 14))
    k = bond[np.argmin(d[bond])]
    positions = atoms.positions.copy()
    positions[oxygen] += vec[k] * (1.0 - distance / d[k])
    atoms.positions = positions
    assert abs(atoms.get_distance(oxygen, int(j[k]), mic=True) - distance) < 1e-9
    others = neighbor_list("d", atoms, distance + 0.3)
    assert np.sum(others < distance + 0.3) == 2  # that pair (counted twice) and no other close pair
    return atoms


class EngineCalculator(Calculator):
    """In-process ASE calculator on a model (energy, forces, stress), for relaxations in tests and benchmarks."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model, head: str):
        super().__init__()
        self.model, self.head = model, head

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        from macefield_server.engine import predict

        super().calculate(atoms, properties, system_changes)
        [r] = predict(self.model, [self.atoms], heads=self.head, outputs=["forces", "stress"])
        self.results = {"energy": float(r["energy"]), "free_energy": float(r["energy"]), "forces": r["forces"],
                        "stress": full_3x3_to_voigt_6_stress(r["stress"])}


def chain_structure(model, fmax: float = 0.01):
    """The wrong quartz relaxed (positions, fixed cell) with ``model`` on head sio2.

    Returns (atoms, energy per atom relative to PBE alpha-quartz, eV).  With the
    default model every Si ends 2-coordinated at 1.53 A (O=Si=O chains),
    about 0.1 eV/atom below real quartz: a basin that exists only in the model.
    """
    from ase.optimize import BFGS

    quartz = alpha_quartz(cell="pbe")
    quartz.calc = EngineCalculator(model, "sio2")
    reference = quartz.get_potential_energy() / len(quartz)
    atoms = wrong_quartz()
    atoms.calc = EngineCalculator(model, "sio2")
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=300)
    relative = atoms.get_potential_energy() / len(atoms) - reference
    atoms.calc = None
    return atoms, relative


def swapped_batio3(frame):
    """A copy of a BaTiO3 frame with every Ba put where a Ti was and vice versa."""
    atoms = frame.copy()
    atoms.calc = None
    numbers = atoms.numbers.copy()
    numbers[frame.numbers == 56] = 22
    numbers[frame.numbers == 22] = 56
    atoms.numbers = numbers
    return atoms
