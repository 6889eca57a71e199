#!/usr/bin/env python3
"""Rate dependence of the BaTiO3 P-E loop: Pr, Ec and Ps against the field's period, on the embedded default model.

One ``macefield-serve`` child process (default configuration, bench/workflows.py's ``start_server``); the
built-in ``batio3`` structure of ``macefield hysteresis`` (centrosymmetric perovskite, 3x3x3, 135 atoms, PBE
cell), head batio3; the protocol of the README's loop with only the period changed: one cycle of
E(t) = E0 cos(2 pi t / T) along z, E0 = 0.3636 V/A (the published amplitude), 0 K MD with viscous damping
(``--damping`` 1/fs, no noise), ``--timestep`` fs, a record every ``--record-every`` steps.  Per period:
Pr, Ec (each sign and the mean), Ps, the steps and the wall time.  The published loop (arXiv:2508.17870)
has T = 200 ps (100 000 steps of 2 fs): a GPU-sized job, not run here.

The JSON is rewritten after each period, so an interrupted run keeps the periods it finished.

    python bench/hysteresis_period.py --out bench/results/hysteresis_period_cpu.json   # ~15 min, 2 CPU cores
    python bench/hysteresis_period.py --periods 0.5 --out /tmp/loop.json               # one period, ~1 min
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

AMPLITUDE = 0.3636  # V/A, the published loop's
PUBLISHED = {  # arXiv:2508.17870, T = 200 ps, 0 K with damping, 135-atom BaTiO3
    "period_ps": 200.0,
    "single_material_mace_field": {"remanent_polarization_uC_cm2": 54.5, "coercive_field_MV_cm": 16.5},
    "pbe_allegro_pol": {"remanent_polarization_uC_cm2": 54.8, "coercive_field_MV_cm": 18.1},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "hysteresis_period_cpu.json"))
    parser.add_argument("--periods", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0], help="ps")
    parser.add_argument("--timestep", type=float, default=2.0, help="fs (default 2)")
    parser.add_argument("--damping", type=float, default=0.02, help="friction, 1/fs (default 0.02)")
    parser.add_argument("--record-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    parser.add_argument("--hardware", default="2-core x86 CPU (shared)", help="what the numbers were measured on")
    args = parser.parse_args()

    from macefield_client import Client
    from macefield_client.cli.workflows import load_structure
    from macefield_client.workflows import hysteresis

    atoms = load_structure("batio3")
    result: dict = {"benchmark": "hysteresis_period", "hardware": args.hardware, "server_threads": args.threads,
                    "python": platform.python_version(), "structure": f"batio3 built-in ({len(atoms)} atoms)",
                    "protocol": {"waveform": "cosine", "axis": "z", "amplitude_V_A": AMPLITUDE, "cycles": 1,
                                 "temperature_K": 0.0, "damping_per_fs": args.damping,
                                 "timestep_fs": args.timestep, "record_every": args.record_every,
                                 "head": "batio3"},
                    "published_200ps": PUBLISHED, "load_before": os.getloadavg(), "periods": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(args.threads, Path(tmp))
        try:
            with Client(f"127.0.0.1:{port}") as client:
                client.predict(atoms, head="batio3")  # the server's first call, untimed
                for period in args.periods:
                    t0 = time.perf_counter()
                    loop = hysteresis(client, atoms, axis="z", amplitude=AMPLITUDE, period_ps=period,
                                      waveform="cosine", temperature=0.0, damping=args.damping,
                                      timestep_fs=args.timestep, record_every=args.record_every, head="batio3")
                    wall = time.perf_counter() - t0
                    steps = int(loop.settings["steps"])
                    row = {"period_ps": period, "steps": steps, "wall_s": wall, "ms_per_step": 1e3 * wall / steps,
                           **loop.extracted, "load_after": os.getloadavg(),
                           # the loop itself, so that its numbers can be extracted again
                           "time_fs": loop.time_fs.tolist(), "field_MV_cm": loop.field_MV_cm.tolist(),
                           "polarization_uC_cm2": loop.polarization_uC_cm2.tolist()}
                    result["periods"].append(row)
                    write_json(args.out, result, say=False)
                    print(f"T = {period:g} ps: Pr {row['remanent_polarization_uC_cm2']:.2f} uC/cm^2, "
                          f"Ec {row['coercive_field_MV_cm']:.2f} MV/cm "
                          f"({row['coercive_field_plus_MV_cm']:+.2f} / {row['coercive_field_minus_MV_cm']:+.2f}), "
                          f"Ps {row['saturation_polarization_uC_cm2']:.2f}; {steps} steps, {wall:.0f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    result["load_after"] = os.getloadavg()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
