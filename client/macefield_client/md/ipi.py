"""``macefield-ipi``: an i-PI driver that forwards every structure to a MACE-Field server (no torch).

    i-pi input.xml &
    macefield-ipi --unix macefield --template init.xyz --server 127.0.0.1:50051 [--bec] [--field EX EY EZ]

The driver connects to a running i-PI (``--unix NAME`` is the socket
``/tmp/ipi_NAME`` of ``<ffsocket mode='unix'><address>NAME</address>``;
``--host H --port P`` for ``mode='inet'``), receives positions and cells in
atomic units, and returns energy (Hartree), forces (Hartree/Bohr), virial
(Hartree, -stress x volume for cells periodic in all three directions, zero
otherwise) and a JSON extras string.  Structures go to the server over one
PredictStream session; with i-PI's batched protocol
(``<batch_size>B</batch_size>``) the B structures of an exchange
(ring-polymer beads, replicas) go as one PredictBatch (split at the
server's ``max_structures_per_request``), so the server computes them in
one engine pass.  Identical structures of a batch (i-PI's padding, beads
that start collapsed) are computed once.

i-PI sends no species: they come from ``--template`` (any file ASE reads,
first frame; use i-PI's own initial configuration).  Periodicity too, per
axis: a template with a cell (extended XYZ ``Lattice``, CIF, POSCAR, ...)
is periodic along the axes its ``pbc`` says.  A template without a cell (a
plain XYZ, or i-PI's own xyz format, whose ``# CELL(abcABC): ...`` line ASE
does not read) leaves it open: if i-PI then sends a cell the driver stops
at the first structure and asks for ``--pbc`` (periodic in i-PI's cell;
``--pbc TTF`` for a slab) or ``--molecule`` (no cell).

Frames: i-PI turns a periodic cell read with ``mode='ase'`` so that a lies
along x and b in the xy plane.  At the first structure the driver finds
that rotation from the template's cell and i-PI's h and applies it to
``--field`` (given in the template's frame); the dipole, polarization, Born
charges, polarizability and the log are in i-PI's frame, like the
positions and forces i-PI holds.  With ``--first-step 0`` it also checks
that i-PI's first structure is the template (cell and positions, modulo
lattice vectors, to 1e-3 A): a different file or atom order is an error,
not silently wrong species.

Extras (``--outputs``; i-PI reads them from ``forces.extras``):

=================== ============ =================================================================
``dipole``          (3,)         -dF/dE, e*Bohr (i-PI's unit for it); default
``BEC``             (3N, 3)      Born charges for ``<bec mode='driver'>``, e: row 3k+j is
                                 coordinate j of atom k, column i the dipole direction
                                 (Z*[k, i, j] = d dipole_i / d R_kj transposed to i-PI's layout)
``polarization``    (3,)         dipole / volume, e/Bohr^2 (1 e/Bohr^2 = 3.57106 e/A^2; periodic
                                 in all three directions only; modulo e*a_k/volume)
``polarizability``  (3, 3)       d dipole / dE, atomic units e^2*Bohr^2/Hartree
                                 (1 a.u. = 0.0102909 e*A^2/V)
=================== ============ =================================================================

``BEC`` (``--bec``) and ``polarizability`` need the second-derivative pass,
about 3x the cost of a force call: ask for them only when i-PI uses them.

Two ways to apply a field:

* i-PI's driven dynamics (``<motion mode='driven_dynamics'>``, ``eda-nve`` /
  ``eda-nvt``, ``<bec mode='driver'>``): run this driver with ``--bec`` and
  no ``--field``.  The model is evaluated at zero field and i-PI adds
  Z*(R) . E(t): the linear (electric-dipole) response, right for weak fields
  such as spectroscopy probes.  i-PI's ``<efield>`` is in i-PI's frame.
* ``--field EX EY EZ`` (V/A), optionally ``--field-frequency`` (THz),
  ``--field-phase`` (rad), ``--field-peak`` / ``--field-sigma`` (fs,
  Gaussian envelope): the model evaluates F(R, E) at the field, the full
  non-linear response (field-induced structural changes, switching), which
  the linear coupling cannot give.  Use plain ``dynamics`` in i-PI then;
  combining both applies the field twice.

i-PI sends neither time nor step: for a time-dependent field the driver
counts structures.  An MD step is ``--beads`` structures (t = step x
``--timestep``), from ``--first-step`` (default 0: i-PI's first force call
is the initial configuration); i-PI's padding of a short batch (copies of
its last structure) is not counted, and beads that start collapsed on the
initial configuration all belong to the first step.  i-PI never mixes two
steps in one exchange, so a count that would (``--beads`` smaller than
i-PI's beads, or one driver serving several simulations) stops the driver
with an error when the field depends on time.  Run one driver per i-PI
simulation then, with ``--beads`` set to the number of beads.

Log (``--log``): one row per structure i-PI sent: exchange, structure,
computed (0: a copy of an earlier structure of the exchange), step, time
(fs), field (V/A, i-PI's frame), energy (eV), dipole (e*A), the largest
extrapolation grade and the number of atoms above 1 (NaN and -1 for a
head without extrapolation statistics), wall clock (s), the server's time
for the request (queue + compute, ms) and the structures of the engine
pass it was computed in.

Exit status: 0 when i-PI sends EXIT or closes the connection, 1 on an error
(a structure the server refuses, a first structure that does not match the
template, a server that stays unreachable after the retries), 2 on bad
options.  A server restart is ridden out by the client's retries
(``--retries``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..contract import BOHR, HARTREE
from .fields import FieldSchedule
from .ipi_socket import Evaluation
from .monitor import ExtrapolationMonitor, printer
from .steplog import StepLog

#: the extras i-PI may ask for (``--outputs``): dipole e*Bohr, BEC e, polarization e/Bohr^2,
#: polarizability e^2*Bohr^2/Hartree
EXTRAS = ("dipole", "BEC", "polarization", "polarizability")

#: how far (Angstrom) i-PI's first structure may lie from the template's (modulo lattice vectors)
TEMPLATE_TOLERANCE = 1e-3


class DriverInputError(ValueError):
    """i-PI sent structures that do not fit the template or the options (atoms, cell, periodicity, beads)."""


@dataclass
class Template:
    """What i-PI does not send: species, and the cell and periodicity the structures were made with.

    Attributes:
        numbers: (N,) atomic numbers in i-PI's atom order.
        positions: (N, 3) Angstrom.
        cell: (3, 3) lattice vectors as rows, Angstrom; None: the file has no cell.
        pbc: (3,) periodic along each lattice vector.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None
    pbc: np.ndarray

    @classmethod
    def from_atoms(cls, atoms) -> Template:
        cell = np.asarray(atoms.cell, dtype=float)
        return cls(numbers=np.asarray(atoms.numbers, dtype=np.int64), positions=np.asarray(atoms.positions, float),
                   cell=cell if np.any(cell) else None, pbc=np.asarray(atoms.pbc, dtype=bool).copy())

    @classmethod
    def read(cls, path: str) -> Template:
        """The first frame of any file ASE reads."""
        try:
            import ase.io
        except ImportError:
            raise ImportError("macefield-ipi needs ASE to read --template: "
                              "pip install 'macefield-client[ase]'") from None
        return cls.from_atoms(ase.io.read(path, index=0))


