"""Relaxation through the service: positions (and optionally the cell) in the electric enthalpy F(R, E).

ASE's optimisers drive :class:`~macefield_client.md.ase.MACEFieldCalculator`; at zero field the
structure's space group is kept exactly (``ase.constraints.FixSymmetry``, spglib), so that a relaxed
crystal still has the symmetry its mode labels need.  A finite field lowers the symmetry: then no
constraint is applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def relax(client, atoms, *, electric_field=(0.0, 0.0, 0.0), cell: bool = False, fmax: float = 1e-3,
          steps: int = 500, symmetry: bool | None = None, symprec: float = 1e-3, head: str | None = None,
          model: str | None = None) -> tuple[Any, dict]:
    """Relax ``atoms`` (a copy) in F(R, E) with BFGS; returns (relaxed atoms, info).

    Args:
        client: a :class:`~macefield_client.Client`.
        electric_field: (3,) V/A.
        cell: also relax the cell (``FrechetCellFilter``, zero external pressure).
        fmax: largest force component at convergence, eV/A (the cell's stress scaled by the volume alike).
        steps: optimiser steps at most.
        symmetry: keep the space group found with ``symprec`` (None: only at zero field).
        head, model: served head and model.

    ``info``: ``converged``, ``steps``, ``max_force_eV_A``, ``energy_eV``.
    """
    from ase.optimize import BFGS

    from ..md.ase import MACEFieldCalculator

    field = np.asarray(electric_field, dtype=float)
    atoms = atoms.copy()
    calc = MACEFieldCalculator(client=client, electric_field=field.tolist(), head=head, model=model,
                               extrapolation="ignore")
    atoms.calc = calc
    if symmetry is None:
        symmetry = not np.any(field)
    if symmetry:
        from ase.constraints import FixSymmetry

        atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))
    target = atoms
    if cell:
        from ase.filters import FrechetCellFilter

        target = FrechetCellFilter(atoms)
    try:
        opt = BFGS(target, logfile=None, maxstep=0.05)
        converged = bool(opt.run(fmax=fmax, steps=steps))
        forces = atoms.get_forces()
        info = {"converged": converged, "steps": int(opt.nsteps), "max_force_eV_A": float(np.abs(forces).max()),
                "energy_eV": float(atoms.get_potential_energy())}
    finally:
        calc.close()
    atoms.set_constraint()
    atoms.calc = None
    return atoms, info


__all__ = ["relax"]
