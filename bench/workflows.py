#!/usr/bin/env python3
"""Cost of the client workflows against one ``macefield-serve`` child process (default configuration).

1. Ensemble MD (``macefield_client.workflows.Ensemble``): N replicas in lockstep, each step's N structures in
   one ``predict_many`` call, against N separate single-trajectory clients (N ``Ensemble(replicas=1)``, each
   with its own ``Client``, run concurrently on threads: the server's batcher may join their steps).
   Systems: 9-atom alpha-quartz (PBE cell) and its 2x2x2 supercell (72 atoms); N = 1, 8, 32; Langevin
   300 K, 1 fs, a constant field, energy + forces + stress + dipole + P every step (the default outputs).
   Reported per configuration, after ``--warmup`` untimed steps: ensemble steps per second, replica-steps per
   second (N x that), the time per step inside ``predict_many`` (gRPC + server), the server's own compute
   per step (each structure's share of its batch pass, summed), and the client-side overhead per step (wall
   minus the time inside ``predict_many``: the ASE integrators, the replica threads, the gathering).
   The same with alpha recorded every step (``record_alpha=True``, ``record_every=1``: the second-order
   pass every step), measured beside E+F+P in one run (``ensemble_alpha``: same server, same load), with
   the cost of a step with alpha relative to one without.
2. Harmonic route (``macefield_client.workflows.harmonic``) wall time, without the Raman activities, with
   them by symmetry (the default) and along every mode (6N structures): 9- and 72-atom alpha-quartz, and a
   40-atom BaTiO3 cell: the cubic perovskite (Pm-3m; Ba 1a, Ti 1b, O 3c, positions fixed by symmetry) as a
   2x2x2 supercell (``macefield_client.structures.perovskite_batio3``, geometry-tested), with the lattice
   constant of the volume per formula unit of the PBE BaTiO3 data (``PBE_BATIO3_CELL``).  The residual
   force is zero by symmetry (recorded).  Cubic BaTiO3 has unstable
   (ferroelectric) modes at 0 K: they are counted, not a failure.

    python bench/workflows.py --out bench/results/workflows_cpu.json            # ~21 min on 2 CPU cores
    python bench/workflows.py --quick --out /tmp/workflows.json                 # fewer steps, roughly half
    python bench/workflows.py --only alpha                                      # only ensemble_alpha, ~10 min:
        # replaces that entry of --out (default bench/results/workflows_cpu.json) and keeps the others
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_io import RESULTS, write_json

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "server" / "macefield_server" / "weights" / "default.pt"
FIELD = (0.0, 0.0, 0.01)  # V/A


def start_server(threads: int, workdir: Path, dtype: str | None = None):
    """``macefield-serve`` (default configuration, or the model in ``dtype``) on a free port, once it is ready
    (model loaded and warmed up, so no timing includes the load); returns (process, port)."""
    log = open(workdir / (f"server-{dtype}.log" if dtype else "server.log"), "w")
    cmd = [sys.executable, "-m", "macefield_server.cli.serve", "--model", str(MODEL), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "-1", "--threads", str(threads)]
    if dtype:
        cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "ready":  # the ready line names the port too
            return proc, event["port"]
    raise RuntimeError(f"server did not get ready: see {log.name}")


class TimedClient:
    """A ``Client`` whose ``predict_many`` records its wall time and the server's compute share."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.inside_s = 0.0
        self.compute_ms = 0.0

    def reset(self) -> None:
        with self.lock:
            self.inside_s, self.compute_ms = 0.0, 0.0

    def predict_many(self, structures, *args, **kwargs):
        t0 = time.perf_counter()
        results = self.client.predict_many(structures, *args, **kwargs)
        spent = time.perf_counter() - t0
        share = sum(r.timing.get("compute_ms", 0.0) / max(r.timing.get("batch_structures", 1.0), 1.0)
                    for r in results)
        with self.lock:
            self.inside_s += spent
            self.compute_ms += share
        return results


def quartz(repeat):
    from macefield_client.structures import alpha_quartz

    return alpha_quartz(cell="pbe", repeat=repeat)


