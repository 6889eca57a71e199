"""``macefield-ipi``: the command line of the i-PI driver (:mod:`macefield_client.md.ipi`, whose doc it prints).

Exit status: 0 when i-PI sends EXIT or closes the connection, 1 on an error, 2 on bad options, 130 when
interrupted (see :mod:`macefield_client.md.ipi`).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..core.errors import MACEFieldError
from ..md import ipi as driver_doc
from ..md.fields import FieldSchedule
from ..md.ipi import EXTRAS, DriverInputError, IPIDriver, Template
from ..md.ipi_socket import SOCKETS_PREFIX, DriverConnection, IPIProtocolError, connect
from .common import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    add_server_options,
    client_from_args,
)


def _pbc_flags(text: str) -> list[bool]:
    flags = {"t": True, "1": True, "f": False, "0": False}
    if len(text) != 3 or any(c not in flags for c in text.lower()):
        raise argparse.ArgumentTypeError(f"expected three of T/F (e.g. TTT, TTF), got {text!r}")
    return [flags[c] for c in text.lower()]


FIELD_SHAPE_OPTIONS = ("field_frequency", "field_phase", "field_peak", "field_sigma")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="macefield-ipi", description=driver_doc.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"macefield-client {__version__}")
    where = p.add_argument_group("i-PI connection")
    where.add_argument("--unix", metavar="NAME", help="unix socket NAME of i-PI (the file <prefix>NAME)")
    where.add_argument("--sockets-prefix", default=SOCKETS_PREFIX,
                       help=f"prefix of unix sockets (default {SOCKETS_PREFIX})")
    where.add_argument("--host", help="host of i-PI's inet socket (with --port)")
    where.add_argument("--port", type=int, help="port of i-PI's inet socket")
    where.add_argument("--connect-wait", type=float, default=60.0, metavar="S",
                       help="keep trying to reach i-PI for S seconds (default 60)")
    structure = p.add_argument_group("structure")
    structure.add_argument("--template", required=True,
                           help="i-PI's initial configuration (any file ASE reads): species in i-PI's atom order, "
                                "cell and per-axis periodicity")
    periodic = structure.add_mutually_exclusive_group()
    periodic.add_argument("--pbc", nargs="?", const=[True, True, True], type=_pbc_flags, metavar="TTT",
                          help="periodic in the cell i-PI sends, along the axes given (default TTT; TTF: a slab); "
                               "needed when the template has no cell (i-PI's own xyz format)")
    periodic.add_argument("--molecule", action="store_true", help="not periodic, whatever cell i-PI sends")
    server = p.add_argument_group("MACE-Field server")
    add_server_options(server)
    server.add_argument("--model", help="served model (default: the server's default)")
    server.add_argument("--head", help="model head (default: the model's default head)")
    out = p.add_argument_group("extras returned to i-PI")
    out.add_argument("--outputs", nargs="*", choices=list(EXTRAS), default=None,
                     help="extras to compute: dipole (e*Bohr), BEC (e), polarization (e/Bohr^2), "
                          "polarizability (e^2*Bohr^2/Hartree); default: dipole (none: no extras)")
    out.add_argument("--bec", action="store_true", help="add BEC (Born charges for <bec mode='driver'>)")
    fld = p.add_argument_group("field applied inside the model, F(R, E), in the template's frame")
    fld.add_argument("--field", type=float, nargs=3, metavar=("EX", "EY", "EZ"),
                     help="field amplitude, V/A (static unless a frequency or envelope is given)")
    fld.add_argument("--field-frequency", type=float, metavar="THZ",
                     help="E(t) = amplitude cos(2 pi f t + phase): f in THz (default 0)")
    fld.add_argument("--field-phase", type=float, metavar="RAD", help="phase, rad (default 0)")
    fld.add_argument("--field-peak", type=float, metavar="FS", help="centre of a Gaussian envelope, fs (default 0)")
    fld.add_argument("--field-sigma", type=float, metavar="FS", help="width of the envelope, fs (default: none)")
    fld.add_argument("--timestep", type=float, metavar="FS", help="i-PI's timestep, fs (time-dependent fields)")
    fld.add_argument("--beads", type=int, default=1, help="structures per MD step sent to this driver (default 1)")
    fld.add_argument("--first-step", type=int, default=0,
                     help="MD step of the first force call (default 0; set it when i-PI restarts)")
    p.add_argument("--log", help="write one row per structure: step, time, field, energy, dipole, extrapolation")
    args = p.parse_args(argv)
    if (args.unix is None) == (args.host is None):
        p.error("give i-PI's address: --unix NAME, or --host H --port P")
    if args.host is not None and args.port is None:
        p.error("--host needs --port")
    shape = [f"--{name.replace('_', '-')}" for name in FIELD_SHAPE_OPTIONS if getattr(args, name) is not None]
    if shape and args.field is None:
        p.error(f"{', '.join(shape)} shape(s) the field of --field EX EY EZ, which is not given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extras = ["dipole"] if args.outputs is None else list(args.outputs)
    if args.bec and "BEC" not in extras:
        extras.append("BEC")
    pbc = [False, False, False] if args.molecule else args.pbc
    field = None
    client = None
    try:
        template = Template.read(args.template)
        if args.field is not None:
            field = FieldSchedule(args.field, frequency_thz=args.field_frequency or 0.0,
                                  phase=args.field_phase or 0.0, peak_fs=args.field_peak or 0.0,
                                  sigma_fs=args.field_sigma)
        client = client_from_args(args)
        driver = IPIDriver(client, template, pbc=pbc, extras=extras, model=args.model, head=args.head, field=field,
                           timestep_fs=args.timestep, beads=args.beads, first_step=args.first_step, log=args.log)
    except (OSError, ValueError, ImportError, InputError) as exc:
        print(f"macefield-ipi: {exc}", file=sys.stderr)
        if client is not None:
            client.close()
        return EXIT_INPUT
    connection = None
    try:
        connection = DriverConnection(connect(unix=args.unix, host=args.host, port=args.port,
                                              sockets_prefix=args.sockets_prefix, wait_s=args.connect_wait))
        how = connection.serve(driver.compute)
        said = "sent EXIT" if how == "exit" else "closed the connection"
        print(f"macefield-ipi: i-PI {said} after {driver.steps} MD steps: {driver.exchanges} exchanges "
              f"({driver.structures} structures, {driver.computed} computed, {driver.extrapolating} extrapolating; "
              f"{driver.session.reconnects} stream reconnects)", file=sys.stderr)
        return EXIT_OK
    except (MACEFieldError, DriverInputError, IPIProtocolError, ConnectionError) as exc:
        print(f"macefield-ipi: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if connection is not None:
            connection.close()
        driver.close()
        client.close()


__all__ = ["main", "parse_args"]


if __name__ == "__main__":
    sys.exit(main())
