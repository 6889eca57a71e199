"""``macefield-ipi``: an i-PI driver that forwards every structure to a MACE-Field server (no torch).

    i-pi input.xml &
    macefield-ipi --unix macefield --template init.xyz --server 127.0.0.1:50051 [--bec] [--field EX EY EZ]

The driver connects to a running i-PI (``--unix NAME`` is the socket
``/tmp/ipi_NAME`` of ``<ffsocket mode='unix'><address>NAME</address>``;
``--host H --port P`` for ``mode='inet'``), receives positions and cells in
atomic units, and returns energy (Hartree), forces (Hartree/Bohr), virial
(Hartree, -stress x volume for periodic cells, zero otherwise) and a JSON
extras string.  Structures go to the server over one PredictStream session;
with i-PI's batched protocol (``<batch_size>B</batch_size>``) the B
structures of an exchange (ring-polymer beads, replicas) go as one
PredictBatch, so the server computes them in one engine pass.  Identical
structures of a batch (i-PI's padding, beads that start collapsed) are
computed once.

i-PI sends no species: they come from ``--template`` (any file ASE reads,
first frame; use i-PI's own initial configuration).  Periodicity too: a
template with a cell (extended XYZ ``Lattice``) is periodic, a plain XYZ is
a molecule (no virial, no polarization).

Extras (``--outputs``; i-PI reads them from ``forces.extras``):

=================== ============ =================================================================
``dipole``          (3,)         -dF/dE, e*Bohr (i-PI's unit for it); default
``BEC``             (3N, 3)      Born charges for ``<bec mode='driver'>``, e: row 3k+j is
                                 coordinate j of atom k, column i the dipole direction
                                 (Z*[k, i, j] = d dipole_i / d R_kj transposed to i-PI's layout)
``polarization``    (3,)         dipole / volume, e/Bohr^2 (periodic only; modulo e*a_k/volume)
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
  such as spectroscopy probes.
* ``--field EX EY EZ`` (V/A), optionally ``--field-frequency`` (THz),
  ``--field-phase`` (rad), ``--field-peak`` / ``--field-sigma`` (fs,
  Gaussian envelope): the model evaluates F(R, E) at the field, the full
  non-linear response (field-induced structural changes, switching), which
  the linear coupling cannot give.  Use plain ``dynamics`` in i-PI then;
  combining both applies the field twice.

i-PI sends neither time nor step: for a time-dependent field the driver
counts exchanges.  Step n (t = n x ``--timestep``) is exchange
``n x ceil(beads / batch_size)``, from ``--first-step`` (default 0: i-PI's
first force call is the initial configuration); run one driver per i-PI
simulation then, with ``--beads`` set to the number of beads.

Exit status: 0 when i-PI sends EXIT or closes the connection, 1 on an error
(a structure the server refuses, an atom count that does not match the
template, a server that stays unreachable after the retries), 2 on bad
options.  A server restart is ridden out by the client's retries
(``--retries``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from . import __version__
from ._steplog import StepLog
from .cli import InputError, _client, _common
from .errors import MACEFieldError
from .fields import FieldSchedule
from .ipi_socket import SOCKETS_PREFIX, DriverConnection, Evaluation, IPIProtocolError, connect

#: Bohr radius in Angstrom and Hartree in eV: CODATA 2014, the values of ase.units
#: (i-PI's "ase" output units use these, so recorded trajectories match exactly)
BOHR = 0.5291772105638411
HARTREE = 27.211386024367243

EXTRAS = ("dipole", "BEC", "polarization", "polarizability")
#: unit of every extra sent to i-PI
EXTRA_UNITS = {"dipole": "e*Bohr", "BEC": "e", "polarization": "e/Bohr^2", "polarizability": "e^2*Bohr^2/Hartree"}


class DriverInputError(ValueError):
    """i-PI sent structures that do not fit the template (atom count)."""


class IPIDriver:
    """Turns i-PI's structures (atomic units) into server requests and the answers into i-PI's units.

    Args:
        client: a :class:`~macefield_client.Client`.
        numbers: (N,) atomic numbers (i-PI's atom order).
        pbc: periodic (True: the cell i-PI sends is used; False: a molecule).
        extras: names from :data:`EXTRAS`.
        model, head: served model and head (None: the server's defaults).
        field: applied inside F(R, E) (None: zero field).
        timestep_fs: MD timestep (a time-dependent ``field`` needs it).
        beads: structures per MD step (the field's clock, see the module doc).
        first_step: MD step of the first exchange.
        log: path of a per-structure log (step, time, field, energy, dipole, wall clock, the server's
            time for the request: queue + compute, ms), or None.
    """

    def __init__(self, client, numbers: Sequence[int], *, pbc: bool = True, extras: Sequence[str] = ("dipole",),
                 model: Optional[str] = None, head: Optional[str] = None, field: Optional[FieldSchedule] = None,
                 timestep_fs: Optional[float] = None, beads: int = 1, first_step: int = 0, log=None):
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"extras: unknown {unknown} (known: {list(EXTRAS)})")
        if "polarization" in extras and not pbc:
            raise ValueError("extras: polarization needs a periodic template (a cell)")
        if field is not None and not field.static and not (timestep_fs and timestep_fs > 0):
            raise ValueError("a time-dependent field needs the MD timestep (--timestep, fs)")
        if beads < 1:
            raise ValueError(f"beads: must be >= 1, got {beads}")
        self.client = client
        self.numbers = np.asarray(numbers, dtype=np.int64)
        self.pbc = bool(pbc)
        self.extras = tuple(e for e in EXTRAS if e in extras)
        self.model, self.head = model, head
        self.field = field
        self.timestep_fs = timestep_fs or 0.0
        self.beads = beads
        self.first_step = first_step
        outputs = ["energy", "forces"] + (["stress"] if self.pbc else [])
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
        self._t0 = time.monotonic()
        self._log = None
        if log is not None:
            self._log = StepLog(log, [("exchange", ""), ("structure", ""), ("step", ""), ("time", "fs"),
                                      ("Ex", "V/A"), ("Ey", "V/A"), ("Ez", "V/A"), ("energy", "eV"),
                                      ("dipole_x", "e*A"), ("dipole_y", "e*A"), ("dipole_z", "e*A"), ("wall", "s"),
                                      ("server", "ms")],
                                title="macefield-ipi: one row per structure i-PI sent")

    # -------------------------------------------------------------- field
    def step_of(self, exchange: int, batch: int) -> int:
        """MD step of exchange number ``exchange`` (0-based) when i-PI sends ``batch`` structures per exchange."""
        return self.first_step + exchange // math.ceil(self.beads / batch)

    def field_at(self, step: int) -> np.ndarray:
        """The field (V/A) applied inside the model at MD step ``step``."""
        if self.field is None:
            return np.zeros(3)
        return self.field.at(step * self.timestep_fs)

    # ------------------------------------------------------------ compute
    def _structure(self, h: np.ndarray, positions: np.ndarray) -> dict:
        if len(positions) != len(self.numbers):
            raise DriverInputError(f"i-PI sent {len(positions)} atoms, the template has {len(self.numbers)}: "
                                   "use i-PI's initial configuration as --template")
        structure = {"numbers": self.numbers, "positions": positions * BOHR}
        if self.pbc:
            structure["cell"] = h.T * BOHR  # i-PI's h holds the lattice vectors as columns
            structure["pbc"] = True
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

    def compute(self, cells: np.ndarray, positions: np.ndarray) -> List[Evaluation]:
        """Evaluate i-PI's structures: cells (B, 3, 3) h in Bohr, positions (B, N, 3) in Bohr."""
        batch = len(positions)
        step = self.step_of(self.exchanges, batch)
        field = self.field_at(step)
        keys = [cells[b].tobytes() + positions[b].tobytes() for b in range(batch)]
        unique = list(dict.fromkeys(keys))  # first occurrences, in order
        structures = [self._structure(cells[keys.index(k)], positions[keys.index(k)]) for k in unique]
        if len(structures) == 1:
            results = [self.session.predict(structures[0], electric_field=field)]
        else:
            results = self.client.predict_many(structures, electric_field=field, outputs=self.outputs,
                                               model=self.model, head=self.head, batch_size=len(structures),
                                               in_flight=1)
        by_key = dict(zip(unique, zip(results, structures)))
        answers = []
        wall = time.monotonic() - self._t0
        for b, key in enumerate(keys):
            r, structure = by_key[key]
            answers.append(self._evaluation(r, structure))
            if self._log is not None:
                self._log.write([self.exchanges, b, step, step * self.timestep_fs, *field, float(r.energy),
                                 *r.dipole, wall, r.timing.get("total_ms", math.nan)])
        self.exchanges += 1
        self.structures += batch
        self.computed += len(unique)
        return answers

    def close(self) -> None:
        self.session.close()
        if self._log is not None:
            self._log.close()


# ------------------------------------------------------------------ CLI
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="macefield-ipi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"macefield-client {__version__}")
    where = p.add_argument_group("i-PI connection")
    where.add_argument("--unix", metavar="NAME", help="unix socket NAME of i-PI (the file <prefix>NAME)")
    where.add_argument("--sockets-prefix", default=SOCKETS_PREFIX, help=f"prefix of unix sockets (default {SOCKETS_PREFIX})")
    where.add_argument("--host", help="host of i-PI's inet socket (with --port)")
    where.add_argument("--port", type=int, help="port of i-PI's inet socket")
    where.add_argument("--connect-wait", type=float, default=60.0, metavar="S",
                       help="keep trying to reach i-PI for S seconds (default 60)")
    p.add_argument("--template", required=True,
                   help="structure file with the species (and cell, if periodic) in i-PI's atom order")
    server = p.add_argument_group("MACE-Field server")
    _common(server)
    server.add_argument("--model", help="served model (default: the server's default)")
    server.add_argument("--head", help="model head (default: the model's default head)")
    out = p.add_argument_group("extras returned to i-PI")
    out.add_argument("--outputs", nargs="*", choices=list(EXTRAS), default=None,
                     help="extras to compute: dipole (e*Bohr), BEC (e), polarization (e/Bohr^2), "
                          "polarizability (e^2*Bohr^2/Hartree); default: dipole (none: no extras)")
    out.add_argument("--bec", action="store_true", help="add BEC (Born charges for <bec mode='driver'>)")
    fld = p.add_argument_group("field applied inside the model, F(R, E)")
    fld.add_argument("--field", type=float, nargs=3, metavar=("EX", "EY", "EZ"),
                     help="field amplitude, V/A (static unless a frequency or envelope is given)")
    fld.add_argument("--field-frequency", type=float, default=0.0, metavar="THZ",
                     help="E(t) = amplitude cos(2 pi f t + phase): f in THz (default 0)")
    fld.add_argument("--field-phase", type=float, default=0.0, metavar="RAD", help="phase, rad (default 0)")
    fld.add_argument("--field-peak", type=float, default=0.0, metavar="FS", help="centre of a Gaussian envelope, fs")
    fld.add_argument("--field-sigma", type=float, default=None, metavar="FS", help="width of the envelope, fs (default: none)")
    fld.add_argument("--timestep", type=float, metavar="FS", help="i-PI's timestep, fs (time-dependent fields)")
    fld.add_argument("--beads", type=int, default=1, help="structures per MD step sent to this driver (default 1)")
    fld.add_argument("--first-step", type=int, default=0, help="MD step of the first force call (default 0)")
    p.add_argument("--log", help="write one row per structure: step, time, field, energy, dipole")
    args = p.parse_args(argv)
    if (args.unix is None) == (args.host is None):
        p.error("give i-PI's address: --unix NAME, or --host H --port P")
    if args.host is not None and args.port is None:
        p.error("--host needs --port")
    return args


def _read_template(path: str):
    try:
        import ase.io
    except ImportError:
        raise SystemExit("macefield-ipi needs ASE to read --template: pip install 'macefield-client[ase]'") from None
    atoms = ase.io.read(path, index=0)
    return atoms.get_atomic_numbers(), bool(atoms.get_pbc().all())


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    extras = ["dipole"] if args.outputs is None else list(args.outputs)
    if args.bec and "BEC" not in extras:
        extras.append("BEC")
    field = None
    try:
        numbers, pbc = _read_template(args.template)
        if args.field is not None:
            field = FieldSchedule(args.field, frequency_thz=args.field_frequency, phase=args.field_phase,
                                  peak_fs=args.field_peak, sigma_fs=args.field_sigma)
        client = _client(args)
        driver = IPIDriver(client, numbers, pbc=pbc, extras=extras, model=args.model, head=args.head, field=field,
                           timestep_fs=args.timestep, beads=args.beads, first_step=args.first_step, log=args.log)
    except (OSError, ValueError, InputError) as exc:
        print(f"macefield-ipi: {exc}", file=sys.stderr)
        return 2
    connection = None
    try:
        connection = DriverConnection(connect(unix=args.unix, host=args.host, port=args.port,
                                              sockets_prefix=args.sockets_prefix, wait_s=args.connect_wait))
        how = connection.serve(driver.compute)
        said = "sent EXIT" if how == "exit" else "closed the connection"
        print(f"macefield-ipi: i-PI {said} after {driver.exchanges} exchanges ({driver.structures} structures, "
              f"{driver.computed} computed; {driver.session.reconnects} stream reconnects)", file=sys.stderr)
        return 0
    except (MACEFieldError, DriverInputError, IPIProtocolError, ConnectionError) as exc:
        print(f"macefield-ipi: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if connection is not None:
            connection.close()
        driver.close()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
