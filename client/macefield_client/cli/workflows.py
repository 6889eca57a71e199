"""The workflow subcommands of ``macefield``: ``phonons`` and ``hysteresis`` (docs/workflows.md).

    macefield phonons STRUCTURE [--relax] [--relax-cell] [--displacement A] [--json OUT] [--plot FILE.png]
    macefield hysteresis STRUCTURE --axis z --amplitude V_PER_A --period PS [--cycles N] [--json OUT] [--plot ...]

STRUCTURE is any file ASE reads (its first frame), or a built-in published structure: ``alpha-quartz``
(the PBE cell of the default model's data).  Each writes a JSON with every number (units in the keys or
beside them) and prints a summary.  They need ``pip install 'macefield-client[workflows]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .common import InputError, add_server_options, client_from_args, positive_int

#: built-in structures the workflow commands accept instead of a file
BUILTIN = ("alpha-quartz",)


def load_structure(name: str):
    """The first frame of file ``name``, or a built-in structure (:data:`BUILTIN`)."""
    try:
        import ase.io
    except ImportError:
        raise InputError("this command needs ASE: pip install 'macefield-client[workflows]'") from None
    if name == "alpha-quartz":
        from ..data.structures import alpha_quartz

        return alpha_quartz(cell="pbe")  # type: ignore[arg-type]  # the builder takes "pbe" (see its doc)
    if not os.path.exists(name):
        raise InputError(f"structure file not found: {name} (or a built-in: {', '.join(BUILTIN)})")
    try:
        return ase.io.read(name, index=0)
    except Exception as exc:  # noqa: BLE001 - any reader error is the input's fault
        raise InputError(f"cannot read {name}: {type(exc).__name__}: {exc}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("structure", help=f"structure file (first frame) or a built-in: {', '.join(BUILTIN)}")
    add_server_options(p)
    p.add_argument("--model", help="served model (default: the server's default)")
    p.add_argument("--head", help="model head (default: the model's default head)")
    p.add_argument("--json", metavar="OUT", help="write every number here (JSON)")
    p.add_argument("--plot", metavar="FILE.png", help="write a figure here (matplotlib)")


def add_parsers(sub) -> None:
    """The workflow subcommands on ``macefield``'s subparsers."""
    ph = sub.add_parser("phonons", help="Gamma-point phonons, IR intensities, eps_inf and eps_0 (harmonic route)")
    _common(ph)
    ph.add_argument("--relax", action="store_true", help="relax the positions first (space group kept)")
    ph.add_argument("--relax-cell", action="store_true", help="relax the positions and the cell first")
    ph.add_argument("--fmax", type=float, default=1e-3, help="relaxation threshold, eV/A (default 1e-3)")
    ph.add_argument("--displacement", type=float, default=0.01, help="finite displacement, A (default 0.01)")
    ph.add_argument("--symprec", type=float, default=1e-3, help="symmetry tolerance, A (default 1e-3)")
    ph.add_argument("--lo-direction", type=float, nargs=3, metavar=("QX", "QY", "QZ"),
                    help="also the LO frequencies for q -> 0 along this Cartesian direction (non-analytic term)")

    hy = sub.add_parser("hysteresis", help="P-E loop under a periodic field along an axis (damped 0 K or thermal MD)")
    _common(hy)
    hy.add_argument("--axis", choices=["x", "y", "z"], default="z", help="field direction (default z)")
    hy.add_argument("--amplitude", type=float, default=0.3636, help="field amplitude E0, V/A (default 0.3636)")
    hy.add_argument("--period", type=float, default=200.0, help="field period T, ps (default 200)")
    hy.add_argument("--cycles", type=float, default=1.0, help="field periods to run (default 1)")
    hy.add_argument("--waveform", choices=["cosine", "triangle"], default="cosine", help="field shape (default cosine)")
    hy.add_argument("--temperature", type=float, default=0.0,
                    help="K; 0 (default): damped dynamics without thermal noise (the 0 K protocol)")
    hy.add_argument("--damping", type=float, default=0.01,
                    help="viscous damping (0 K) or Langevin friction, 1/fs (default 0.01)")
    hy.add_argument("--timestep", type=float, default=2.0, help="fs (default 2)")
    hy.add_argument("--replicas", type=positive_int, default=1,
                    help="independent replicas (thermal runs: different seeds), batched on the server (default 1)")
    hy.add_argument("--record-every", type=positive_int, default=10, help="record every N steps (default 10)")
    hy.add_argument("--seed", type=int, default=0)
    hy.add_argument("--repeat", type=int, nargs=3, default=(1, 1, 1), metavar=("N1", "N2", "N3"),
                    help="supercell of the structure (default 1 1 1)")


