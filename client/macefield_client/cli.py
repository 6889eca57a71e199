"""``macefield``: the command line of the MACE-Field client.

    macefield info [--server HOST:PORT] [--json]
    macefield predict IN.xyz --field EX EY EZ [--head H] [--outputs ...] -o OUT.xyz [--server HOST:PORT]

``predict`` writes extended XYZ like the reference ``mace_eval_configs``
(prefix ``MACE_`` by default): info ``MACE_energy`` (eV), ``MACE_stress``
(3x3, eV/A^3, periodic), ``MACE_dipole`` (e*A), ``MACE_polarization`` (e/A^2,
periodic), ``MACE_polarizability`` (9, chi, dimensionless, periodic) or
``MACE_molecular_polarizability`` (9, e*A^2/V, not periodic),
``MACE_electric_field`` (V/A, the field used); arrays ``MACE_forces`` (eV/A)
and ``MACE_becs`` (N x 9, e, row-major d dipole_i / d R_kj).

Without ``--field`` each frame's field is ``info["electric_field"]``, else
``info["REF_electric_field"]``, else zero (V/A).  The server is
``--server``, else ``$MACEFIELD_SERVER``, else 127.0.0.1:50051.  TLS:
``--tls-ca CA.pem`` (or ``$MACEFIELD_TLS_CA``; ``--tls`` alone trusts the
system roots), mutual TLS adds ``--tls-cert``/``--tls-key``; a bearer token:
``--token`` or ``$MACEFIELD_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from . import __version__
from ._channel import TLSConfig
from .client import Client
from .errors import MACEFieldError
from .results import OUTPUTS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="server host:port (default $MACEFIELD_SERVER or 127.0.0.1:50051)")
    p.add_argument("--tls", nargs="?", const=True, default=None, metavar="CA.pem",
                   help="use TLS (optionally trusting this CA file; default: the system roots)")
    p.add_argument("--tls-ca", metavar="CA.pem", help="use TLS trusting this CA file (default $MACEFIELD_TLS_CA)")
    p.add_argument("--tls-cert", metavar="CERT.pem", help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="KEY.pem", help="private key of --tls-cert")
    p.add_argument("--token", help="bearer token (default $MACEFIELD_TOKEN)")
    p.add_argument("--timeout", type=float, help="per-call deadline, s (default 120)")
    p.add_argument("--retries", type=int, help="retries of a call answered UNAVAILABLE (default 5, with backoff)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macefield", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"macefield-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="served models, heads, elements, units and limits")
    _common(info)
    info.add_argument("--json", action="store_true", help="print JSON")

    pred = sub.add_parser("predict", help="evaluate every frame of an (ext)xyz file and write the results")
    _common(pred)
    pred.add_argument("input", help="input structures (any format ASE reads; all frames)")
    pred.add_argument("-o", "--output", required=True, help="output extended XYZ")
    pred.add_argument("--field", type=float, nargs=3, metavar=("EX", "EY", "EZ"),
                      help="uniform field for every frame, V/A (default: per-frame info, else zero)")
    pred.add_argument("--model", help="served model (default: the server's default)")
    pred.add_argument("--head", help="model head (default: the model's default head)")
    pred.add_argument("--outputs", nargs="+", choices=list(OUTPUTS) + ["all"], default=["all"],
                      help="outputs to compute (default: all)")
    pred.add_argument("--batch-size", type=int, help="structures per request (default 16)")
    pred.add_argument("--info-prefix", default="MACE_", help="prefix of the written keys (default MACE_)")
    bar = pred.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    return parser.parse_args(argv)


def _tls(args):
    """None (plaintext), True (system roots) or a TLSConfig from --tls / --tls-ca / --tls-cert / --tls-key."""
    ca = args.tls_ca or os.environ.get("MACEFIELD_TLS_CA") or (args.tls if isinstance(args.tls, str) else None)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("macefield: --tls-cert and --tls-key go together")
    if ca is None and not args.tls_cert:
        return args.tls
    return TLSConfig(ca=ca, cert=args.tls_cert, key=args.tls_key)


def _client(args) -> Client:
    return Client(args.server, tls=_tls(args), token=args.token or os.environ.get("MACEFIELD_TOKEN"),
                  timeout=args.timeout, retry=args.retries)


def _symbols(numbers) -> List[str]:
    try:
        from ase.data import chemical_symbols
    except ImportError:
        return [str(z) for z in numbers]
    return [chemical_symbols[z] for z in numbers]


def cmd_info(args) -> int:
    with _client(args) as client:
        info = client.list_models()
    if args.json:
        data = {
            "target": info.target,
            "max_atoms_per_structure": info.max_atoms_per_structure,
            "max_field_magnitude": info.max_field_magnitude,
            "max_structures_per_request": info.max_structures_per_request,
            "models": [{k: v for k, v in vars(m).items() if k != "card_json"} for m in info.models],
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"server {info.target}: {len(info.models)} model(s); limits: {info.max_atoms_per_structure} atoms/structure, "
          f"|E| <= {info.max_field_magnitude} V/A, {info.max_structures_per_request} structures/request")
    for m in info.models:
        flags = [f for f, on in (("default", m.is_default), ("UNTRAINED", not m.trained)) if on]
        print(f"\nmodel {m.name}" + (f" ({', '.join(flags)})" if flags else ""))
        if m.description:
            print(f"  description: {m.description}")
        print(f"  heads:       {', '.join(h + (' (default)' if h == m.default_head else '') for h in m.heads)}")
        print(f"  elements:    {' '.join(_symbols(m.atomic_numbers))}")
        print(f"  cutoff:      {m.cutoff:g} A   dtype: {m.dtype}   device: {m.device}   parameters: {m.num_parameters}")
        print(f"  source:      {m.source}")
        print(f"  outputs:     {', '.join(m.outputs)}")
        print("  units:       " + ", ".join(f"{k} {v}" for k, v in sorted(m.units.items())))
    return 0


def _frame_field(atoms, override) -> np.ndarray:
    if override is not None:
        return np.asarray(override, dtype=float)
    ef = atoms.info.get("electric_field")
    if ef is None:
        ef = atoms.info.get("REF_electric_field")
    return np.zeros(3) if ef is None else np.asarray(ef, dtype=float).reshape(3)


def cmd_predict(args) -> int:
    try:
        import ase.io
    except ImportError:
        print("macefield predict needs ASE: pip install 'macefield-client[ase]'", file=sys.stderr)
        return 2
    frames = ase.io.read(args.input, index=":")
    if not frames:
        print(f"macefield: no structures in {args.input}", file=sys.stderr)
        return 2
    fields = np.array([_frame_field(a, args.field) for a in frames])
    outputs = "all" if "all" in args.outputs else args.outputs
    progress = args.progress if args.progress is not None else (None if len(frames) > 1 else False)
    with _client(args) as client:
        results = client.predict_many(frames, electric_field=fields, outputs=outputs, model=args.model,
                                      head=args.head, batch_size=args.batch_size, progress=progress)
    p = args.info_prefix
    for atoms, field, r in zip(frames, fields, results):
        atoms.calc = None
        atoms.info[p + "energy"] = float(r.energy)
        atoms.info[p + "electric_field"] = field
        if r.forces is not None:
            atoms.arrays[p + "forces"] = r.forces
        if r.stress is not None:
            atoms.info[p + "stress"] = r.stress
        if r.dipole is not None:
            atoms.info[p + "dipole"] = r.dipole
        if r.polarization is not None:
            atoms.info[p + "polarization"] = r.polarization
        if r.born_charges is not None:
            atoms.arrays[p + "becs"] = r.born_charges.reshape(len(atoms), 9)
        if r.chi is not None:
            atoms.info[p + "polarizability"] = r.chi.reshape(9)
        elif r.polarizability is not None:
            atoms.info[p + "molecular_polarizability"] = r.polarizability.reshape(9)
    ase.io.write(args.output, frames, format="extxyz")
    print(f"wrote {len(frames)} structure(s) to {args.output}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return {"info": cmd_info, "predict": cmd_predict}[args.command](args)
    except MACEFieldError as exc:
        print(f"macefield: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