def lattice_frame(cell: np.ndarray) -> np.ndarray | None:
    """The rotation Q (rows: unit vectors) with Q a along +x and Q b in the xy plane (+y); None if a, b are degenerate.

    It is the rotation i-PI applies to periodic cells read with ``mode='ase'`` (a along x, b in xy).
    """
    a, b = np.asarray(cell[0], float), np.asarray(cell[1], float)
    la = np.linalg.norm(a)
    if la == 0.0:
        return None
    e1 = a / la
    b_perp = b - (b @ e1) * e1
    lb = np.linalg.norm(b_perp)
    if lb <= 1e-9 * max(la, np.linalg.norm(b)):
        return None
    e2 = b_perp / lb
    return np.array([e1, e2, np.cross(e1, e2)])


def frame_rotation(template_cell: np.ndarray, engine_cell: np.ndarray) -> np.ndarray:
    """The proper rotation R taking template-frame vectors into the engine's frame (x_engine = R x_template).

    It maps the template's a onto the engine's a and the template's ab plane onto the engine's: the
    identity for the same cell, i-PI's standard rotation for i-PI's upright h, and still a rotation
    after the cell changed shape (a restart of a variable-cell run).
    """
    q_template, q_engine = lattice_frame(template_cell), lattice_frame(engine_cell)
    if q_template is None or q_engine is None:
        return np.eye(3)
    return q_engine.T @ q_template