def _write_json(path: str | None, data: dict) -> None:
    if path is None:
        return
    from ..workflows.common import json_ready

    try:
        with open(path, "w") as fh:
            json.dump(json_ready(data), fh, indent=1, allow_nan=False)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc}") from None
    print(f"wrote {path}", file=sys.stderr)


def _needs(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"this command needs {module}: pip install 'macefield-client[workflows]'")


def cmd_phonons(args) -> int:
    for module in ("ase", "phonopy", "spglib"):
        _needs(module)
    from ..workflows.harmonic import harmonic

    atoms = load_structure(args.structure)
    if args.displacement <= 0:
        raise InputError(f"--displacement: must be > 0 A, got {args.displacement}")
    with client_from_args(args) as client:
        try:
            result = harmonic(client, atoms, head=args.head, model=args.model, displacement=args.displacement,
                              relax=args.relax, relax_cell=args.relax_cell, fmax=args.fmax, symprec=args.symprec,
                              lo_direction=args.lo_direction)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    data = result.to_dict()
    _write_json(args.json, data)
    if args.plot:
        _needs("matplotlib")
        from ..workflows.plots import plot_phonons

        plot_phonons(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"{data['formula']} ({data['space_group']}), model {result.info['model']}, head {result.info['head']}: "
          f"{len(result.frequencies_cm1)} modes at Gamma")
    print("frequencies (cm^-1, label): " + ", ".join(
        f"{f:.1f} {lab}".strip() for f, lab in zip(result.frequencies_cm1, result.labels)))
    print("IR-active (cm^-1, label, intensity e^2/amu): " + ", ".join(
        f"{r['frequency_cm1']:.1f} {r['label']} {r['intensity_e2_per_amu']:.3f}" for r in result.optical_ir()))
    print("eps_inf diagonal: " + " ".join(f"{x:.3f}" for x in np.diag(result.eps_inf)))
    print("eps_static diagonal: " + " ".join(f"{x:.3f}" for x in np.diag(result.eps_static)))
    if "warning" in result.info:
        print(f"warning: {result.info['warning']}", file=sys.stderr)
    return 0


def cmd_hysteresis(args) -> int:
    _needs("ase")
    from ..workflows.hysteresis import hysteresis

    atoms = load_structure(args.structure) * tuple(args.repeat)
    with client_from_args(args) as client:
        try:
            loop = hysteresis(client, atoms, axis=args.axis, amplitude=args.amplitude, period_ps=args.period,
                              cycles=args.cycles, waveform=args.waveform, temperature=args.temperature,
                              damping=args.damping, timestep_fs=args.timestep, replicas=args.replicas,
                              record_every=args.record_every, seed=args.seed, head=args.head, model=args.model,
                              progress=None)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    data = loop.to_dict()
    _write_json(args.json, data)
    if args.plot:
        _needs("matplotlib")
        from ..workflows.plots import plot_loop

        plot_loop(loop, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    x = loop.extracted
    print(f"{atoms.get_chemical_formula()}: {args.waveform} field along {args.axis}, E0 {args.amplitude:g} V/A, "
          f"period {args.period:g} ps, {args.cycles:g} cycle(s), T = {args.temperature:g} K, "
          f"{len(loop.time_fs)} records")
    print(f"remanent polarization Pr: {x['remanent_polarization_uC_cm2']:.2f} uC/cm^2 "
          f"(+{x['remanent_polarization_plus_uC_cm2']:.2f} / {x['remanent_polarization_minus_uC_cm2']:.2f})")
    print(f"coercive field Ec: {x['coercive_field_MV_cm']:.2f} MV/cm "
          f"(+{x['coercive_field_plus_MV_cm']:.2f} / {x['coercive_field_minus_MV_cm']:.2f})")
    print(f"saturation polarization Ps: {x['saturation_polarization_uC_cm2']:.2f} uC/cm^2")
    return 0


COMMANDS = {"phonons": cmd_phonons, "hysteresis": cmd_hysteresis}

__all__ = ["BUILTIN", "COMMANDS", "add_parsers", "cmd_hysteresis", "cmd_phonons", "load_structure"]
