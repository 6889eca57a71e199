#!/usr/bin/env python3
"""The fluctuation eps_0 of a low-temperature alpha-quartz ensemble against the harmonic eps_0, through one
``macefield-serve`` child process on the embedded default model.

1. The harmonic route (``macefield_client.workflows.harmonic``, positions relaxed through the service, PBE
   cell, head sio2): eps_inf and eps_0 = eps_inf + the mode sum.
2. Langevin MD of the relaxed cell (``Ensemble``: ``--replicas`` replicas at ``--temperature`` K, friction
   ``--friction`` 1/fs, ``--timestep`` fs, ``--equilibrate`` unrecorded steps, then ``--steps`` steps
   recorded every ``--record-every``), the cell dipole M = P V.
3. eps_0 = eps_inf + (<M M> - <M><M>) / (k_B T V eps0) (``eps_static_fluctuation``; eps_inf the harmonic
   route's, T the mean kinetic temperature of the records), its standard error over ``--blocks`` blocks per
   replica; the deviation from the harmonic eps_0 in standard errors, per diagonal component.

At low temperature the crystal is nearly harmonic, so the two must agree within the statistical error; the
run needed for a useful error bar (several ps per replica) does not fit a unit or integration test on two CPU
cores, hence this script.

    python bench/ensemble_eps_static.py --out bench/results/ensemble_eps_static_cpu.json   # ~5 min, 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_json
from workflows import start_server

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "ensemble_eps_static_cpu.json"))
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=50.0, help="K (default 50)")
    parser.add_argument("--friction", type=float, default=0.02, help="Langevin friction, 1/fs (default 0.02)")
    parser.add_argument("--timestep", type=float, default=2.0, help="fs (default 2)")
    parser.add_argument("--equilibrate", type=int, default=200, help="unrecorded steps (default 200)")
    parser.add_argument("--steps", type=int, default=2000, help="recorded steps (default 2000)")
    parser.add_argument("--record-every", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per replica for the error bar (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    parser.add_argument("--hardware", default="2-core x86 CPU (shared)", help="what the numbers were measured on")
    args = parser.parse_args()

    from macefield_client import Client
    from macefield_client.structures import alpha_quartz
    from macefield_client.workflows import Ensemble, eps_static_fluctuation, harmonic

    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result: dict = {"benchmark": "ensemble_eps_static", "hardware": args.hardware, "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(args.threads, Path(tmp))
        try:
            with Client(f"127.0.0.1:{port}") as client:
                ref = harmonic(client, alpha_quartz(cell="pbe"), head="sio2", relax=True, raman=False)
                atoms = ref.atoms
                volume = float(atoms.get_volume())
                ens = Ensemble(client, atoms, replicas=args.replicas, temperature=args.temperature,
                               thermostat="langevin", friction=args.friction, timestep_fs=args.timestep,
                               record_every=args.record_every, seed=args.seed, head="sio2")
                start = time.perf_counter()
                ens.equilibrate(args.equilibrate)
                rec = ens.run(args.steps)
                wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(30)
    m = rec["polarization_e_A2"] * volume  # (replicas, records, 3), e*A
    temperature = float(rec["temperature_K"].mean())
    eps = eps_static_fluctuation(m, volume, temperature, eps_inf=ref.eps_inf, blocks=args.blocks)
    harmonic_diag = np.diag(ref.eps_static)
    fluct, err = np.diag(eps.eps_static), np.diag(eps.stderr)
    result.update({
        "volume_A3": volume, "mean_temperature_K": temperature, "md_wall_s": wall,
        "steps_per_s": (args.equilibrate + args.steps) / wall,
        "eps_inf_diag": np.diag(ref.eps_inf).tolist(), "eps_static_harmonic_diag": harmonic_diag.tolist(),
        "eps_static_fluctuation_diag": fluct.tolist(), "eps_static_fluctuation_stderr_diag": err.tolist(),
        "deviation_in_stderr": ((fluct - harmonic_diag) / err).tolist(),
        "isotropic": {"harmonic": float(harmonic_diag.mean()), "fluctuation": float(fluct.mean()),
                      "stderr": float(np.sqrt((err ** 2).sum()) / 3)},
        "blocks_averaged": int(args.replicas * args.blocks),
    })
    result["within_3_stderr"] = bool(np.all(np.abs(result["deviation_in_stderr"]) < 3.0))
    write_json(args.out, result)
    print(f"eps_0 harmonic {np.round(harmonic_diag, 3)}, fluctuation {np.round(fluct, 3)} +- {np.round(err, 3)} "
          f"(T = {temperature:.1f} K, {wall:.0f} s of MD)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