def batio3_cubic_40():
    """2x2x2 cubic perovskite BaTiO3 at the PBE data's volume per formula unit (see the module doc)."""
    from macefield_client.structures import PBE_BATIO3_CELL, perovskite_batio3

    a_t, c_t = PBE_BATIO3_CELL
    a = (a_t * a_t * c_t) ** (1.0 / 3.0)
    return perovskite_batio3(cell=(a, a), repeat=(2, 2, 2)), a


def _options(alpha: bool) -> dict:
    """Ensemble options: E+F+P recorded every 10 steps, or alpha (and everything else) recorded every step."""
    return {"record_every": 1, "record_alpha": True} if alpha else {"record_every": 10}


def timed_ensemble(port: int, atoms, n: int, steps: int, warmup: int, *, alpha: bool) -> dict:
    """One ``Ensemble`` of ``n`` replicas on one client: the per-step timings (see the module doc)."""
    from macefield_client import Client
    from macefield_client.workflows import Ensemble

    with Client(f"127.0.0.1:{port}") as client:
        timed = TimedClient(client)
        ens = Ensemble(timed, atoms, replicas=n, temperature=300.0, timestep_fs=1.0, fields=FIELD, seed=0,
                       head="sio2", **_options(alpha))
        ens.run(warmup)
        timed.reset()
        t0 = time.perf_counter()
        rec = ens.run(steps)
        wall = time.perf_counter() - t0
        if alpha and not np.isfinite(rec["alpha_e_A2_V"]).all():
            raise RuntimeError("alpha missing from a record")
        return {
            "steps_per_s": steps / wall, "replica_steps_per_s": n * steps / wall,
            "ms_per_step": 1e3 * wall / steps,
            "predict_many_ms_per_step": 1e3 * timed.inside_s / steps,
            "server_compute_ms_per_step": timed.compute_ms / steps,
            "client_overhead_ms_per_step": 1e3 * (wall - timed.inside_s) / steps,
            "mean_batch": ens.mean_batch,
        }


def bench_ensemble(port: int, atoms, n: int, steps: int, warmup: int, *, alpha: bool = False) -> dict:
    from macefield_client import Client
    from macefield_client.workflows import Ensemble

    out: dict = {"n_atoms": len(atoms), "replicas": n, "timed_steps": steps, "warmup_steps": warmup}
    out["ensemble"] = timed_ensemble(port, atoms, n, steps, warmup, alpha=alpha)
    # N separate single-trajectory clients, concurrently
    clients = [Client(f"127.0.0.1:{port}") for _ in range(n)]
    try:
        runs = [Ensemble(c, atoms, replicas=1, temperature=300.0, timestep_fs=1.0, fields=FIELD, seed=i,
                         head="sio2", **_options(alpha)) for i, c in enumerate(clients)]

        def all_run(k: int) -> float:
            threads = [threading.Thread(target=r.run, args=(k,)) for r in runs]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0

        all_run(warmup)
        wall = all_run(steps)
    finally:
        for c in clients:
            c.close()
    out["separate_clients"] = {"steps_per_s": steps / wall, "replica_steps_per_s": n * steps / wall,
                               "ms_per_step": 1e3 * wall / steps}
    out["speedup_ensemble_over_separate"] = out["ensemble"]["replica_steps_per_s"] / out["separate_clients"][
        "replica_steps_per_s"]
    return out


def bench_ensemble_alpha(port: int, atoms, n: int, steps: int, warmup: int) -> dict:
    """E+F+P (every 10 steps recorded) and alpha recorded every step, one after the other on the same server,
    the ensemble against separate clients for the latter; ``alpha_cost_ratio``: ms per ensemble step with
    alpha over without."""
    row = bench_ensemble(port, atoms, n, steps, warmup, alpha=True)
    row["ensemble_efp"] = timed_ensemble(port, atoms, n, steps, warmup, alpha=False)
    row["alpha_cost_ratio"] = row["ensemble"]["ms_per_step"] / row["ensemble_efp"]["ms_per_step"]
    return row


def ensemble_cases(quick: bool):
    """(atoms, timed steps) of the two quartz cells."""
    return ((quartz((1, 1, 1)), 20 if quick else 40), (quartz((2, 2, 2)), 4 if quick else 8))


