"""The MD interfaces: the ASE calculator (:mod:`.ase`, needs ``ase``), the i-PI driver (:mod:`.ipi`,
:mod:`.ipi_socket`), the LAMMPS bridge (:mod:`.lammps`), applied fields (:mod:`.fields`), per-step logs
(:mod:`.steplog`) and the extrapolation watch all three share (:mod:`.monitor`).

Submodules are imported on use (the ASE calculator needs ``ase``, the LAMMPS bridge ``lammps``).
"""
