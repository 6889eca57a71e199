#!/usr/bin/env python3
"""MD steps per second through each way of driving the server, against the in-process engine.

System: the 72-atom alpha-quartz frame 0 of ../shared/data/sio2-quartz-md.xyz,
the embedded default model (as shipped: float32, or ``--dtype``), energy +
forces + stress + dipole at every step, 0.5 fs NVE (PIMD: PILE-L at 300 K).
Paths, each against one ``macefield-serve`` child process (``--threads``
torch threads, docs/examples/ipi/serve-md.yaml: no batching window, a ring
polymer in one engine pass):

* ``engine``: ``macefield_server.engine.predict`` in this process (no service):
  one structure, and B structures as one pass (what the server computes for a
  batched ring polymer) or as B single passes;
* ``ase_session``: ``MACEFieldCalculator`` (one PredictStream) under ASE's
  VelocityVerlet;
* ``ipi``: i-PI NVE (docs/examples/ipi/nve.xml) with ``macefield-ipi``;
* ``ipi_pimd_B_batched`` / ``ipi_pimd_B_unbatched``: i-PI PIMD with B beads
  (docs/examples/ipi/pimd.xml), ``batch_size`` B (one PredictBatch per step)
  or 1 (B stream requests per step);
* ``lammps``: ``fix external`` through ``macefield_client.lammps``.

For every path: seconds per MD step in steady state, after ``--warmup``
untimed steps (i-PI: from the driver's per-structure wall clock; ASE: the
timed run over its steps; LAMMPS: the timed run over its force calls, one
more than its steps), steps/s, the engine time for the same work (median of
repeats, timed right before and right after the path, averaged: the CPU of
the development machines is shared), and the overhead per step (path -
engine) in ms.  Because the shared CPU makes that difference noisy, every
path also reports the server's own time per step (queue + compute, from the
timing in its answers) and the rest, ``outside_server_ms_per_step``: what
the path adds (MD code, sockets, gRPC, conversions), which load changes
little.  The load average before and after is recorded.

    python bench/md_engines.py --out bench/results/md_engines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_json

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sio2-quartz-md.xyz"
EXAMPLES = REPO / "docs" / "examples"
MODEL = REPO / "server" / "macefield_server" / "weights" / "default.pt"
OUTPUTS = ["energy", "forces", "stress", "dipole"]


def quartz():
    import ase
    import ase.io

    a = ase.io.read(DATA, 0)
    return ase.Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=True)


def start_server(args, workdir: Path):
    """``macefield-serve`` on a free port; returns (process, port)."""
    log = open(workdir / "server.log", "w")
    cmd = [sys.executable, "-m", "macefield_server.cli.serve", "--config", str(EXAMPLES / "ipi" / "serve-md.yaml"),
           "--model", str(MODEL), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
           "--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    for line in proc.stdout:
        if line.startswith("{") and '"listening"' in line:
            return proc, json.loads(line)["port"]
    raise RuntimeError(f"server did not start: see {log.name}")


# ------------------------------------------------------------------ engine
class Engine:
    """The same model in this process (no service): the reference cost of a step's work."""

    def __init__(self, args, atoms):
        import torch

        from macefield_server.engine import load_model, predict

        torch.set_num_threads(args.threads)
        self.model = load_model(MODEL, dtype=args.dtype)
        self.predict = predict
        self.atoms = atoms
        self.repeats = args.repeats

    def _median_s(self, fn, repeats):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def ms(self, structures: int, one_pass: bool) -> float:
        """ms for ``structures`` copies of the cell: one engine pass, or one pass each."""
        if one_pass and structures > 1:
            batch = [self.atoms] * structures
            return 1e3 * self._median_s(lambda: self.predict(self.model, batch, outputs=OUTPUTS, max_edges=None),
                                        max(2, self.repeats // structures))
        single = self._median_s(lambda: self.predict(self.model, [self.atoms], outputs=OUTPUTS), self.repeats)
        return 1e3 * single * structures


# ------------------------------------------------------------------ ASE
def ase_session(args, atoms, target):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import thermalize_momenta

    from macefield_client.ase import MACEFieldCalculator

    atoms = atoms.copy()
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(1))
    calc = MACEFieldCalculator(target)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dipoles, server_ms = [], []

    def observe():
        dipoles.append(atoms.get_dipole_moment())
        server_ms.append(calc.last_result.timing["total_ms"])

    dyn.attach(observe, interval=1)
    dyn.run(args.warmup)  # stream opened, server warm: outside the timing
    server_ms.clear()
    t0 = time.perf_counter()
    dyn.run(args.steps)
    elapsed = time.perf_counter() - t0
    calc.close()
    assert len(dipoles) >= args.warmup + args.steps  # a dipole at every step
    # the observer also runs before the first step (on the warm-up's last result): drop that one
    return elapsed / args.steps, 1, sum(server_ms[-args.steps:]) / 1e3 / args.steps


# ------------------------------------------------------------------ i-PI
def ipi_run(args, atoms, target, workdir: Path, example: str, replace, driver_args=()):
    import ase.io
    import sysconfig

    run = Path(tempfile.mkdtemp(dir=workdir))
    ase.io.write(run / "quartz.xyz", atoms, format="extxyz")
    address = f"bench{os.getpid()}-{run.name}"
    text = (EXAMPLES / "ipi" / example).read_text()
    text = re.sub(r"<address>\s*macefield\s*</address>", f"<address> {address} </address>", text)
    for old, new in replace:
        assert old in text, (example, old)
        text = text.replace(old, new)
    (run / "input.xml").write_text(text)
    ipi = subprocess.Popen([sys.executable, str(Path(sysconfig.get_path("scripts")) / "i-pi"), "input.xml"], cwd=run,
                           stdout=open(run / "ipi.log", "w"), stderr=subprocess.STDOUT)
    try:
        done = subprocess.run([sys.executable, "-m", "macefield_client.ipi", "--unix", address, "--template",
                               "quartz.xyz", "--server", target, "--log", "driver.log", *driver_args],
                              cwd=run, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        ipi.wait(300)
    finally:
        if ipi.poll() is None:
            ipi.kill()
    log = np.loadtxt(run / "driver.log", ndmin=2)
    header = [line for line in (run / "driver.log").read_text().splitlines() if line.startswith("#")][-1]
    column = {name.split("[")[0]: i for i, name in enumerate(header[1:].split())}
    exchange, steps, wall, server_ms = (log[:, column[name]] for name in ("exchange", "step", "wall", "server"))
    last = int(steps.max())
    first = args.warmup  # steady state: the server has seen this batch shape a few times
    assert last > first, "too few steps for the warm-up"
    timed = steps > first
    # the server's time per exchange (one request, or one PredictBatch shared by its structures)
    server_s = sum(server_ms[timed & (exchange == e)].max() for e in np.unique(exchange[timed])) / 1e3
    return (wall[steps == last].max() - wall[steps == first].max()) / (last - first), server_s / (last - first)


def ipi_nve(args, atoms, target, workdir):
    per_step, server = ipi_run(args, atoms, target, workdir, "nve.xml",
                               [("<total_steps> 200 </total_steps>",
                                 f"<total_steps> {args.warmup + args.steps} </total_steps>")])
    return per_step, 1, server


def ipi_pimd(args, atoms, target, workdir, beads, batched):
    replace = [("<total_steps> 10 </total_steps>", f"<total_steps> {args.warmup + args.pimd_steps} </total_steps>"),
               ("nbeads='8'", f"nbeads='{beads}'"),
               ("<batch_size> 8 </batch_size>", f"<batch_size> {beads} </batch_size>" if batched else "")]
    per_step, server = ipi_run(args, atoms, target, workdir, "pimd.xml", replace, ("--beads", str(beads)))
    return per_step, beads, server


# ------------------------------------------------------------------ LAMMPS
def lammps(args, atoms, target, workdir):
    import ase.io

    from macefield_client.lammps import attach, create_lammps

    run = Path(tempfile.mkdtemp(dir=workdir))
    ase.io.write(run / "quartz.data", atoms, format="lammps-data", specorder=["Si", "O"], masses=True)
    here = os.getcwd()
    os.chdir(run)
    try:
        lmp = create_lammps()
        lmp.file(str(EXAMPLES / "lammps" / "quartz.in"))
        with attach(lmp, "mf", server=target, type_map={1: "Si", 2: "O"}, log="dipole.log") as bridge:
            bridge.run(args.warmup)  # the stream opens, the server warms: outside the timing
            server_ms = []
            predict = bridge.session.predict

            def timed_predict(*a, **k):  # the server's own time of each call
                r = predict(*a, **k)
                server_ms.append(r.timing["total_ms"])
                return r

            bridge.session.predict = timed_predict
            t0 = time.perf_counter()
            bridge.run(args.steps)
            elapsed = time.perf_counter() - t0
            calls = bridge.calls
        lmp.close()
    finally:
        os.chdir(here)
    assert calls == args.warmup + args.steps + 2  # each run's setup is a force call too
    return elapsed / (args.steps + 1), 1, sum(server_ms) / 1e3 / (args.steps + 1)  # per force call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "md_engines_cpu.json")
    p.add_argument("--steps", type=int, default=40, help="timed MD steps per classical path (default 40)")
    p.add_argument("--pimd-steps", type=int, default=6, help="timed MD steps per PIMD path (default 6)")
    p.add_argument("--warmup", type=int, default=3, help="MD steps before the timing starts (default 3)")
    p.add_argument("--beads", type=int, nargs="+", default=[8, 32])
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="model dtype (default: as shipped)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the engine (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="engine timings (median)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    atoms = quartz()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="md_engines_"))
    engine = Engine(args, atoms)
    server, port = start_server(args, workdir)
    target = f"127.0.0.1:{port}"
    paths = [("ase_session", lambda: ase_session(args, atoms, target)),
             ("ipi", lambda: ipi_nve(args, atoms, target, workdir))]
    for beads in args.beads:
        for batched in (True, False):
            name = f"ipi_pimd_{beads}_{'batched' if batched else 'unbatched'}"
            paths.append((name, lambda b=beads, on=batched: ipi_pimd(args, atoms, target, workdir, b, on)))
    paths.append(("lammps", lambda: lammps(args, atoms, target, workdir)))
    rows = []
    try:
        for name, fn in paths:
            structures = int(name.split("_")[2]) if name.startswith("ipi_pimd") else 1
            one_pass = name.endswith("_batched")
            # the CPU is shared: time the engine for the same work right before and after each path
            before = engine.ms(structures, one_pass)
            try:
                per_step, structures, server_s = fn()
            except Exception as exc:  # noqa: BLE001 - a missing engine is recorded, the others still run
                rows.append({"path": name, "skipped": f"{type(exc).__name__}: {str(exc)[-500:]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            after = engine.ms(structures, one_pass)
            engine_ms = 0.5 * (before + after)
            rows.append({"path": name, "structures_per_step": structures, "ms_per_step": 1e3 * per_step,
                         "steps_per_s": 1.0 / per_step, "engine_ms_per_step": engine_ms,
                         "engine_ms_before_after": [before, after],
                         "overhead_ms_per_step": 1e3 * per_step - engine_ms})
            if server_s is not None:  # the server's own time (queue + compute) per step, from its answers
                rows[-1]["server_ms_per_step"] = 1e3 * server_s
                rows[-1]["outside_server_ms_per_step"] = 1e3 * (per_step - server_s)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(120)

    import torch

    result = {
        "benchmark": "md_engines",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "model": f"embedded default model ({args.dtype or 'as shipped: float32'})",
        "structure": "72-atom alpha-quartz, frame 0 of sio2-quartz-md.xyz",
        "outputs_per_step": OUTPUTS,
        "server_batching": "docs/examples/ipi/serve-md.yaml (max_wait_ms 0; a ring polymer is one engine pass)",
        "steps": args.steps,
        "pimd_steps": args.pimd_steps,
        "warmup_steps": args.warmup,
        "paths": rows,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    write_json(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