def bench_harmonic(port: int, name: str, atoms, head: str, skip_modes: bool) -> dict:
    from macefield_client import Client
    from macefield_client.workflows import harmonic

    out: dict = {"structure": name, "n_atoms": len(atoms), "head": head}
    with Client(f"127.0.0.1:{port}") as client:
        client.predict(atoms, head=head)  # warm the server's first call
        if head == "batio3":
            out["max_residual_force_eV_A"] = float(np.abs(client.predict(atoms, head=head).forces).max())
        for key, options in (("without_raman", {"raman": False}),
                             ("with_raman", {"raman": True, "raman_method": "symmetry"}),
                             ("with_raman_along_modes", {"raman": True, "raman_method": "modes"})):
            if key == "with_raman_along_modes" and skip_modes:
                continue
            t0 = time.perf_counter()
            r = harmonic(client, atoms, head=head, **options)
            out[key] = {"wall_s": time.perf_counter() - t0,
                        "displaced_structures": r.info["displaced_structures"],
                        "raman_displaced_structures": r.info.get("raman_displaced_structures", 0),
                        "unstable_modes": int(r.info.get("unstable_modes", 0))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "workflows_cpu.json"))
    parser.add_argument("--threads", type=int, default=2, help="server torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, no 72-atom Raman along every mode")
    parser.add_argument("--hardware", default="2-core x86 CPU (shared)", help="what the numbers were measured on")
    parser.add_argument("--only", choices=("alpha",),
                        help="alpha: run only the ensemble with alpha every step and replace ensemble_alpha in "
                             "--out, keeping its other entries")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "server"), str(REPO / "client")]

    meta = {"hardware": args.hardware, "server_threads": args.threads, "python": platform.python_version(),
            "quick": args.quick}
    if args.only == "alpha":
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "workflows"}
    else:
        result = {"benchmark": "workflows", **meta,
                  "server_config": "macefield-serve defaults (5 ms batching window, automatic CPU limits)",
                  "load_before": os.getloadavg(), "ensemble": [], "harmonic": []}
    alpha: dict = {**meta, "load_before": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(args.threads, Path(tmp))
        try:
            for atoms, steps in ensemble_cases(args.quick):
                for n in (1, 8, 32):
                    row = bench_ensemble_alpha(port, atoms, n, steps, warmup=2)
                    print(json.dumps({k: row[k] for k in ("n_atoms", "replicas")}),
                          f"alpha every step: ensemble {row['ensemble']['replica_steps_per_s']:.1f} replica-steps/s "
                          f"({row['alpha_cost_ratio']:.2f}x E+F+P), separate "
                          f"{row['separate_clients']['replica_steps_per_s']:.1f}", flush=True)
                    alpha["rows"].append(row)
            alpha["load_after"] = os.getloadavg()
            result["ensemble_alpha"] = alpha
            if args.only == "alpha":
                write_json(args.out, result)
                return 0
            for atoms, steps in ensemble_cases(args.quick):
                for n in (1, 8, 32):
                    row = bench_ensemble(port, atoms, n, steps, warmup=2)
                    print(json.dumps({k: row[k] for k in ("n_atoms", "replicas")}),
                          f"ensemble {row['ensemble']['replica_steps_per_s']:.1f} replica-steps/s, separate "
                          f"{row['separate_clients']['replica_steps_per_s']:.1f}", flush=True)
                    result["ensemble"].append(row)
            cell, a = batio3_cubic_40()
            result["batio3_lattice_constant_A"] = a
            cases = [("alpha-quartz 9", quartz((1, 1, 1)), "sio2"), ("alpha-quartz 72", quartz((2, 2, 2)), "sio2"),
                     ("BaTiO3 cubic 2x2x2 (40)", cell, "batio3")]
            for name, atoms, head in cases:
                row = bench_harmonic(port, name, atoms, head, skip_modes=args.quick and len(atoms) > 40)
                print(name, {k: v["wall_s"] for k, v in row.items() if isinstance(v, dict)}, flush=True)
                result["harmonic"].append(row)
        finally:
            proc.terminate()
            proc.wait(30)
    result["load_after"] = os.getloadavg()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