def _trailing_copies(keys: Sequence[bytes]) -> int:
    """How many structures at the end of a batch repeat the one before them (i-PI's padding)."""
    n = 0
    while n + 1 < len(keys) and keys[-2 - n] == keys[-1]:
        n += 1
    return n


class StepClock:
    """The MD step of each exchange, from what i-PI sends (it sends neither time nor step).

    A step is ``beads`` structures.  Padding (copies of the last structure that i-PI adds to a short
    batch) is not counted.  Beads that start collapsed on the initial configuration are copies of each
    other too: while every structure is that first one, the step stays ``first_step``.  i-PI computes
    every structure of a step before the next step exists, so an exchange never holds two steps: a
    count that would put it across a step boundary means ``beads`` is wrong (:attr:`consistent` False).
    """

    def __init__(self, beads: int = 1, first_step: int = 0):
        if beads < 1:
            raise ValueError(f"beads: must be >= 1, got {beads}")
        self.beads = beads
        self.first_step = first_step
        self.step = first_step
        self.counted = 0  #: structures counted in the current step
        self.consistent = True  #: False once an exchange crossed a step boundary
        self._start_key: bytes | None = None  # the first structure, while every one repeats it
        self._exchanges = 0

    def advance(self, keys: Sequence[bytes]) -> int:
        """The step of an exchange whose structures have the identities ``keys`` (equal bytes: equal structure)."""
        first = self._exchanges == 0
        self._exchanges += 1
        if first and len(keys) > 1 and all(k == keys[0] for k in keys):
            self._start_key = keys[0]  # collapsed beads, or one structure and its padding
        if self._start_key is not None:
            if all(k == self._start_key for k in keys):
                return self.step
            self._start_key = None  # the first new geometry: the next step has begun
            self.step, self.counted = self.first_step + 1, 0
        if self.counted >= self.beads:
            self.step, self.counted = self.step + 1, 0
        real = len(keys) - _trailing_copies(keys)
        if self.counted + real > self.beads:
            self.consistent = False
        self.counted += real
        return self.step


