#!/usr/bin/env python3
"""The fluctuation eps_0 of a low-temperature alpha-quartz ensemble against the harmonic eps_0, through one
``macefield-serve`` child process on the embedded default model.

``macefield_client.workflows.eps_static_md`` (its module doc has the method): the harmonic route of the
relaxed PBE cell (head sio2), then Langevin MD of ``--replicas`` replicas at ``--temperature`` K (friction
``--friction`` 1/fs, ``--timestep`` fs, ``--equilibrate`` unrecorded steps, ``--steps`` steps recorded every
``--record-every``), eps_0 = eps_inf + (<M M> - <M><M>) / (k_B T V eps0) with its standard error over
``--blocks`` blocks per replica, and the deviation from the harmonic eps_0 in standard errors, per diagonal
component.  The defaults give an error bar of about 2 %; tests/test_workflows_eps_md.py runs a shorter
version (2 to 4 %, with ``--center all``) in CI.

    python bench/ensemble_eps_static.py --out bench/results/ensemble_eps_static_cpu.json   # ~5 min, 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from results_io import RESULTS, write_json
from workflows import start_server

import numpy as np


def main() -> int:
    from macefield_client import Client
    from macefield_client.structures import alpha_quartz
    from macefield_client.workflows import EpsMDSettings, eps_static_md

    defaults = EpsMDSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "ensemble_eps_static_cpu.json"))
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="K")
    parser.add_argument("--friction", type=float, default=defaults.friction, help="Langevin friction, 1/fs")
    parser.add_argument("--timestep", dest="timestep_fs", type=float, default=defaults.timestep_fs, help="fs")
    parser.add_argument("--equilibrate", type=int, default=defaults.equilibrate, help="unrecorded steps")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="recorded steps")
    parser.add_argument("--record-every", type=int, default=defaults.record_every)
    parser.add_argument("--blocks", type=int, default=defaults.blocks, help="blocks per replica for the error bar")
    parser.add_argument("--center", choices=("replica", "all"), default=defaults.center,
                        help="the mean of the dipole fluctuations: each replica's (default) or all replicas'")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    parser.add_argument("--hardware", default="2-core x86 CPU (shared)", help="what the numbers were measured on")
    args = parser.parse_args()
    settings = EpsMDSettings(**{f.name: getattr(args, f.name) for f in fields(EpsMDSettings)})

    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(args.threads, Path(tmp))
        try:
            with Client(f"127.0.0.1:{port}") as client:
                r = eps_static_md(client, alpha_quartz(cell="pbe"), settings, head="sio2")
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"benchmark": "ensemble_eps_static", "hardware": args.hardware, "server_threads": args.threads,
              **r.to_dict()}
    result["within_3_stderr"] = bool(np.all(np.abs(r.deviation_in_stderr) < 3.0))
    write_json(args.out, result)
    print(f"eps_0 harmonic {np.round(np.diag(r.eps_static_harmonic), 3)}, fluctuation "
          f"{np.round(np.diag(r.eps_static_fluctuation), 3)} +- {np.round(np.diag(r.stderr), 3)} "
          f"(T = {r.mean_temperature_K:.1f} K, {r.md_wall_s:.0f} s of MD)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
