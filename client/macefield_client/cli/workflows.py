"""The workflow subcommands of ``macefield``: ``phonons`` and ``hysteresis`` (docs/workflows.md).

    macefield phonons STRUCTURE [--relax] [--relax-cell] [--displacement A] [--json OUT] [--plot FILE.png]
    macefield hysteresis STRUCTURE --axis z --amplitude V_PER_A --period PS [--cycles N] [--json OUT] [--plot ...]
    macefield md STRUCTURE [--replicas N] [--temperature K] [--timestep FS] [--steps N] [--out RUN.npz] [--extxyz F]
    macefield spectrum ir|raman|dielectric TRAJECTORY|STRUCTURE [--temperature K] [--json OUT] [--plot FILE.png]
    (dielectric: eps_0 by the fluctuation formula and eps(omega) from the dipole autocorrelation; given a
    STRUCTURE, the ensemble MD of ``macefield md`` runs first, with the same options)

STRUCTURE is any file ASE reads (its first frame), or a built-in published structure: ``alpha-quartz``
(9 atoms) or ``batio3`` (the centrosymmetric perovskite, 3x3x3: 135 atoms), each in the PBE cell of the default
model's data.  Each writes a JSON with every number (units in the keys or
beside them) and prints a summary.  They need ``pip install 'macefield-client[workflows]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from ..core.errors import MACEFieldError
from ..workflows.ensemble import THERMOSTATS
from .common import EXIT_INTERRUPTED, EXIT_OK, InputError, add_server_options, client_from_args, positive_int

#: built-in structures the workflow commands accept instead of a file
BUILTIN = ("alpha-quartz", "batio3")


def load_structure(name: str):
    """The first frame of file ``name``, or a built-in structure (:data:`BUILTIN`)."""
    try:
        import ase.io
    except ImportError:
        raise InputError("this command needs ASE: pip install 'macefield-client[workflows]'") from None
    if name == "alpha-quartz":
        from ..data.structures import alpha_quartz

        return alpha_quartz(cell="pbe")  # type: ignore[arg-type]  # the builder takes "pbe" (see its doc)
    if name == "batio3":
        from ..data.structures import perovskite_batio3

        return perovskite_batio3(repeat=(3, 3, 3))
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


@dataclass(frozen=True)
class MDDefaults:
    """Defaults of the ensemble MD (``macefield md``, ``macefield spectrum`` given a structure): K, fs, steps,
    1/fs (friction), fs (taut)."""

    replicas: int = 8
    temperature: float = 300.0
    timestep: float = 1.0
    steps: int = 4000
    equilibrate: int = 1000
    record_every: int = 2
    thermostat: str = "bussi"
    friction: float = 0.01
    taut: float = 100.0
    seed: int = 0


MD_DEFAULTS = MDDefaults()


def _md_options(p: argparse.ArgumentParser, *, spectrum: bool) -> None:
    """The ensemble MD options; for ``spectrum`` ``--timestep``/``--temperature`` also describe a trajectory."""
    d = MD_DEFAULTS
    g = p.add_argument_group("ensemble MD" + (" (given a STRUCTURE)" if spectrum else ""))
    if not spectrum:
        g.add_argument("--timestep", type=float, metavar="FS", help=f"fs (default {d.timestep:g})")
        g.add_argument("--temperature", type=float, metavar="K",
                       help=f"K: initial Maxwell-Boltzmann velocities and the thermostat's target (default "
                            f"{d.temperature:g})")
    g.add_argument("--replicas", type=positive_int, default=d.replicas,
                   help=f"independent replicas (seeds SEED + i), one batched call per step (default {d.replicas})")
    g.add_argument("--steps", type=int, default=d.steps, metavar="N", help=f"recorded steps (default {d.steps})")
    g.add_argument("--equilibrate", type=int, default=d.equilibrate, metavar="N",
                   help=f"steps run first, not recorded (default {d.equilibrate}; none on --restart)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"replica i uses SEED + i (default {d.seed})")
    g.add_argument("--record-every", type=positive_int, default=d.record_every, metavar="K",
                   help=f"record every K steps (default {d.record_every})")
    g.add_argument("--thermostat", choices=list(THERMOSTATS), default=d.thermostat,
                   help="bussi (default: canonical velocity rescaling, which leaves the line shapes nearly "
                        "untouched), langevin (broadens lines by about friction/(2 pi c)), or nve")
    g.add_argument("--friction", type=float, default=d.friction, help=f"langevin friction, 1/fs (default "
                                                                          f"{d.friction:g})")
    g.add_argument("--taut", type=float, default=d.taut, metavar="FS",
                   help=f"bussi time constant, fs (default {d.taut:g})")
    g.add_argument("--field", type=float, nargs=3, metavar=("EX", "EY", "EZ"),
                   help="constant electric field, V/A (default none)")
    g.add_argument("--relax", action="store_true",
                   help="relax the positions through the service first (space group kept, fmax 1e-3 eV/A)")
    if not spectrum:
        g.add_argument("--alpha", action="store_true",
                       help="record the polarizability alpha (1.6 to 2.1x the cost of a step on a CPU, on recorded "
                            "steps)")
    g.add_argument("--repeat", type=int, nargs=3, default=(1, 1, 1), metavar=("N1", "N2", "N3"),
                   help="supercell of the structure (default 1 1 1)")
    g.add_argument("--out", metavar="RUN.npz",
                   help="write the trajectory and the state here (npz; " + (
                       "the default run.npz" if not spectrum else "default: not kept") + ")")
    g.add_argument("--extxyz", metavar="FILE", help="also write the recorded frames as extended XYZ (one file, "
                                                    "replica by replica, info 'replica')")
    g.add_argument("--restart", metavar="RUN.npz", help="continue the run saved in this npz (same STRUCTURE, "
                                                        "replicas and options)")
    if spectrum:
        g.add_argument("--model", help="served model (default: the server's default)")
        g.add_argument("--head", help="model head (default: the model's default head)")
        add_server_options(g)


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
    ph.add_argument("--no-raman", dest="raman", action="store_false", help="skip the Raman activities")
    ph.add_argument("--raman-method", choices=["symmetry", "modes"], default="symmetry",
                    help="d alpha/du of the symmetry-distinct atoms, expanded by the space group (default; 6 "
                         "polarizability calls per distinct atom), or along every mode (6N calls)")
    ph.add_argument("--raman-step", type=float, default=0.01,
                    help="Raman finite displacement, A: of one atom (symmetry) or the largest along a mode "
                         "(modes) (default 0.01)")

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
    hy.add_argument("--equilibrate", type=int, default=0, metavar="N",
                    help="steps run first in the field E(0), not recorded (default 0)")
    hy.add_argument("--repeat", type=int, nargs=3, default=(1, 1, 1), metavar=("N1", "N2", "N3"),
                    help="supercell of the structure (default 1 1 1)")

    md = sub.add_parser("md", help="ensemble MD through the server: N replicas, one batched call per step; writes the "
                                   "npz trajectory that 'macefield spectrum' reads")
    md.add_argument("structure", help=f"structure file (first frame) or a built-in: {', '.join(BUILTIN)}")
    add_server_options(md)
    md.add_argument("--model", help="served model (default: the server's default)")
    md.add_argument("--head", help="model head (default: the model's default head)")
    _md_options(md, spectrum=False)

    sp = sub.add_parser("spectrum", help="IR or Raman spectrum, or the fluctuation eps_0 and eps(omega), from an MD "
                                         "trajectory (no server)")
    sp.add_argument("kind", choices=["ir", "raman", "dielectric"])
    sp.add_argument("trajectory", metavar="TRAJECTORY|STRUCTURE",
                    help="npz written by 'macefield md' (Ensemble.save), or extended XYZ with a dipole (e*A) or "
                         "polarization (e/A^2) and, for Raman, alpha (e*A^2/V, 9) per frame; or a STRUCTURE (a "
                         f"file without those, or a built-in: {', '.join(BUILTIN)}): the ensemble MD runs first "
                         "(raman and dielectric record alpha)")
    sp.add_argument("--timestep", type=float, metavar="FS",
                    help="fs between frames (default: from the npz's record_time_fs; required for extended XYZ); "
                         f"with a STRUCTURE the MD time step (default {MD_DEFAULTS.timestep:g})")
    sp.add_argument("--temperature", type=float, metavar="K",
                    help="K, for the quantum correction and eps_0 (default: the trajectory's mean "
                         f"record_temperature_K); with a STRUCTURE the MD temperature (default "
                         f"{MD_DEFAULTS.temperature:g})")
    sp.add_argument("--volume", type=float, metavar="A3",
                    help="cell volume, A^3 (dipole = P x V; default: the extended XYZ's cell; required with an npz "
                         "for dielectric)")
    sp.add_argument("--window", choices=["hann", "none"], default="hann", help="lag window (default hann)")
    sp.add_argument("--max-lag", type=float, metavar="FS", help="largest correlation lag, fs (default: half a block)")
    sp.add_argument("--broadening", type=float, default=0.0, metavar="CM1",
                    help="Gaussian broadening, FWHM in cm^-1 (default 0)")
    sp.add_argument("--quantum-correction", choices=["harmonic", "none"], default="harmonic",
                    help="IR: harmonic quantum correction (default: beta omega^2 times the classical dipole "
                         "spectrum, exact band areas for a harmonic crystal) or none (that divided by "
                         "Q = beta hbar omega / (1 - exp(-beta hbar omega)))")
    sp.add_argument("--stokes", action="store_true", help="Raman: the Stokes side with the harmonic Bose factor")
    sp.add_argument("--blocks", type=positive_int, default=1, help="blocks per replica for the error bar (default 1)")
    sp.add_argument("--max-cm1", type=float, default=4000.0, help="highest wavenumber written, cm^-1 (default 4000)")
    sp.add_argument("--peak-threshold", type=float, default=0.05,
                    help="peaks: local maxima above this fraction of the maximum (default 0.05)")
    sp.add_argument("--raw", action="store_true", help="do not normalise the spectrum to a maximum of 1")
    sp.add_argument("--eps-inf", type=float, nargs="+", metavar="E",
                    help="dielectric: eps_inf, 1, 3 (diagonal) or 9 numbers (default: 1 + <alpha>/(V eps0) from "
                         "recorded alpha, else 1)")
    sp.add_argument("--json", metavar="OUT", help="write every number here (JSON)")
    sp.add_argument("--plot", metavar="FILE.png", help="write a figure here (matplotlib)")
    _md_options(sp, spectrum=True)


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


def _write_outputs(args, data: dict, plot: str, *plot_args) -> None:
    """``data`` to ``--json`` and, with ``--plot``, the figure of :mod:`~..workflows.plots` function ``plot``
    called as ``plot(*plot_args, path)``."""
    _write_json(args.json, data)
    if args.plot:
        _needs("matplotlib")
        from ..workflows import plots

        getattr(plots, plot)(*plot_args, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


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
                              lo_direction=args.lo_direction, raman=args.raman, raman_step=args.raman_step,
                              raman_method=args.raman_method)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    data = result.to_dict()
    _write_outputs(args, data, "plot_phonons", result)
    print(f"{data['formula']} ({data['space_group']}), model {result.info['model']}, head {result.info['head']}: "
          f"{len(result.frequencies_cm1)} modes at Gamma")
    print("frequencies (cm^-1, label): " + ", ".join(
        f"{f:.1f} {lab}".strip() for f, lab in zip(result.frequencies_cm1, result.labels)))
    print("IR-active (cm^-1, label, intensity e^2/amu): " + ", ".join(
        f"{r['frequency_cm1']:.1f} {r['label']} {r['intensity_e2_per_amu']:.3f}" for r in result.optical_ir()))
    if result.raman_activities is not None:
        print("Raman-active (cm^-1, label, activity A^4/amu): " + ", ".join(
            f"{r['frequency_cm1']:.1f} {r['label']} {r['activity_A4_per_amu']:.3f}" for r in result.optical_raman()))
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
                              record_every=args.record_every, seed=args.seed, equilibrate=args.equilibrate,
                              head=args.head, model=args.model, progress=None)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    _write_outputs(args, loop.to_dict(), "plot_loop", loop)
    x = loop.extracted
    print(f"{atoms.get_chemical_formula()}: {args.waveform} field along {args.axis}, E0 {args.amplitude:g} V/A, "
          f"period {args.period:g} ps, {args.cycles:g} cycle(s), T = {args.temperature:g} K, "
          f"{len(loop.time_fs)} records")
    print(f"remanent polarization Pr: {x['remanent_polarization_uC_cm2']:.2f} uC/cm^2 "
          f"({x['remanent_polarization_plus_uC_cm2']:+.2f} / {x['remanent_polarization_minus_uC_cm2']:+.2f})")
    print(f"coercive field Ec: {x['coercive_field_MV_cm']:.2f} MV/cm "
          f"({x['coercive_field_plus_MV_cm']:+.2f} / {x['coercive_field_minus_MV_cm']:+.2f})")
    print(f"saturation polarization Ps: {x['saturation_polarization_uC_cm2']:.2f} uC/cm^2 "
          f"(loop centre {x['loop_centre_uC_cm2']:+.2f} uC/cm^2)")
    return 0


def run_md(args, atoms, *, alpha: bool, out: str) -> bool:
    """The ensemble MD of ``macefield md``'s options on ``atoms`` through the server: its npz written to ``out``
    (and ``--extxyz``).  Returns False when Ctrl-C cut it (what was recorded is written all the same).  When the
    server fails during the MD (a ``MACEFieldError`` once the client's retries are spent), what was recorded is
    written too, a line on stderr says so, and the error is raised again (``macefield`` exits 1 naming it)."""
    _needs("ase")
    from ..workflows.ensemble import Ensemble
    from ..workflows.relax import relax

    d = MD_DEFAULTS
    timestep = d.timestep if args.timestep is None else args.timestep
    temperature = d.temperature if args.temperature is None else args.temperature
    for option, value, low in (("--timestep", timestep, 0.0), ("--temperature", temperature, -1e-300),
                               ("--steps", args.steps, -1), ("--equilibrate", args.equilibrate, -1),
                               ("--friction", args.friction, 0.0), ("--taut", args.taut, 0.0)):
        if not np.isfinite(value) or value <= low:
            raise InputError(f"{option}: must be {'>= 0' if low < 0 else '> 0'}, got {value}")
    if args.restart is not None and not os.path.exists(args.restart):
        raise InputError(f"--restart: file not found: {args.restart}")
    positions = args.extxyz is not None
    if args.restart is not None:  # record what the saved run recorded
        try:
            saved = set(np.load(args.restart).files)
        except Exception as exc:  # noqa: BLE001 - any reader error is the input's fault
            raise InputError(f"--restart: cannot read {args.restart}: {type(exc).__name__}: {exc}") from None
        positions = positions or "record_positions_A" in saved
        alpha = alpha or "record_alpha_e_A2_V" in saved
    atoms = atoms * tuple(args.repeat)
    field = None if args.field is None else np.array(args.field, dtype=float)
    ens: Ensemble | None = None
    failure: MACEFieldError | None = None
    with client_from_args(args) as client:
        try:
            if args.relax and args.restart is None:
                atoms, info = relax(client, atoms, head=args.head, model=args.model)
                if not args.quiet:
                    print(f"relaxed: {info.get('steps', '?')} steps, residual force "
                          f"{info.get('max_force_eV_A', float('nan')):.2e} eV/A", file=sys.stderr)
            ens = Ensemble(client, atoms, replicas=args.replicas, fields=field, timestep_fs=timestep,
                           temperature=temperature, thermostat=args.thermostat, friction=args.friction,
                           taut_fs=args.taut, record_every=args.record_every, record_alpha=alpha,
                           record_positions=positions, seed=args.seed, head=args.head,
                           model=args.model)
            if args.restart is not None:
                ens.restart(args.restart)
            elif args.equilibrate:
                ens.equilibrate(args.equilibrate, progress=None)
            if not ens.interrupted:
                ens.run(args.steps, progress=None)
        except ValueError as exc:  # InvalidRequest (the server refused the input) included
            raise InputError(str(exc)) from None
        except MACEFieldError as exc:
            if ens is None:  # before the MD started (relax): nothing recorded
                raise
            failure = exc
    assert ens is not None
    try:
        ens.save(out)
        if args.extxyz is not None:
            frames = ens.write_extxyz(args.extxyz)
            if not args.quiet:
                print(f"wrote {args.extxyz} ({frames} frames)", file=sys.stderr)
    except OSError as exc:
        raise InputError(f"cannot write: {exc}") from None
    rec = ens.arrays()
    records = rec["time_fs"].shape[1] if rec else 0
    temp = rec["temperature_K"].mean() if records else float("nan")
    print(f"{atoms.get_chemical_formula()}: {ens.n} replicas, {args.thermostat} at {temperature:g} K, dt "
          f"{timestep:g} fs, {records} records every {args.record_every} steps, mean T {temp:.1f} K, "
          f"{ens.mean_batch:.1f} structures per call" + (" (interrupted)" if ens.interrupted else ""))
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    if failure is not None:
        print(f"macefield md: stopped by a server failure after {records} records per replica "
              f"({type(failure).__name__}); what was recorded is in {out}", file=sys.stderr)
        raise failure
    return not ens.interrupted


def cmd_md(args) -> int:
    atoms = load_structure(args.structure)
    finished = run_md(args, atoms, alpha=args.alpha, out=args.out or "run.npz")
    return EXIT_OK if finished else EXIT_INTERRUPTED


def is_trajectory(name: str) -> bool:
    """True for a trajectory ``macefield spectrum`` reads (an npz, or a file whose first frame carries a dipole,
    polarization or alpha); False for a structure (a built-in name or a file without them)."""
    if name in BUILTIN:
        return False
    if name.endswith(".npz") or not os.path.exists(name):
        return True  # read_series names a missing file
    frame = load_structure(name)
    keys = set(frame.info) | (set(frame.calc.results) if frame.calc is not None else set())
    return bool(keys & {"dipole", "MACE_dipole", "REF_dipole", "polarization", "MACE_polarization",
                        "REF_polarization", "MACE_alpha", "alpha", "polarizability", "REF_polarizability"})


def _first(mapping, keys):
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


def read_series(path: str, timestep: float | None) -> dict:
    """``dipole`` (replicas, frames, 3) or None, ``is_dipole`` (False: P in e/A^2), ``alpha`` (replicas,
    frames, 3, 3) or None, ``dt_fs``, ``temperature_K`` (or None), ``volume_A3`` (or None)."""
    if not os.path.exists(path):
        raise InputError(f"trajectory not found: {path}")
    if path.endswith(".npz"):
        try:
            data = dict(np.load(path))
        except Exception as exc:  # noqa: BLE001 - any reader error is the input's fault
            raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        time = data.get("record_time_fs")
        volume = data.get("volume_A3")
        dt = timestep
        if dt is None and time is not None and time.shape[-1] > 1:
            dt = float(np.median(np.diff(time, axis=-1)))
        temp = data.get("record_temperature_K")
        return {"dipole": data.get("record_polarization_e_A2"), "is_dipole": False,
                "alpha": data.get("record_alpha_e_A2_V"), "dt_fs": dt,
                "temperature_K": None if temp is None else float(np.mean(temp)),
                "volume_A3": None if volume is None else float(volume)}
    try:
        import ase.io

        frames = list(ase.io.read(path, index=":"))  # type: ignore[arg-type]  # a list with index ":"
    except ImportError:
        raise InputError("reading extended XYZ needs ASE: pip install 'macefield-client[workflows]'") from None
    except Exception as exc:  # noqa: BLE001 - any reader error is the input's fault
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if all("replica" in atoms.info for atoms in frames):  # macefield md --extxyz: replica by replica
        replicas = sorted({int(atoms.info["replica"]) for atoms in frames})
        by = [[a for a in frames if int(a.info["replica"]) == r] for r in replicas]
        if len({len(b) for b in by}) != 1:
            raise InputError(f"{path}: the replicas have different numbers of frames")
        frames = [a for b in by for a in b]
    else:
        replicas = [0]
    if timestep is None and "time_fs" in frames[0].info and len(frames) > len(replicas):
        timestep = float(frames[1].info["time_fs"]) - float(frames[0].info["time_fs"])
    dipoles, polarizations, alphas = [], [], []
    for atoms in frames:
        results = dict(atoms.info)
        if atoms.calc is not None:
            results.update(atoms.calc.results)
        dipoles.append(_first(results, ("dipole", "MACE_dipole", "REF_dipole")))
        polarizations.append(_first(results, ("polarization", "MACE_polarization", "REF_polarization")))
        alphas.append(_first(results, ("MACE_alpha", "alpha", "polarizability", "REF_polarizability")))
    periodic = frames[0].cell.rank == 3  # type: ignore[union-attr]
    volume = float(np.mean([a.get_volume() for a in frames])) if periodic else None
    n = len(replicas)
    dipole, is_dipole = None, True
    if all(d is not None for d in dipoles):
        dipole = np.array(dipoles, dtype=float).reshape(n, -1, 3)
    elif all(p is not None for p in polarizations):
        dipole, is_dipole = np.array(polarizations, dtype=float).reshape(n, -1, 3), False
    alpha = np.array(alphas, dtype=float).reshape(n, -1, 3, 3) if all(a is not None for a in alphas) else None
    temperature = float(np.mean([a.info["temperature_K"] for a in frames])) if all(
        "temperature_K" in a.info for a in frames) else None
    return {"dipole": dipole, "is_dipole": is_dipole, "alpha": alpha, "dt_fs": timestep, "temperature_K": temperature,
            "volume_A3": volume}


def cmd_spectrum(args) -> int:
    finished = True
    if is_trajectory(args.trajectory):
        series = read_series(args.trajectory, args.timestep)
    else:
        import tempfile

        atoms = load_structure(args.trajectory)
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or os.path.join(tmp, "run.npz")
            finished = run_md(args, atoms, alpha=args.kind != "ir", out=out)
            series = read_series(out, None)
        # the spectrum's time step and temperature are the run's (its records and their mean temperature),
        # exactly as for 'macefield spectrum' on the npz that 'macefield md' writes
        args.timestep = args.temperature = None
        if not finished:
            print("macefield: interrupted; the spectrum of what was recorded follows", file=sys.stderr)
    code = _spectrum(args, series)
    return code if finished else EXIT_INTERRUPTED


def _spectrum(args, series: dict) -> int:
    from ..contract.constants import EPS0
    from ..workflows import spectra

    temperature = args.temperature if args.temperature is not None else series["temperature_K"]
    volume = args.volume if args.volume is not None else series["volume_A3"]
    dt = series["dt_fs"]
    if dt is None or dt <= 0:
        raise InputError("--timestep FS is needed (the trajectory does not say the time between frames)")
    try:
        if args.kind == "dielectric":
            if series["dipole"] is None:
                raise InputError(f"{args.trajectory}: no dipole or polarization per frame")
            if volume is None:
                raise InputError("--volume A3 is needed (the trajectory has no cell)")
            if temperature is None:
                raise InputError("--temperature K is needed")
            m = series["dipole"] if series["is_dipole"] else series["dipole"] * volume
            eps_inf = None
            source = "given (--eps-inf)"
            if args.eps_inf is not None:
                if len(args.eps_inf) not in (1, 3, 9):
                    raise InputError(f"--eps-inf: 1, 3 or 9 numbers, got {len(args.eps_inf)}")
                eps_inf = np.array(args.eps_inf)
            elif series["alpha"] is not None and np.isfinite(series["alpha"]).all():
                eps_inf = np.eye(3) + series["alpha"].mean(axis=(0, 1)) / (volume * EPS0)
                source = "1 + <alpha>/(V eps0) from the recorded alpha"
            eps = spectra.eps_static_fluctuation(m, volume, temperature, eps_inf=eps_inf, blocks=args.blocks)
            function = spectra.dielectric_function(m, dt, volume, temperature, eps_inf=eps_inf, window=args.window,
                                                   max_lag_fs=args.max_lag, broadening_cm1=args.broadening,
                                                   blocks=args.blocks, max_cm1=args.max_cm1)
            if eps_inf is not None:
                eps.metadata["eps_inf_source"] = function.metadata["eps_inf_source"] = source
            data = eps.to_dict()
            data["dielectric_function"] = function.to_dict()
            _write_outputs(args, data, "plot_eps_convergence", m, dt, volume, temperature, eps)
            print(f"eps_static diagonal: {' '.join(f'{x:.3f}' for x in np.diag(eps.eps_static))} "
                  f"(+- {' '.join(f'{x:.3f}' for x in np.diag(eps.stderr))}); "
                  f"eps_inf: {eps.metadata['eps_inf_source']}")
            peak = function.frequency_cm1[np.argmax(function.isotropic_imag)]
            print(f"eps(omega): {len(function.frequency_cm1)} frequencies to {function.frequency_cm1[-1]:.0f} cm^-1, "
                  f"resolution {function.metadata['resolution_cm1']:.1f} cm^-1; isotropic eps'' peaks at "
                  f"{peak:.1f} cm^-1")
            return 0
        options = dict(window=args.window, max_lag_fs=args.max_lag, broadening_cm1=args.broadening,
                       blocks=args.blocks, max_cm1=args.max_cm1, normalise=not args.raw,
                       peak_threshold=args.peak_threshold, temperature_K=temperature)
        if args.kind == "ir":
            if series["dipole"] is None:
                raise InputError(f"{args.trajectory}: no dipole or polarization per frame")
            m = series["dipole"]
            if not series["is_dipole"] and volume is not None:
                m = m * volume
            result = spectra.ir_spectrum(m, dt, quantum_correction=args.quantum_correction, **options)
        else:
            if series["alpha"] is None:
                raise InputError(f"{args.trajectory}: no polarizability per frame (record_alpha / MACE_alpha)")
            result = spectra.raman_spectrum(series["alpha"], dt, bose="stokes" if args.stokes else "none", **options)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    _write_outputs(args, result.to_dict(), "plot_spectrum", result)
    print(f"{args.kind} spectrum: resolution {result.metadata['resolution_cm1']:.1f} cm^-1, "
          f"{result.metadata['spectra_averaged']} spectra averaged; peaks (cm^-1, strongest first): "
          + ", ".join(f"{p:.1f}" for p in result.peaks_cm1))
    return 0


COMMANDS = {"phonons": cmd_phonons, "hysteresis": cmd_hysteresis, "md": cmd_md, "spectrum": cmd_spectrum}

__all__ = ["BUILTIN", "COMMANDS", "MD_DEFAULTS", "MDDefaults", "add_parsers", "cmd_hysteresis", "cmd_md", "cmd_phonons",
           "cmd_spectrum", "is_trajectory", "load_structure", "read_series", "run_md"]
