#!/usr/bin/env python3
"""Closed-loop load benchmark of the MACE-Field gRPC server (full response, 72-atom quartz).

For 1, 8 and 64 concurrent clients (each sends a request, waits for the
answer, sends the next) it measures throughput (structures/s) and p50/p99
latency in three modes, all in the same run:

* ``batching``: ``macefield-serve`` (child process) with dynamic batching on
  (``max_structures`` = the largest client count, ``max_wait_ms`` 5, other limits default);
* ``no-batching``: the same server with ``max_structures: 1``;
* ``direct``: in-process ``prepare_batch`` + ``evaluate`` of every client's
  structure per round, in batches of the server's limits for the device (the
  same work with no service at all; a structure's latency is the time until
  its batch is done);
* ``direct-one-batch``: the same, all of a round's structures in one pass
  (on CPU this is slower per structure than small batches, see
  ``macefield_server.batch_limits.AUTO_LIMITS``).

Every request asks for everything: energy, forces, stress, dipole,
polarization, Born charges, polarizability.  The structure is the first frame
of ``../shared/data/sio2-quartz-md.xyz`` (read at run time; a 2x2x2
alpha-quartz cell from ASE if the file is absent).  Results go to
``bench/results/load-<device>-<UTC time>.json``::

    python bench/load.py                     # defaults: 32 channels, L=1, 2 layers, float32, 10 s per point
    python bench/load.py --channels 64 --dtype float64 --duration 20 --clients 1 8 64

Each path first gets ``--warmup`` seconds of unrecorded load (8 clients).
A level then runs for ``--duration`` seconds and at least until every client
has finished ``--min-per-client`` requests; requests in flight at the end are
waited for and counted (throughput = completed / wall time).  Every point is
measured ``--repeats`` times, the order of the modes alternating, and pooled
(total completions / total wall time; percentiles over all latencies).  ``--modes ... direct-one-batch`` adds
a single-pass direct baseline (slow on CPU: about a minute at 64 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_json

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sio2-quartz-md.xyz"
RESULTS = REPO / "bench" / "results"
OUTPUTS = ["energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"]


def load_structure():
    from ase.io import read

    if DATA.is_file():
        return read(DATA, index=0), str(DATA.relative_to(REPO.parent)) + "@0"
    from macefield_client.structures import alpha_quartz

    return alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=0.02), "alpha-quartz 2x2x2, PBE cell (rattled)"


def build_model(args):
    import torch

    from macefield_server.engine import build_field_mace, default_architecture

    arch = default_architecture([8, 14], heads=["sio2"], channels=args.channels, max_L=1, num_interactions=2,
                                max_ell=args.max_ell, correlation=args.correlation, radial_MLP=(32, 32),
                                r_max=args.r_max)
    torch.manual_seed(0)
    model = build_field_mace(arch, dtype=getattr(torch, args.dtype))
    with torch.no_grad():  # a non-zero field coupling, like a trained model
        for p in model.field_linear.parameters():
            p.normal_(0.0, 0.1)
    return model.eval(), arch


def summarise(latencies_s, completed, wall_s, batch_sizes=None):
    lat = np.asarray(latencies_s) * 1e3
    out = {
        "completed": int(completed),
        "wall_s": round(wall_s, 3),
        "throughput_sps": round(completed / wall_s, 3) if wall_s > 0 else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
    }
    if batch_sizes:
        out["mean_batch_structures"] = round(float(np.mean(batch_sizes)), 2)
    out["_latencies"] = list(latencies_s)
    out["_batch_sizes"] = list(batch_sizes or [])
    return out


def pool(rows):
    """One summary over repeated measurements: completions / total wall time, pooled latencies."""
    latencies = [x for r in rows for x in r.pop("_latencies")]
    sizes = [x for r in rows for x in r.pop("_batch_sizes")]
    out = summarise(latencies, sum(r["completed"] for r in rows), sum(r["wall_s"] for r in rows), sizes)
    out.pop("_latencies"), out.pop("_batch_sizes")
    out["repeats_throughput_sps"] = [r["throughput_sps"] for r in rows]
    return out


# ------------------------------------------------------------------ direct
def chunks(n_structures: int, n_atoms: int, n_edges: int, max_structures: int, max_atoms: int, max_edges: int):
    """Batch sizes the server's batcher would form for ``n_structures`` equal structures."""
    per_batch = max(1, min(max_structures, max_atoms // n_atoms, max_edges // max(n_edges, 1)))
    sizes = [per_batch] * (n_structures // per_batch)
    if n_structures % per_batch:
        sizes.append(n_structures % per_batch)
    return sizes


def run_direct(model, atoms, clients: int, args, batch_limits):
    """All clients' structures of one round, evaluated in batches of the server's limits (or one batch)."""
    from macefield_server.engine import Structure, evaluate, prepare_batch
    from macefield_client.contract import resolve_outputs

    outputs = resolve_outputs(OUTPUTS)
    rng = np.random.default_rng(1)
    latencies, completed, sizes = [], 0, []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        structures = [Structure.from_atoms(atoms, electric_field=rng.normal(0, 0.01, 3)) for _ in range(clients)]
        plan = [clients] if batch_limits is None else chunks(clients, len(atoms), args.edges, *batch_limits)
        first = 0
        for size in plan:
            evaluate(model, prepare_batch(model, structures[first : first + size]), outputs)
            latencies.append(time.perf_counter() - t0)  # a structure is done when its batch is
            latencies += [latencies[-1]] * (size - 1)
            first += size
        sizes += plan
        completed += clients
        if time.perf_counter() - start >= args.duration and completed >= clients * args.min_per_client:
            break
    return summarise(latencies, completed, time.perf_counter() - start, sizes)


# ------------------------------------------------------------------ served
class Server:
    """``macefield-serve`` as a child process; ``extra_args`` go to its command line (e.g. --device cuda).

    Starting does not wait: the process imports and loads its model while the
    caller works on; :attr:`port` waits for its "listening" line,
    :meth:`wait_serving` for its models.  Its stderr goes to ``log_path``
    (default ``workdir/server-<max_structures>.log``).
    """

    def __init__(self, checkpoint: Path, max_structures: int, args, workdir: Path, extra_args=(), log_path=None):
        config = workdir / f"serve-{max_structures}.yaml"
        config.write_text(
            f"batching: {{max_structures: {max_structures}, max_wait_ms: {args.max_wait_ms}}}\nwarmup_passes: 2\n"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.log_path = Path(log_path or workdir / f"server-{max_structures}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "macefield_server.cli.serve", "--config", str(config),
             "--model", f"bench={checkpoint}", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--threads", str(args.threads),
             *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self._port = None

    @property
    def port(self) -> int:
        """The gRPC port (waits for the server's "listening" line; RuntimeError if it exits first)."""
        while self._port is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server failed to start, see {self.log_path}")
            if line.startswith("{") and '"listening"' in line:
                self._port = json.loads(line)["port"]
        return self._port

    def wait_serving(self, timeout=600):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = health_pb2_grpc.HealthStub(channel)
        end = time.time() + timeout
        while time.time() < end:
            try:
                if (stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        == health_pb2.HealthCheckResponse.SERVING):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server never became SERVING")

    def stop(self):
        """SIGTERM (once) and the exit code; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        if not self.log.closed:
            self.log.close()
        return code


async def closed_loop(port: int, atoms, clients: int, args):
    import grpc
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc

    base = dict(
        atomic_numbers=[int(z) for z in atoms.numbers],
        positions=np.asarray(atoms.positions).ravel().tolist(),
        cell=np.asarray(atoms.cell).ravel().tolist(),
        pbc=[bool(p) for p in atoms.pbc],
        outputs=OUTPUTS,
    )
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(clients, 16))]
    stubs = [rpc.MaceFieldStub(c) for c in channels]
    latencies, batch_sizes, counts = [], [], [0] * clients
    start = time.perf_counter()

    async def client(k: int):
        rng = np.random.default_rng(k)
        stub = stubs[k % len(stubs)]
        while True:
            now = time.perf_counter()
            if now - start >= args.duration and counts[k] >= args.min_per_client:
                return
            request = pb.PredictRequest(request_id=f"c{k}-{counts[k]}", electric_field=rng.normal(0, 0.01, 3).tolist(),
                                        **base)
            t0 = time.perf_counter()
            response = await stub.Predict(request, timeout=3600)
            latencies.append(time.perf_counter() - t0)
            batch_sizes.append(response.timing.batch_structures)
            counts[k] += 1

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    for c in channels:
        await c.close()
    return summarise(latencies, sum(counts), wall, batch_sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement point (at least)")
    p.add_argument("--min-per-client", type=int, default=1)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--max-ell", type=int, default=2)
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and direct alike")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of unrecorded load per path before measuring")
    p.add_argument("--repeats", type=int, default=2, help="measurements per point (mode order alternates); pooled")
    p.add_argument("--modes", nargs="+", default=["direct", "batching", "no-batching"],
                   choices=["direct", "batching", "no-batching", "direct-one-batch"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from macefield_server.serving.config import BatchingConfig
    from macefield_server.engine import Structure, evaluate, prepare_batch, save_model
    from macefield_client.contract import resolve_outputs

    torch.set_num_threads(args.threads)
    atoms, source = load_structure()
    model, arch = build_model(args)
    edges = args.edges = prepare_batch(model, [Structure.from_atoms(atoms)]).num_edges
    limits = BatchingConfig().limits_for("cpu")
    device = "cpu"
    record = {
        "benchmark": "bench/load.py",
        "command": " ".join(["python", "bench/load.py", *sys.argv[1:]]),
        "utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "gpu": None,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "structure": {"source": source, "n_atoms": len(atoms), "edges": edges},
        "model": {"channels": args.channels, "max_L": 1, "num_interactions": 2, "max_ell": args.max_ell,
                  "correlation": args.correlation, "r_max": args.r_max, "dtype": args.dtype,
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "outputs": OUTPUTS,
        "settings": {"duration_s": args.duration, "repeats": args.repeats, "warmup_s": args.warmup,
                     "min_per_client": args.min_per_client, "threads": args.threads,
                     "max_wait_ms": args.max_wait_ms,
                     "batch_limits_cpu": {"max_atoms": limits[0], "max_edges": limits[1]}},
        "results": {},
    }
    print(json.dumps({k: record[k] for k in ("structure", "model", "settings")}), flush=True)

    # warm the direct path (first-call costs) like the server's warm-up does
    evaluate(model, prepare_batch(model, [Structure.from_atoms(atoms)]), resolve_outputs(OUTPUTS))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = save_model(model, workdir / "bench.pt")
        # both servers stay up (idle ones cost nothing); the modes of one client count run back to back,
        # so that a change in the machine's background load hits them alike
        servers = {}
        for mode in args.modes:
            record["results"][mode] = {}
            if not mode.startswith("direct"):  # batching on: a batch may hold every client's structure
                servers[mode] = Server(checkpoint, max(args.clients) if mode == "batching" else 1, args, workdir)
        try:
            for server in servers.values():
                server.wait_serving()
            # unrecorded warm-up of every path at the batch shapes it will see (allocator, caches)
            for mode, server in servers.items():
                asyncio.run(closed_loop(server.port, atoms, 8,
                                        argparse.Namespace(duration=args.warmup, min_per_client=0)))
            if "direct" in args.modes:
                run_direct(model, atoms, 8,
                           argparse.Namespace(duration=args.warmup, min_per_client=1, edges=args.edges),
                           (max(args.clients), *limits))
            for level, clients in enumerate(args.clients):
                rows = {mode: [] for mode in args.modes}
                for repeat in range(args.repeats):
                    # alternate the order of the modes, so that a drift in background load favours none
                    order = args.modes if (level + repeat) % 2 == 0 else list(reversed(args.modes))
                    for mode in order:
                        if mode == "direct":  # the server's batch limits on this device
                            row = run_direct(model, atoms, clients, args, (max(args.clients), *limits))
                        elif mode == "direct-one-batch":  # every client's structure in a single pass
                            row = run_direct(model, atoms, clients, args, None)
                        else:
                            row = asyncio.run(closed_loop(servers[mode].port, atoms, clients, args))
                        rows[mode].append(row)
                        shown = {k: v for k, v in row.items() if not k.startswith("_")}
                        print(json.dumps({"mode": mode, "clients": clients, "repeat": repeat, **shown}), flush=True)
                for mode in args.modes:
                    record["results"][mode][str(clients)] = pool(rows[mode])
        finally:
            for mode, server in servers.items():
                record["results"][mode]["server_exit_code"] = server.stop()

    res = record["results"]
    checks = {}
    top = str(max(args.clients))
    if "direct" in res and "batching" in res:
        checks["served_over_direct_at_max_clients"] = round(
            res["batching"][top]["throughput_sps"] / res["direct"][top]["throughput_sps"], 3)
        checks["target_served_over_direct"] = 0.9
    if "direct-one-batch" in res and "batching" in res:
        checks["served_over_direct_one_batch_at_max_clients"] = round(
            res["batching"][top]["throughput_sps"] / res["direct-one-batch"][top]["throughput_sps"], 3)
    if "batching" in res and "no-batching" in res:
        checks["batching_over_no_batching"] = {
            c: round(res["batching"][str(c)]["throughput_sps"] / res["no-batching"][str(c)]["throughput_sps"], 3)
            for c in args.clients
        }
    record["checks"] = checks
    record["host"]["load_avg_end"] = os.getloadavg()
    out = args.out or RESULTS / f"load-{device}-{record['utc'].replace(':', '').replace('-', '')}.json"
    print(json.dumps(checks), flush=True)
    write_json(out, record, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
