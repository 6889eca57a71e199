"""``macefield``: the command line of the MACE-Field client.

    macefield info [--wait SECONDS] [--json]
    macefield predict IN.xyz [--field EX EY EZ] [--head H] [--outputs ...] -o OUT.xyz
    macefield eval IN.xyz [-o OUT.xyz] [--json] [--head H] [--polarizability-unit ...]
    macefield phonons STRUCTURE [--relax] [--json OUT] [--plot FILE.png]      (docs/workflows.md)
    macefield hysteresis STRUCTURE [--axis z] [--amplitude V/A] [--period PS] [--json OUT] [--plot FILE.png]
    macefield md STRUCTURE [--replicas N] [--temperature K] [--steps N] [--out RUN.npz] [--extxyz FILE]
    macefield spectrum ir|raman|dielectric TRAJECTORY|STRUCTURE [--temperature K] [--json OUT] [--plot FILE.png]

``predict`` and ``eval`` keep every key of the input frames (reference
energies, forces, stress, ... stay as they were read) and add the model's
results under the prefix ``MACE_`` (``--info-prefix``), as mace-torch's
``mace_eval_configs`` does: info ``MACE_energy`` (eV), ``MACE_stress`` (3x3,
eV/A^3, periodic), ``MACE_dipole`` (e*A), ``MACE_polarization`` (e/A^2,
periodic), ``MACE_polarizability`` (9, chi = alpha/(Omega eps0), the
reference convention, periodic) or ``MACE_molecular_polarizability`` (9,
alpha, e*A^2/V, not periodic), ``MACE_alpha`` (9, alpha, e*A^2/V, always),
``MACE_eps_inf`` (9, 1 + chi, periodic), ``MACE_electric_field`` (V/A, the
field used), ``MACE_extrapolation_max`` (the largest grade); arrays
``MACE_forces`` (eV/A), ``MACE_becs`` (N x 9, e, row-major d dipole_i / d
R_kj) and ``MACE_extrapolation`` (per-atom extrapolation grade,
dimensionless, > 1: extrapolating).  The grade is written when asked for:
``predict --outputs ... extrapolation`` or ``eval --extrapolation`` (which
also reports how many atoms and frames are above the threshold); the model
must have extrapolation statistics for the head (``macefield info`` says).

``predict`` computes energy, forces, stress, dipole and polarization unless
``--outputs`` says otherwise (the same default as the Python client: Z* and
alpha cost about 3x more; ask with ``--outputs all``).  ``eval`` computes
whatever the file has references for and prints a table of errors (energy
per atom, forces, stress, Z*, alpha and eps_inf, P folded by the
polarization quanta); ``--json`` prints it as JSON.  Reference keys are
found by name (``REF_energy``, ``REF_forces``, ``born_charge``, ...; see
``macefield_client.contract.labels.KNOWN_KEYS``) or given with ``--energy-key``
etc.; unit conventions with ``--polarization-unit`` /
``--polarizability-unit`` (default ``auto``: decided from the values when
only one convention is plausible, reported with the reason;
skipping that quantity with one line naming the option, when the values cannot tell).

Without ``--field`` each frame's field is ``info["electric_field"]``, else
``info["REF_electric_field"]``, else zero (V/A); a non-zero field read from
the file is always announced on stderr with its key and magnitude
(``--field 0 0 0`` drops it).  Whenever structures are extrapolating or a
field lies outside the model's reference data, a ``TRUST:`` summary is
printed on stderr (``--quiet`` keeps it).  Without ``--head`` the server
chooses per frame the head trained on its elements and the head used is
printed; ``--allow-unseen-elements`` computes frames whose head never saw
one of their elements (refused otherwise).  ``-o -``: standard output.  The server is
``--server``, else ``$MACEFIELD_SERVER``, else 127.0.0.1:50051 (a host
without a port gets 50051); several replicas: ``host1:port,host2:port`` or
``dns:///name:port`` (requests spread round-robin over the healthy ones;
``--no-health-check`` for a proxy given as ``dns:``).  TLS: ``--tls-ca CA.pem`` (or
``$MACEFIELD_TLS_CA``; ``--tls`` alone trusts the system roots), mutual TLS
adds ``--tls-cert``/``--tls-key``; TLS with a list of replicas needs
``--tls-server-name NAME`` (``$MACEFIELD_TLS_SERVER_NAME``), the name all
their certificates carry; a bearer token: ``--token`` or
``$MACEFIELD_TOKEN``.  Exit codes: 0 done, 1 the server failed or refused,
2 bad input (missing file, unknown option value).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .. import __version__
from ..contract import DEFAULT_OUTPUTS, EXTRAPOLATION_THRESHOLD, OUTPUTS, field_vector
from ..core.errors import MACEFieldError
from .common import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    quiet_broken_pipe,
    InputError,
    add_server_options,
    client_from_args,
    positive_int,
)
from .workflows import COMMANDS as WORKFLOW_COMMANDS
from .workflows import add_parsers as add_workflow_parsers


def _frames_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input structures (any format ASE reads; all frames)")
    p.add_argument("--field", type=float, nargs=3, metavar=("EX", "EY", "EZ"),
                   help="uniform field for every frame, V/A (default: per-frame info, else zero)")
    p.add_argument("--model", help="served model (default: the server's default)")
    p.add_argument("--head", help="model head (default: per frame, the head trained on its elements; the model's "
                                  "default head when several are)")
    p.add_argument("--allow-unseen-elements", action="store_true",
                   help="evaluate frames with elements their head was never trained on (refused otherwise: such "
                        "results are not physical)")
    p.add_argument("--batch-size", type=positive_int, help="structures per request (default 16)")
    p.add_argument("--info-prefix", default="MACE_", help="prefix of the written keys (default MACE_)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")


def output_names(text: str) -> list[str]:
    """argparse type of ``--outputs``: one or more names separated by commas."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = list(OUTPUTS) + ["all"]
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown output {', '.join(bad) or repr(text)} "
                                         f"(choose from {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="macefield", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"macefield-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="served models (with their cards), heads, elements, units and limits")
    add_server_options(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to SECONDS for the server to be ready (models loaded and warm)")

    pred = sub.add_parser("predict", help="evaluate every frame of a structure file and write the results")
    add_server_options(pred)
    _frames_options(pred)
    pred.add_argument("-o", "--output", required=True, help="output extended XYZ ('-': standard output)")
    pred.add_argument("--outputs", nargs="+", type=output_names, default=[list(DEFAULT_OUTPUTS)], metavar="NAME",
                      help="outputs to compute, separated by spaces or commas (default: energy forces stress dipole "
                           "polarization; 'all' adds Z*, alpha, chi, eps_inf at about 3x the cost; 'extrapolation' "
                           "writes the per-atom extrapolation grade); names: " + ", ".join(list(OUTPUTS) + ["all"]))

    ev = sub.add_parser("eval", help="evaluate frames with reference labels: write results, print a table of errors")
    add_server_options(ev)
    _frames_options(ev)
    ev.add_argument("-o", "--output", help="also write the frames with MACE_* keys (extended XYZ)")
    ev.add_argument("--json", action="store_true", help="print the errors (and what was compared) as JSON")
    ev.add_argument("--extrapolation", action="store_true",
                    help="also compute the extrapolation grade: per atom into -o, a summary of atoms/frames above "
                         "the threshold in the table (the model needs statistics for the head)")
    for q in ("energy", "forces", "stress", "polarization", "born_charges", "polarizability"):
        ev.add_argument(f"--{q.replace('_', '-')}-key", metavar="KEY",
                        help=f"key of the reference {q.replace('_', ' ')} (default: found by name; 'none': skip)")
    ev.add_argument("--stress-unit", choices=["ase", "pressure_positive"],
                    help="reference stress sign: ase (default, positive = tensile) or pressure_positive")
    ev.add_argument("--polarization-unit", choices=["auto", "dipole", "P"], default="auto",
                    help="reference polarization: cell dipole (e*A) or P (e/A^2) (default: decided from the values)")
    ev.add_argument("--polarizability-unit", choices=["auto", "extensive", "per_volume", "chi", "eps_inf"],
                    default="auto", help="reference polarizability: d dipole/dE (e*A^2/V), dP/dE (e/(V*A)), chi or "
                                         "eps_inf (default: extensive or per_volume, decided from the values)")
    add_workflow_parsers(sub)
    return parser.parse_args(argv)


def _symbols(numbers) -> list[str]:
    try:
        from ase.data import chemical_symbols
    except ImportError:
        return [str(z) for z in numbers]
    return [chemical_symbols[z] for z in numbers]


def card_summary(card_json: str) -> list[str]:
    """Lines summarising a model card: what it is for, its validation errors per data set, its limits."""
    if not card_json:
        return []
    try:
        card = json.loads(card_json)
    except json.JSONDecodeError:
        return ["  card:        (not valid JSON)"]
    from ..contract.accuracy import format_table

    lines = []
    for label, key in (("valid for", "valid_for"), ("short range", "short_range")):
        if card.get(key):
            lines.append(f"  {label + ':':<13}{card[key]}")
    for name, summary in (card.get("validation") or {}).items():
        head = summary.get("head", "")
        lines.append(f"  validation {name}" + (f" (head {head})" if head else "")
                     + f", {summary.get('frames', '?')} held-out frames:")
        lines += ["    " + line for line in format_table(summary).splitlines()]
    return lines


def cmd_info(args) -> int:
    with client_from_args(args) as client:
        info = client.wait_ready(args.wait) if args.wait > 0 else client.list_models()
    if args.json:
        data = {
            "target": info.target,
            "max_atoms_per_structure": info.max_atoms_per_structure,
            "max_field_magnitude": info.max_field_magnitude,
            "max_structures_per_request": info.max_structures_per_request,
            "min_distance": info.min_distance,
            "models": [{k: v for k, v in vars(m).items() if k != "card_json"} for m in info.models],
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"server {info.target}: {len(info.models)} model(s); limits: {info.max_atoms_per_structure} atoms/structure, "
          f"|E| <= {info.max_field_magnitude} V/A, {info.max_structures_per_request} structures/request, "
          f"atoms >= {info.min_distance:g} A apart")
    for m in info.models:
        flags = [f for f, on in (("default", m.is_default), ("UNTRAINED", not m.trained)) if on]
        print(f"\nmodel {m.name}" + (f" ({', '.join(flags)})" if flags else ""))
        if m.description:
            print(f"  description: {m.description}")
        print(f"  heads:       {', '.join(h + (' (default)' if h == m.default_head else '') for h in m.heads)}")
        for h in m.heads:
            if h in m.head_elements:
                print(f"    head {h}: trained on {' '.join(_symbols(m.head_elements[h]))}")
        print(f"  elements:    {' '.join(_symbols(m.atomic_numbers))}")
        print(f"  cutoff:      {m.cutoff:g} A   dtype: {m.dtype}   device: {m.device}   "
              f"parameters: {m.num_parameters}   "
              f"ZBL repulsion: {'yes' if m.pair_repulsion else 'no'}")
        print(f"  source:      {m.source}")
        print(f"  outputs:     {', '.join(m.outputs)}")
        if m.extrapolation_heads:
            print(f"  extrapolation grade: heads {', '.join(m.extrapolation_heads)} "
                  f"(> {m.extrapolation_threshold:g}: extrapolating)")
        else:
            print("  extrapolation grade: none (no statistics; macefield-calibrate adds them)")
        print("  units:       " + ", ".join(f"{k} {v}" for k, v in sorted(m.units.items())))
        for line in card_summary(m.card_json):
            print(line)
    return 0


# ------------------------------------------------------------------ frames in and out
def _read_frames(path: str):
    try:
        import ase.io
    except ImportError:
        raise InputError("this command needs ASE: pip install 'macefield-client[ase]'") from None
    if not os.path.exists(path):
        raise InputError(f"input file not found: {path}")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as exc:  # noqa: BLE001 - any reader error is the input's fault
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not frames:
        raise InputError(f"no structures in {path}")
    return frames


def _frame_field(atoms, override) -> np.ndarray:
    """The field of one frame, V/A; a value that is not three finite numbers raises :class:`InputError`."""
    source, value = _field_source(atoms, override)
    try:
        return field_vector(value, source)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _field_source(atoms, override):
    """(where the field came from, the field in V/A) for one frame."""
    if override is not None:
        return "--field", override
    for key in ("electric_field", "REF_electric_field"):
        if atoms.info.get(key) is not None:
            return f"info {key}", atoms.info[key]
    return "zero (no field key)", (0.0, 0.0, 0.0)


def fields_used(frames, override) -> list[str]:
    """One line per distinct (source, field) pair: what ``eval`` applied, so a placeholder field is seen."""
    seen: dict[tuple, int] = {}
    for a in frames:
        source, value = _field_source(a, override)
        key = (source, tuple(np.round(np.asarray(value, dtype=float).reshape(3), 6)))
        seen[key] = seen.get(key, 0) + 1
    return [f"{source} = {[float(v) for v in value]} V/A in {n} frame(s)" for (source, value), n in seen.items()]


def file_fields(frames, override) -> list[str]:
    """Lines announcing the non-zero fields taken from the input file's frames (none with ``--field``)."""
    if override is not None:
        return []
    seen: dict[tuple, int] = {}
    for a in frames:
        source, value = _field_source(a, override)
        if source.startswith("info ") and np.any(np.asarray(value, dtype=float)):
            key = (source[5:], tuple(np.round(np.asarray(value, dtype=float).reshape(3), 6)))
            seen[key] = seen.get(key, 0) + 1
    return [f"WARNING: applying the electric field read from the input file: info[{key!r}] = "
            f"{[float(v) for v in value]} V/A (|E| = {np.linalg.norm(value):.3g} V/A) in {n} of {len(frames)} "
            "frame(s); --field 0 0 0 evaluates at zero field, --field EX EY EZ sets another"
            for (key, value), n in seen.items()]


def _say(message: str) -> None:
    print(f"macefield: {message}", file=sys.stderr, flush=True)


def _progress(args, n: int):
    return args.progress if args.progress is not None else (None if n > 1 else False)


def _compute(args, frames, outputs):
    """(fields (n, 3) V/A, results, the served model's ModelInfo or None); the file's fields are announced."""
    fields = np.array([_frame_field(a, args.field) for a in frames])
    with client_from_args(args) as client:  # bad server options are reported before anything else
        for line in file_fields(frames, args.field):
            _say(line)
        results = client.predict_many(frames, electric_field=fields, outputs=outputs, model=args.model,
                                      head=args.head, batch_size=args.batch_size,
                                      progress=_progress(args, len(frames)),
                                      allow_unseen_elements=args.allow_unseen_elements)
        try:
            info = client.list_models()
        except MACEFieldError:
            info = None
    model = None if info is None else next((m for m in info.models if m.name == results[0].model), None)
    return fields, results, model


def heads_used(results, named: str | None) -> str:
    """The heads the results were computed with, and whether they were named or chosen by the server."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.head] = counts.get(r.head, 0) + 1
    used = ", ".join(f"{h} ({n} frame(s))" if len(counts) > 1 else h for h, n in counts.items())
    return used if named else f"{used} (chosen by the server from the elements; --head to choose)"


def reference_field(model, head: str) -> float | None:
    """The largest |E| (V/A) of the model's reference data for ``head``, from its card; None when not stated."""
    if model is None or not model.card_json:
        return None
    try:
        card = json.loads(model.card_json)
        value = card["extrapolation"]["heads"][head]["reference"]["fields_V_per_A"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    try:
        return float(np.max(np.abs(np.asarray(value, dtype=float))))
    except (TypeError, ValueError):
        return None


def trust_summary(results, fields, model) -> dict | None:
    """How far the results can be trusted: extrapolating structures (how many, the worst grade) and fields
    outside the model's reference data; None when nothing is extrapolating (or no grade was served)."""
    threshold = (model.extrapolation_threshold if model is not None and model.extrapolation_threshold > 0
                 else EXTRAPOLATION_THRESHOLD)
    graded = [(i, float(r.extrapolation_max)) for i, r in enumerate(results) if r.extrapolation is not None]
    above = [(i, g) for i, g in graded if not g <= threshold]
    field_flags = [i for i, r in enumerate(results)
                   if r.get("field_extrapolation") is not None and not float(r["field_extrapolation"]) <= threshold]
    magnitudes = np.linalg.norm(np.asarray(fields, dtype=float).reshape(len(results), 3), axis=1)
    outside = []
    for i, r in enumerate(results):
        limit = reference_field(model, r.head)
        if limit is not None and magnitudes[i] > limit + 1e-12:
            outside.append(i)
    if not above and not field_flags and not outside:
        return None
    worst = max(above, key=lambda x: x[1]) if above else None
    summary = {"threshold": threshold, "structures": len(results), "graded": len(graded),
               "extrapolating": len(above), "worst_grade": None if worst is None else worst[1],
               "worst_frame": None if worst is None else worst[0],
               "field_outside_reference": sorted(set(field_flags) | set(outside)),
               "max_field": float(magnitudes.max()) if len(magnitudes) else 0.0}
    if outside:
        summary["reference_field"] = reference_field(model, results[outside[0]].head)
    return summary


def format_trust(summary: dict) -> list[str]:
    lines = []
    if summary["extrapolating"]:
        lines.append(f"TRUST: {summary['extrapolating']} of {summary['structures']} structure(s) extrapolating "
                     f"(grade > {summary['threshold']:g}; worst {summary['worst_grade']:.3g} in frame "
                     f"{summary['worst_frame']}): unlike the model's training data, their results carry no "
                     "accuracy statement (--head, or eval --extrapolation for the per-atom grade)")
    if summary["field_outside_reference"]:
        ref = summary.get("reference_field")
        where = f" (its reference data are at |E| <= {ref:g} V/A)" if ref is not None else ""
        lines.append(f"TRUST: the field of {len(summary['field_outside_reference'])} structure(s), |E| up to "
                     f"{summary['max_field']:.3g} V/A, is outside what the model was trained to describe{where}: "
                     "its field response there is an extrapolation")
    return lines


def annotate(atoms, result, field, prefix: str = "MACE_", extrapolation: bool = False) -> None:
    """Add one result to ``atoms`` under ``prefix`` keys; everything the frame carried stays (see module doc).

    ``extrapolation``: also write the grade (``prefix + "extrapolation"`` per atom, ``..._max`` in info).
    """
    n = len(atoms)
    p = prefix
    atoms.info[p + "energy"] = float(result.energy)
    atoms.info[p + "electric_field"] = np.asarray(field, dtype=float)
    if result.forces is not None:
        atoms.arrays[p + "forces"] = result.forces
    if result.stress is not None:
        atoms.info[p + "stress"] = result.stress
    if result.dipole is not None:
        atoms.info[p + "dipole"] = result.dipole
    if result.polarization is not None:
        atoms.info[p + "polarization"] = result.polarization
    if result.born_charges is not None:
        atoms.arrays[p + "becs"] = result.born_charges.reshape(n, 9)
    if result.polarizability is not None:
        atoms.info[p + "alpha"] = result.polarizability.reshape(9)
    if result.chi is not None:
        atoms.info[p + "polarizability"] = result.chi.reshape(9)
        atoms.info[p + "eps_inf"] = result.eps_inf.reshape(9)
    elif result.polarizability is not None:
        atoms.info[p + "molecular_polarizability"] = result.polarizability.reshape(9)
    if extrapolation and result.extrapolation is not None:
        atoms.arrays[p + "extrapolation"] = np.asarray(result.extrapolation, dtype=float)
        atoms.info[p + "extrapolation_max"] = float(result.extrapolation_max)
        if result.get("field_extrapolation") is not None:
            atoms.info[p + "field_extrapolation"] = float(result["field_extrapolation"])


def _check_writable(path: str | None) -> None:
    """Refuse an output path that cannot be written before any frame is computed."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output folder not found: {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"cannot write {path}")


def _write(path: str, frames, quiet: bool = False) -> None:
    import ase.io

    try:
        ase.io.write(sys.stdout if path == "-" else path, frames, format="extxyz")
        if path == "-":
            sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc}") from None
    if not quiet:
        print(f"wrote {len(frames)} structure(s) to {'standard output' if path == '-' else path}", file=sys.stderr)


def cmd_predict(args) -> int:
    if args.output != "-":
        _check_writable(args.output)
    frames = _read_frames(args.input)
    names = [n for group in args.outputs for n in group]
    outputs = "all" if "all" in names else names
    fields, results, model = _compute(args, frames, outputs)
    grade = "extrapolation" in names or "extrapolation_max" in names
    for atoms, field, r in zip(frames, fields, results):
        annotate(atoms, r, field, args.info_prefix, extrapolation=grade)
    _write(args.output, frames, args.quiet)
    if not args.quiet:
        _say(f"head {heads_used(results, args.head)}")
    trust = trust_summary(results, fields, model)
    for line in format_trust(trust) if trust else ():
        _say(line)
    return 0


def extrapolation_summary(results, threshold: float) -> dict:
    """How many atoms and frames of ``results`` have a grade above ``threshold``, and the largest grade."""
    grades = [np.asarray(r.extrapolation, dtype=float) for r in results]
    flat = np.concatenate(grades)
    worst = int(np.argmax([g.max() for g in grades]))
    return {"threshold": threshold, "atoms": int(flat.size), "atoms_above": int(np.sum(flat > threshold)),
            "fraction_above": float(np.mean(flat > threshold)), "frames": len(grades),
            "frames_above": int(sum(bool(np.any(g > threshold)) for g in grades)), "max": float(flat.max()),
            "max_frame": worst}


def format_extrapolation(summary: dict) -> str:
    return (f"  extrapolation grade: max {summary['max']:.3g} (frame {summary['max_frame']}); "
            f"{summary['atoms_above']} of {summary['atoms']} atoms ({100 * summary['fraction_above']:.2f}%) in "
            f"{summary['frames_above']} of {summary['frames']} frames above {summary['threshold']:g} (extrapolating)")


# ------------------------------------------------------------------------------ eval
#: reference quantity -> outputs the model must compute for it
_NEEDS = {"energy": ("energy",), "forces": ("forces",), "stress": ("stress",),
          "polarization": ("dipole", "polarization"), "born_charges": ("born_charges",),
          "polarizability": ("polarizability",)}


def references(frames, args, skipped: list[str] | None = None) -> dict[str, dict]:
    """{quantity: {"key", "kind", "reason", "labels": [per frame, internal units or None]}} found in ``frames``.

    A quantity whose unit convention the values cannot tell (and no option gives) is left out, with one line
    saying why and how to include it appended to ``skipped``.
    """
    from ..contract.labels import convert, detect_kind, find_key, has_key, lookup

    found: dict[str, dict] = {}
    for q in _NEEDS:
        key = getattr(args, f"{q}_key")
        if key is not None and key.lower() == "none":
            continue
        if key is None:
            key = find_key(frames, q)
            if key is None:
                continue
        elif not any(has_key(a, key) for a in frames):
            raise InputError(f"--{q.replace('_', '-')}-key {key!r}: no frame of {args.input} has it")
        usable = [a for a in frames if has_key(a, key)]
        unit = {"stress": args.stress_unit, "polarization": args.polarization_unit,
                "polarizability": args.polarizability_unit}.get(q)
        kind: str | None  # None: the quantity's only convention
        if q == "stress" and unit is None:
            kind, reason = "ase", "ASE sign (positive = tensile); --stress-unit pressure_positive for the opposite"
        elif unit in (None, "auto"):
            try:
                kind, reason = detect_kind(usable, q, key)
            except ValueError as exc:
                if skipped is None:
                    raise InputError(str(exc)) from None
                skipped.append(f"skipped {exc}")
                continue
        else:
            kind, reason = unit, "given on the command line"
        labels: list[np.ndarray | None] = []  # None: this frame has no usable label
        for i, a in enumerate(frames):
            periodic_only = kind in ("P", "per_volume", "chi", "eps_inf") or q == "stress"
            if not has_key(a, key) or (periodic_only and not a.pbc.all()):
                labels.append(None)
                continue
            try:
                labels.append(convert(q, lookup(a, key), a, kind))
            except ValueError as exc:
                raise InputError(f"{q} ({key!r}, frame {i}): {exc}") from None
        found[q] = {"key": key, "kind": kind, "reason": reason, "labels": labels}
    return found


def cmd_eval(args) -> int:
    from ..contract.accuracy import format_table, frame_errors, summarise

    _check_writable(args.output)
    frames = _read_frames(args.input)
    skipped: list[str] = []
    refs = references(frames, args, skipped)
    if not refs:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise InputError(f"no usable reference labels in {args.input}{detail} (give their keys with --energy-key etc.)")
    for line in skipped:
        _say(line)
    outputs = sorted({o for q in refs for o in _NEEDS[q]} | {"energy"}
                     | ({"extrapolation"} if args.extrapolation else set()))
    fields, results, model = _compute(args, frames, outputs)
    trust = trust_summary(results, fields, model)
    for line in format_trust(trust) if trust else ():
        _say(line)
    grades = extrapolation_summary(results, EXTRAPOLATION_THRESHOLD) if args.extrapolation else None
    rows = []
    for i, (atoms, r) in enumerate(zip(frames, results)):
        labels = {q: spec["labels"][i] for q, spec in refs.items() if spec["labels"][i] is not None}
        pred = {k: r[k] for k in r}
        rows.append(frame_errors(pred, labels, n_atoms=len(atoms), cell=np.asarray(atoms.get_cell()),
                                 periodic=bool(atoms.pbc.all())))
    summary = summarise(rows)
    if args.output:
        for atoms, field, r in zip(frames, fields, results):
            annotate(atoms, r, field, args.info_prefix, extrapolation=args.extrapolation)
        _write(args.output, frames, args.quiet)
    compared = {q: {k: spec[k] for k in ("key", "kind", "reason")} for q, spec in refs.items()}
    used = fields_used(frames, args.field)
    if args.json:
        print(json_text({"file": args.input, "frames": len(frames), "head": results[0].head,
                         "model": results[0].model, "head_chosen": args.head is None,
                         "electric_field": used, "references": compared, "skipped": skipped, "errors": summary,
                         "trust": trust} | ({"extrapolation": grades} if grades else {})))
        return 0
    print(f"{args.input}: {len(frames)} frame(s), model {results[0].model}, head {heads_used(results, args.head)}")
    for line in used:
        print(f"  electric field: {line}")
    for q, spec in compared.items():
        kind = f" as {spec['kind']}" if spec["kind"] else ""
        print(f"  reference {q}: {spec['key']!r}{kind} ({spec['reason']})")
    for line in skipped:
        print(f"  {line}")
    if grades:
        print(format_extrapolation(grades))
    for line in format_trust(trust) if trust else ():
        print(f"  {line}")
    print(format_table(summary))
    return 0


def json_text(data) -> str:
    """Indented JSON that stays valid JSON: a non-finite number (an element without reference atoms has grade
    +inf) is written as the string "inf", "-inf" or "nan"."""
    def clean(value):
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        commands = {"info": cmd_info, "predict": cmd_predict, "eval": cmd_eval, **WORKFLOW_COMMANDS}
        return commands[args.command](args)
    except InputError as exc:
        print(f"macefield: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except MACEFieldError as exc:
        print(f"macefield: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("macefield: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (macefield info | head -2): not an error of ours
        quiet_broken_pipe()
        return EXIT_OK


__all__ = [
    "annotate",
    "card_summary",
    "cmd_eval",
    "cmd_info",
    "cmd_predict",
    "extrapolation_summary",
    "fields_used",
    "format_extrapolation",
    "json_text",
    "main",
    "parse_args",
    "references",
]


if __name__ == "__main__":
    sys.exit(main())