class IPIDriver:
    """Turns i-PI's structures (atomic units) into server requests and the answers into i-PI's units.

    Args:
        client: a :class:`~macefield_client.Client`.
        template: the species, cell and periodicity (:class:`Template`; i-PI's atom order).
        pbc: (3,) periodicity that overrides the template's (all False: a molecule); None: the template's,
            and for a template without a cell, decided at the first structure (i-PI sending a cell is then
            an error).
        extras: names from :data:`EXTRAS`.
        model, head: served model and head (None: the server's defaults).
        field: applied inside F(R, E) (None: zero field), in the template's frame.
        timestep_fs: MD timestep (a time-dependent ``field`` needs it).
        beads: structures per MD step (the field's clock, see :class:`StepClock`).
        first_step: MD step of the first exchange; 0 also checks i-PI's first structure against the template.
        log: path of a per-structure log (see the module doc), or None.
    """

    def __init__(self, client, template: Template, *, pbc: Sequence[bool] | None = None,
                 extras: Sequence[str] = ("dipole",), model: str | None = None, head: str | None = None,
                 field: FieldSchedule | None = None, timestep_fs: float | None = None, beads: int = 1,
                 first_step: int = 0, log=None):
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"extras: unknown {unknown} (known: {list(EXTRAS)})")
        self.template = template
        self.pbc = None if pbc is None else np.asarray(pbc, dtype=bool).reshape(3)
        if self.pbc is None and template.cell is not None:
            self.pbc = template.pbc.copy()
        # a template without a cell is periodic only when told (--pbc): else a molecule, or an error
        if "polarization" in extras and (self.pbc is None or not self.pbc.all()):
            raise ValueError("extras: polarization needs a cell periodic in all three directions (the template's "
                             "pbc, or --pbc)")
        if field is not None and not field.static and not (timestep_fs and timestep_fs > 0):
            raise ValueError("a time-dependent field needs the MD timestep (--timestep, fs)")
        self.clock = StepClock(beads, first_step)
        self.client = client
        self.numbers = np.asarray(template.numbers, dtype=np.int64)
        self.extras = tuple(e for e in EXTRAS if e in extras)
        self.model, self.head = model, head
        self.field = field
        self.rotation = np.eye(3)  #: template frame -> i-PI's frame, found at the first structure
        self.timestep_fs = timestep_fs or 0.0
        self.first_step = first_step
        outputs = ["energy", "forces"]
        if self.pbc is None or self.pbc.all():
            outputs.append("stress")
        if "dipole" in self.extras or log is not None:
            outputs.append("dipole")
        for extra, output in (("polarization", "polarization"), ("BEC", "born_charges"),
                              ("polarizability", "polarizability")):
            if extra in self.extras:
                outputs.append(output)
        self.outputs = outputs
        self.session = client.session(model=model, head=head, outputs=outputs)
        self.exchanges = 0  #: POSDATA messages answered
        self.structures = 0  #: structures i-PI sent (padding included)
        self.computed = 0  #: structures sent to the server (duplicates removed)
        #: the extrapolation watch: the model's threshold, one line on stderr at the first structure above it
        self.monitor = ExtrapolationMonitor(client, tell=printer("macefield-ipi"))
        self._max_per_request: int | None = None
        self._t0 = time.monotonic()
        self._log = None
        if log is not None:
            self._log = StepLog(log, [("exchange", ""), ("structure", ""), ("computed", ""), ("step", ""),
                                      ("time", "fs"), ("Ex", "V/A"), ("Ey", "V/A"), ("Ez", "V/A"), ("energy", "eV"),
                                      ("dipole_x", "e*A"), ("dipole_y", "e*A"), ("dipole_z", "e*A"),
                                      ("extrapolation_max", ""), ("extrapolating_atoms", ""), ("wall", "s"),
                                      ("server", "ms"), ("batch", "")],
                                title="macefield-ipi: one row per structure i-PI sent (vectors in i-PI's frame)")

    @property
    def steps(self) -> int:
        """MD steps seen so far."""
        return self.clock.step - self.first_step + 1 if self.exchanges else 0

    # -------------------------------------------------------------- field
    def field_at(self, step: int) -> np.ndarray:
        """The field (V/A, i-PI's frame) applied inside the model at MD step ``step``."""
        if self.field is None:
            return np.zeros(3)
        return self.rotation @ self.field.at(step * self.timestep_fs)

    # ------------------------------------------------------------ checks
    def _first_structure(self, h: np.ndarray, positions: np.ndarray) -> None:
        """Periodicity, frame and (with first_step 0) identity of i-PI's first structure against the template."""
        t = self.template
        cell = h.T * BOHR  # i-PI's h holds the lattice vectors as columns
        has_cell = bool(np.any(cell))
        if self.pbc is None:  # a template without a cell, no --pbc (__init__ gives a template's cell its pbc)
            if has_cell:
                a, b, c = np.linalg.norm(cell, axis=1)
                raise DriverInputError(
                    f"the template has no cell, but i-PI sends one (|a|, |b|, |c| = {a:.4f}, {b:.4f}, {c:.4f} A; "
                    "i-PI's own xyz format reads in ASE without its CELL line): give --pbc to compute a crystal "
                    "in i-PI's cell (--pbc TTF for a slab) or --molecule for a molecule in a box")
            self.pbc = np.zeros(3, dtype=bool)
        if t.cell is not None:
            if has_cell:
                self.rotation = frame_rotation(t.cell, cell)
                if not np.allclose(self.rotation, np.eye(3), rtol=0.0, atol=1e-12):
                    rows = np.round(self.rotation, 6).tolist()
                    print("macefield-ipi: i-PI holds the crystal rotated from the template's frame (a along x, b in "
                          f"the xy plane): --field is turned with it (rows of the rotation: {rows}); dipole, P, Z* and "
                          "the log are in i-PI's frame", file=sys.stderr, flush=True)
            elif self.pbc.any():
                raise DriverInputError("i-PI sends no cell, but the structure is periodic (the template's cell and "
                                       "pbc, or --pbc): give i-PI the cell")
        if self.pbc.any() and not has_cell:
            raise DriverInputError("--pbc: i-PI sends no cell to be periodic in")
        if "polarization" in self.extras and not self.pbc.all():
            raise DriverInputError("--outputs polarization needs a cell periodic in all three directions")
        if self.first_step != 0:
            return  # a restart: the structure has moved since the template
        expected = t.positions @ self.rotation.T
        if t.cell is not None and has_cell:
            mismatch = np.abs(cell - t.cell @ self.rotation.T).max()
            if mismatch > TEMPLATE_TOLERANCE:
                raise DriverInputError(
                    f"i-PI's cell differs from the template's by {mismatch:.3g} A (after i-PI's rotation): use i-PI's "
                    "initial configuration as --template (or --first-step N when i-PI restarts from a checkpoint)")
        delta = positions * BOHR - expected
        if has_cell:  # i-PI may wrap positions (<ffsocket pbc='true'>): compare modulo lattice vectors
            fractional = delta @ np.linalg.inv(cell)
            delta = (fractional - np.round(fractional)) @ cell
        distance = np.linalg.norm(delta, axis=1)
        worst = int(np.argmax(distance))
        if distance[worst] > TEMPLATE_TOLERANCE:
            raise DriverInputError(
                f"i-PI's first structure is not the template: atom {worst} lies {distance[worst]:.3g} A from the "
                f"template's ({int((distance > TEMPLATE_TOLERANCE).sum())} atoms differ): use i-PI's initial "
                "configuration, in i-PI's atom order, as --template (or --first-step N when i-PI restarts from a "
                "checkpoint)")

    # ------------------------------------------------------------ compute
    def _structure(self, h: np.ndarray, positions: np.ndarray) -> dict:
        if self.pbc is None:
            raise RuntimeError("i-PI driver: a structure before the first one's checks (_first_structure)")
        structure: dict[str, np.ndarray] = {"numbers": self.numbers, "positions": positions * BOHR}
        if self.pbc.any():
            structure["cell"] = h.T * BOHR  # i-PI's h holds the lattice vectors as columns
            structure["pbc"] = self.pbc
        return structure

    def _evaluation(self, r, structure: dict) -> Evaluation:
        n = len(self.numbers)
        virial = np.zeros((3, 3))
        if r.stress is not None:  # W = -stress * volume, Hartree
            virial = -r.stress * abs(np.linalg.det(structure["cell"])) / HARTREE
        extras = {}
        if "dipole" in self.extras:
            extras["dipole"] = (r.dipole / BOHR).tolist()
        if "BEC" in self.extras:
            extras["BEC"] = r.born_charges.transpose(0, 2, 1).reshape(3 * n, 3).tolist()
        if "polarization" in self.extras:
            extras["polarization"] = (r.polarization * BOHR**2).tolist()
        if "polarizability" in self.extras:
            extras["polarizability"] = (r.polarizability * HARTREE / BOHR**2).tolist()
        return Evaluation(energy=float(r.energy) / HARTREE, forces=r.forces * (BOHR / HARTREE), virial=virial,
                          extras=json.dumps(extras) if extras else "")

    def _predict(self, structures: list[dict], field: np.ndarray):
        if len(structures) == 1:
            return [self.session.predict(structures[0], electric_field=field)]
        if self._max_per_request is None:
            self._max_per_request = self.client.list_models().max_structures_per_request or len(structures)
        # one PredictBatch (one engine pass) when the server allows that many structures per request
        return self.client.predict_many(structures, electric_field=field, outputs=self.outputs, model=self.model,
                                        head=self.head, batch_size=min(len(structures), self._max_per_request),
                                        in_flight=2)

    def compute(self, cells: np.ndarray, positions: np.ndarray) -> list[Evaluation]:
        """Evaluate i-PI's structures: cells (B, 3, 3) h in Bohr, positions (B, N, 3) in Bohr."""
        batch = len(positions)
        if positions.shape[1] != len(self.numbers):
            raise DriverInputError(f"i-PI sent {positions.shape[1]} atoms, the template has {len(self.numbers)}: "
                                   "use i-PI's initial configuration as --template")
        if self.exchanges == 0:
            self._first_structure(cells[0], positions[0])
        keys = [cells[b].tobytes() + positions[b].tobytes() for b in range(batch)]
        step = self.clock.advance(keys)
        if not self.clock.consistent and self.field is not None and not self.field.static:
            raise DriverInputError(
                f"step {step}: i-PI sent more structures than --beads {self.clock.beads} before the step could end "
                "(an exchange never holds two steps): set --beads to i-PI's number of beads, one driver per "
                "simulation, or the time-dependent field would be applied at the wrong times")
        field = self.field_at(step)
        unique = list(dict.fromkeys(keys))  # first occurrences, in order
        structures = [self._structure(cells[keys.index(k)], positions[keys.index(k)]) for k in unique]
        results = self._predict(structures, field)
        by_key = dict(zip(unique, zip(results, structures)))
        for r in results:
            self._note_extrapolation(r, step)
        answers = []
        wall = time.monotonic() - self._t0
        for b, key in enumerate(keys):
            r, structure = by_key[key]
            answers.append(self._evaluation(r, structure))
            if self._log is not None:
                grade, above = self.monitor.grade(r)
                self._log.write([self.exchanges, b, int(keys.index(key) == b), step, step * self.timestep_fs, *field,
                                 float(r.energy), *r.dipole, grade, above, wall, r.timing.get("total_ms", math.nan),
                                 int(r.timing.get("batch_structures", 0))])
        self.exchanges += 1
        self.structures += batch
        self.computed += len(unique)
        return answers

    def _note_extrapolation(self, r, step: int) -> None:
        self.monitor.check(r, step=step)

    @property
    def extrapolating(self) -> int:
        """Computed structures with an atom's extrapolation grade above the model's threshold."""
        return self.monitor.flagged

    def close(self) -> None:
        self.session.close()
        if self._log is not None:
            self._log.close()


__all__ = [
    "BOHR",
    "EXTRAS",
    "HARTREE",
    "TEMPLATE_TOLERANCE",
    "DriverInputError",
    "IPIDriver",
    "StepClock",
    "Template",
    "frame_rotation",
    "lattice_frame",
]
