#!/usr/bin/env python3
"""Energy conservation of the embedded default model in NVE, served as users serve it (float32) and in float64.

For each dtype, one ``macefield-serve`` child process on the default model and, per head, one NVE ensemble
(``macefield_client.workflows.Ensemble``, ASE VelocityVerlet, centre of mass fixed) of two replicas from the
same crystal: one at zero field and one at a constant field along z (``--field`` V/A; at constant E the
conserved quantity is the electric enthalpy F plus the kinetic energy).  Crystals: alpha-quartz in the PBE cell
(2x2x2, 72 atoms, head sio2) and BaTiO3 at the centrosymmetric perovskite positions in the PBE tetragonal cell
(3x3x3, 135 atoms, head batio3), both with Maxwell-Boltzmann velocities at ``--temperature`` K (BaTiO3 leaves
its centrosymmetric saddle point during the run).  Every ``--record-every`` steps the total energy
E_tot = F + K is recorded; per replica the JSON reports, in meV/atom, its drift (slope of a straight-line fit,
per ps), the RMS of its residual around that line (the fluctuation that a finite time step gives) and its
largest deviation from the start, with the potential energy's range for scale.

    python bench/nve_drift.py --out bench/results/nve_drift_cpu.json    # 35-50 min on a 2-core x86 CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_json
from workflows import start_server

import numpy as np


def conservation(time_fs: np.ndarray, total_eV: np.ndarray, potential_eV: np.ndarray, atoms: int) -> dict:
    """Drift (meV/atom/ps, least-squares slope), residual RMS and largest deviation from the start (meV/atom)."""
    t_ps = time_fs / 1000.0
    slope, intercept = np.polyfit(t_ps, total_eV, 1)
    residual = total_eV - (slope * t_ps + intercept)
    scale = 1000.0 / atoms
    return {
        "drift_meV_per_atom_per_ps": float(slope * scale),
        "fluctuation_rms_meV_per_atom": float(np.sqrt(np.mean(residual**2)) * scale),
        "max_deviation_meV_per_atom": float(np.max(np.abs(total_eV - total_eV[0])) * scale),
        "potential_range_meV_per_atom": float(np.ptp(potential_eV) * scale),
    }


def main() -> int:
    from macefield_client import Client
    from macefield_client.structures import alpha_quartz, perovskite_batio3
    from macefield_client.workflows import Ensemble

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "nve_drift_cpu.json"))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--heads", nargs="+", default=["sio2", "batio3"], choices=["sio2", "batio3"])
    parser.add_argument("--steps", type=int, default=1000, help="NVE steps (default 1000: 0.5 ps at 0.5 fs)")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, initial velocities")
    parser.add_argument("--field", type=float, default=0.05, help="V/A along z for the second replica")
    parser.add_argument("--record-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    parser.add_argument("--hardware", default="2-core x86 CPU (shared)", help="what the numbers were measured on")
    args = parser.parse_args()

    crystals = {
        "sio2": ("alpha-quartz, PBE cell, 2x2x2 (72 atoms)", alpha_quartz(cell="pbe", repeat=(2, 2, 2))),
        "batio3": ("BaTiO3, centrosymmetric perovskite positions, PBE tetragonal cell, 3x3x3 (135 atoms)",
                   perovskite_batio3(repeat=(3, 3, 3))),
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            proc, port = start_server(args.threads, Path(tmp), dtype)
            try:
                with Client(f"127.0.0.1:{port}") as client:
                    for head in args.heads:
                        what, atoms = crystals[head]
                        fields = [None, np.array([0.0, 0.0, args.field])]
                        ensemble = Ensemble(client, atoms, replicas=2, fields=fields, timestep_fs=args.timestep,
                                            temperature=args.temperature, thermostat="nve",
                                            record_every=args.record_every, seed=args.seed, head=head)
                        t0 = time.perf_counter()
                        rec = ensemble.run(args.steps)
                        wall = time.perf_counter() - t0
                        for i, field in enumerate(fields):
                            total = rec["energy_eV"][i] + rec["kinetic_eV"][i]
                            run = {"dtype": dtype, "head": head, "structure": what, "atoms": len(atoms),
                                   "field_V_A": [0.0, 0.0, 0.0] if field is None else field.tolist(),
                                   "mean_temperature_K": float(np.mean(rec["temperature_K"][i][1:])),
                                   **conservation(rec["time_fs"][i], total, rec["energy_eV"][i], len(atoms)),
                                   "wall_s_both_replicas": wall}
                            runs.append(run)
                            print(f"{dtype} {head} E_z {run['field_V_A'][2]:.3f} V/A: drift "
                                  f"{run['drift_meV_per_atom_per_ps']:+.4f} meV/atom/ps, fluctuation "
                                  f"{run['fluctuation_rms_meV_per_atom']:.4f}, max |dE| "
                                  f"{run['max_deviation_meV_per_atom']:.4f} meV/atom (potential range "
                                  f"{run['potential_range_meV_per_atom']:.1f}), T {run['mean_temperature_K']:.0f} K",
                                  flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    import torch

    result = {
        "benchmark": "nve_drift",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": args.hardware,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "torch": torch.__version__,
        "model": "embedded default model",
        "server_threads": args.threads,
        "integrator": "ASE VelocityVerlet through macefield_client.workflows.Ensemble (centre of mass fixed)",
        "steps": args.steps, "timestep_fs": args.timestep, "record_every": args.record_every,
        "initial_temperature_K": args.temperature, "seed": args.seed,
        "runs": runs,
    }
    write_json(args.out, result)
    print("| dtype | structure | field (V/A) | T (K) | drift (meV/atom/ps) | fluctuation (meV/atom) | max deviation "
          "(meV/atom) | potential range (meV/atom) |\n|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['dtype']} | {r['head']}, {r['atoms']} atoms | {r['field_V_A'][2]:g} "
              f"| {r['mean_temperature_K']:.0f} | {r['drift_meV_per_atom_per_ps']:+.4f} "
              f"| {r['fluctuation_rms_meV_per_atom']:.4f} "
              f"| {r['max_deviation_meV_per_atom']:.4f} | {r['potential_range_meV_per_atom']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
