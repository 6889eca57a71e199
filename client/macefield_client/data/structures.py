"""Reference structures from published crystallography, for examples, tests and benchmarks (needs ``ase``).

Every builder here is checked by ``tests/test_structures.py``: coordination,
bond lengths and, through the embedded default model, small residual forces
and the known dielectric response.  Build from these instead of typing
Wyckoff positions by hand: a single wrong coordinate gives a structure that
every model still answers for, confidently and meaninglessly.

alpha-quartz
    Space group P3_121 (No. 152), Z = 3.  Si on 3a (x, 0, 1/3) and O on 6c
    (x, y, z), with the room-temperature single-crystal X-ray parameters of
    Levien, Prewitt and Weidner, Am. Mineral. 65, 920 (1980): a = 4.9160 A,
    c = 5.4054 A, Si x = 0.4697, O (0.4135, 0.2669, 0.1191), the O z being
    quoted for the origin choice with Si at z = 0.  In the setting that
    ASE's ``crystal`` uses for No. 152, with Si at z = 1/3, the same oxygen
    sits at z = 1/3 - 0.1191 = 0.2142.  (z = 0.7858 = 1 - 0.2142 is the
    classic mistake: it leaves every Si 2-coordinated.)  Each Si has 4 O at
    1.605 and 1.614 A; each O bridges 2 Si.

    :data:`PBE_QUARTZ_CELL` has the lattice constants of the DFT (PBE)
    molecular dynamics of arXiv:2508.17870 that the embedded default model
    was trained on (its 72-atom frames are an orthohexagonal 2x1x2 cell,
    9.9706 x 8.6348 x 10.9571 A, i.e. a = 4.9853, c = 5.4785 A): use it with
    PBE-trained models, whose equilibrium volume is about 5 % larger than
    experiment (the experimental cell is under ~7 GPa of model stress).

BaTiO3
    The perovskite ABO3 positions of space group Pm-3m (No. 221): Ba on 1a
    (0, 0, 0), Ti on 1b (1/2, 1/2, 1/2), O on 3c (1/2, 1/2, 0), (1/2, 0, 1/2),
    (0, 1/2, 1/2), i.e. corner-sharing TiO6 octahedra with Ba in the
    12-coordinated cages.  :data:`PBE_BATIO3_CELL` is the mean tetragonal
    cell of the DFT (PBE) molecular dynamics the embedded default model was
    trained on (135-atom 3x3x3 frames, 11.898 x 11.898 x 12.912 A): Ti-O
    1.983 A in the plane and 2.152 A along c.  The ions sit at the
    centrosymmetric positions, so this is the paraelectric reference
    structure in that cell; the ferroelectric ground state displaces Ti and O
    along c from it (relax, or run MD, to find it).

SiO molecule
    Silicon monoxide, X 1Sigma+ ground state, r_e = 1.5097 A (Huber and
    Herzberg, Constants of Diatomic Molecules, 1979): a real molecule made
    of the quartz elements, with a permanent dipole.
"""

from __future__ import annotations

from collections.abc import Sequence

#: alpha-quartz lattice (a, c) in Angstrom: Levien, Prewitt and Weidner, Am. Mineral. 65, 920 (1980)
EXPERIMENT_QUARTZ_CELL: tuple[float, float] = (4.9160, 5.4054)
#: alpha-quartz lattice (a, c) in Angstrom of the PBE MD data of arXiv:2508.17870 (the default model's training data)
PBE_QUARTZ_CELL: tuple[float, float] = (4.9853, 5.4785)

#: BaTiO3 lattice (a, c) in Angstrom of the PBE MD data the default model was trained on (mean of the 135-atom frames)
PBE_BATIO3_CELL: tuple[float, float] = (3.966, 4.304)

#: fractional coordinates of alpha-quartz in P3_121 (No. 152), see the module docstring
QUARTZ_SI = (0.4697, 0.0, 1.0 / 3.0)
QUARTZ_O = (0.4135, 0.2669, 1.0 / 3.0 - 0.1191)

#: Si-O bond length of the SiO molecule, Angstrom
SIO_BOND = 1.5097


def alpha_quartz(cell: Sequence[float] | None = None, repeat=(1, 1, 1), rattle: float = 0.0, seed: int = 0):
    """alpha-quartz (Si3O6 per hexagonal cell) as an ``ase.Atoms``.

    Args:
        cell: ``(a, c)`` in Angstrom, or "pbe" / "experiment" (default:
            :data:`EXPERIMENT_QUARTZ_CELL`).  Fractional coordinates are the
            experimental ones in either cell.
        repeat: supercell repetitions along a1, a2, c (e.g. ``(2, 2, 2)``: 72 atoms).
        rattle: standard deviation of random Cartesian displacements, Angstrom.
        seed: seed of the displacements.
    """
    from ase.spacegroup import crystal

    if cell is None or (isinstance(cell, str) and cell == "experiment"):
        a, c = EXPERIMENT_QUARTZ_CELL
    elif isinstance(cell, str) and cell == "pbe":
        a, c = PBE_QUARTZ_CELL
    elif isinstance(cell, str):
        raise ValueError(f'cell: "pbe", "experiment" or (a, c) in Angstrom, got {cell!r}')
    else:
        a, c = (float(x) for x in cell)
    atoms = crystal(["Si", "O"], basis=[QUARTZ_SI, QUARTZ_O], spacegroup=152, cellpar=[a, a, c, 90, 90, 120])
    atoms = atoms * tuple(repeat)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def perovskite_batio3(cell: Sequence[float] | None = None, repeat=(1, 1, 1)):
    """BaTiO3 at the centrosymmetric perovskite positions (5 atoms per cell) as an ``ase.Atoms``.

    Args:
        cell: ``(a, c)`` in Angstrom of the tetragonal cell (default :data:`PBE_BATIO3_CELL`; ``(a, a)`` is cubic).
        repeat: supercell repetitions (``(3, 3, 3)``: the 135-atom cell of the default model's data).
    """
    from ase import Atoms

    a, c = PBE_BATIO3_CELL if cell is None else (float(x) for x in cell)
    unit = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, c], pbc=True)
    return unit.repeat(tuple(repeat))


def sio_molecule(center=(0.0, 0.0, 0.0), direction=(0.3, 0.5, 0.81)):
    """The SiO molecule (r_e = 1.5097 A) centred at ``center`` along ``direction``, no cell, no periodicity."""
    import numpy as np

    from ase import Atoms

    d = np.asarray(direction, dtype=float)
    d = d / np.linalg.norm(d)
    c = np.asarray(center, dtype=float)
    half = 0.5 * SIO_BOND * d
    return Atoms("SiO", positions=[c - half, c + half], pbc=False)


__all__ = [
    "EXPERIMENT_QUARTZ_CELL",
    "PBE_BATIO3_CELL",
    "PBE_QUARTZ_CELL",
    "SIO_BOND",
    "alpha_quartz",
    "perovskite_batio3",
    "sio_molecule",
]
