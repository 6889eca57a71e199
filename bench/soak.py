#!/usr/bin/env python3
"""Soak test of a real ``macefield-serve`` process: mixed load at a fraction of its measured capacity.

1. Starts ``macefield-serve`` (child process, ``--threads 1``) on a small
   random FieldMACE (8 channels, O/Si, two heads; ``--model`` serves a
   checkpoint of your own instead) and waits until it answers.
2. Capacity: ``--capacity-s`` seconds of closed-loop load (``--clients``
   concurrent clients, the same request mix) -> requests/s.
3. Soak: ``--duration-s`` seconds of open-loop (Poisson) arrivals at
   ``--load`` x capacity: Predict (several output sets, heads, fields,
   molecules and cells), PredictBatch of 2-4, and a ``--malformed`` share
   of bad requests (raw bytes that are not a protobuf message, NaN
   positions, overlapping atoms) that must be answered INVALID_ARGUMENT.
4. Every valid answer is compared with the in-process engine
   (``macefield_server.engine.predict``; references computed once per pool
   entry), every request must be answered (any status; the run waits for
   stragglers), and the server's VmRSS (/proc/<pid>/status) is sampled every
   ``--rss-every-s``; growth = last sample vs the first sample after
   ``--warmup-s`` of soak.

Pass criteria (``"pass"`` in the JSON): zero unanswered, zero wrong answers,
zero unexpected status codes, RSS growth < 5 %.  Results:
``bench/results/soak-<UTC time>.json``::

    python bench/soak.py --duration-s 600          # the 10-minute soak
    python bench/soak.py --duration-s 180          # a quick validation run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from results_io import write_json

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # small models and structures shared with the test suite

os.environ.setdefault("OMP_NUM_THREADS", "1")

import grpc  # noqa: E402
import torch  # noqa: E402
from conftest import quartz_like, random_field_model, sio_molecule  # noqa: E402
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb  # noqa: E402
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc  # noqa: E402
from serving import arrays, request_for  # noqa: E402

from macefield_server.engine import load_model, predict, save_model  # noqa: E402

torch.set_num_threads(1)

OUTPUT_SETS = [["energy"], ["forces"], ["forces", "stress"], ["forces", "dipole"]]
PREDICT = "/macefield.v1.MaceField/Predict"


def pool(model, size: int, seed: int):
    """(request, reference arrays) pairs: cells and molecules, two heads, fields, output sets."""
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(size):
        atoms = quartz_like(seed=k, rattle=0.05) if k % 4 else sio_molecule()
        if k % 7 == 3:
            atoms = quartz_like(repeat=(2, 1, 1), seed=k)
        outputs = OUTPUT_SETS[k % len(OUTPUT_SETS)]
        if not atoms.pbc.all():
            outputs = [o for o in outputs if o != "stress"] or ["forces"]
        head = ["sio2", "other"][k % 2]
        field = rng.uniform(-0.05, 0.05, 3)
        request = request_for(atoms, field=field, head=head, outputs=outputs, request_id=f"p{k}")
        ref = predict(model, [atoms], electric_fields=field, heads=head, outputs=outputs)[0]
        entries.append((request, ref))
    return entries


def matches(response, ref) -> bool:
    got = arrays(response)
    for key, value in ref.items():
        if key not in got or not np.allclose(got[key], value, rtol=1e-8, atol=1e-9):
            return False
    return True


def malformed(rng: random.Random):
    """A request the server must refuse INVALID_ARGUMENT: not a message, a NaN position, or overlapping atoms."""
    kind = rng.random()
    if kind < 0.4:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(3, 60))) + b"\xff\xff\xff"  # not a message
    bad = request_for(quartz_like(seed=1))
    if kind < 0.7:
        bad.positions[rng.randrange(len(bad.positions))] = float("nan")
    else:  # two atoms at one point (closer than limits.min_distance)
        bad.positions[3:6] = bad.positions[0:3]
    return bad.SerializeToString()


class Load:
    """One request of the mix, with its bookkeeping."""

    def __init__(self, channel, entries, malformed_share: float, seed: int):
        self.stub = rpc.MaceFieldStub(channel)
        self.raw = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        self.entries = entries
        self.malformed_share = malformed_share
        self.rng = random.Random(seed)
        self.sent = self.answered = self.wrong = self.unexpected = 0
        self.codes = Counter()
        self.latencies = []

    async def one(self) -> None:
        self.sent += 1
        start = time.monotonic()
        kind = self.rng.random()
        code = "OK"
        try:
            if kind < self.malformed_share:
                expected = "INVALID_ARGUMENT"
                await self.raw(malformed(self.rng), timeout=120)
            elif kind < self.malformed_share + 0.15:
                expected = "OK"
                chosen = self.rng.sample(self.entries, self.rng.randint(2, 4))
                response = await self.stub.PredictBatch(
                    pb.PredictBatchRequest(structures=[r for r, _ in chosen]), timeout=120)
                self.wrong += sum(not matches(r, ref) for r, (_, ref) in zip(response.results, chosen))
            else:
                expected = "OK"
                request, ref = self.rng.choice(self.entries)
                response = await self.stub.Predict(request, timeout=120)
                self.wrong += not matches(response, ref)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        self.answered += 1
        self.codes[code] += 1
        if code != expected:
            self.unexpected += 1
        self.latencies.append(time.monotonic() - start)

    def summary(self, wall: float) -> dict:
        lat = np.asarray(self.latencies) * 1e3
        return {
            "sent": self.sent, "answered": self.answered, "unanswered": self.sent - self.answered,
            "wrong_answers": self.wrong, "unexpected_status": self.unexpected, "codes": dict(self.codes),
            "requests_per_s": self.answered / wall if wall else 0.0,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "max": float(lat.max())} if len(lat) else {},
        }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def capacity(target, entries, clients: int, seconds: float, malformed_share: float) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        load = Load(channel, entries, malformed_share, seed=1)
        end = time.monotonic() + seconds

        async def client():
            while time.monotonic() < end:
                await load.one()

        start = time.monotonic()
        await asyncio.gather(*[client() for _ in range(clients)])
        return load.summary(time.monotonic() - start)


async def soak(target, pid, entries, rate: float, args) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        load = Load(channel, entries, args.malformed, seed=2)
        rng = random.Random(3)
        tasks = set()
        samples = []
        start = time.monotonic()

        async def sampler():
            while True:
                samples.append((round(time.monotonic() - start, 1), rss_kib(pid)))
                await asyncio.sleep(args.rss_every_s)

        sampling = asyncio.ensure_future(sampler())
        t = start
        while t - start < args.duration_s:
            t += rng.expovariate(rate)  # Poisson arrivals
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(load.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        wall = time.monotonic() - start
        if tasks:
            await asyncio.wait(tasks, timeout=300)  # stragglers: still answered or counted unanswered
        sampling.cancel()
        samples.append((round(time.monotonic() - start, 1), rss_kib(pid)))
        result = load.summary(wall)
        result["offered_per_s"] = rate
        warm = [kib for s, kib in samples if s >= args.warmup_s] or [samples[-1][1]]
        result["rss_kib"] = {"first_after_warmup": warm[0], "last": samples[-1][1], "max": max(k for _, k in samples),
                             "samples": samples}
        result["rss_growth_percent"] = 100.0 * (samples[-1][1] - warm[0]) / warm[0]
        return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0, help="soak duration (default 600 s = 10 min)")
    p.add_argument("--capacity-s", type=float, default=20.0, help="closed-loop capacity measurement, s")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for the capacity measurement")
    p.add_argument("--load", type=float, default=0.8, help="offered load as a fraction of capacity")
    p.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests")
    p.add_argument("--warmup-s", type=float, default=30.0, help="soak time before the RSS baseline")
    p.add_argument("--rss-every-s", type=float, default=5.0)
    p.add_argument("--pool", type=int, default=24, help="distinct structures/requests")
    p.add_argument("--model", help="checkpoint to serve (default: a small random model, 8 channels)")
    p.add_argument("--out", help="JSON path (default bench/results/soak-<UTC>.json)")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.model:
        path = Path(args.model)
        model = load_model(path)
    else:
        model = random_field_model(heads=("sio2", "other"), seed=3)
        path = save_model(model, Path(tmp.name) / "soak.pt")
    entries = pool(model, args.pool, seed=0)
    log = open(Path(tmp.name) / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "macefield_server.cli.serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--threads", "1", "--model", f"soak={path}"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        while True:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("server did not start")
            if '"listening"' in line:
                port = json.loads(line)["port"]
                break
        target = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(target)
        stub = rpc.MaceFieldStub(channel)
        for _ in range(600):
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.5)
        channel.close()
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        print(f"server pid {server.pid} on {target}; measuring capacity for {args.capacity_s:g} s", flush=True)
        cap = asyncio.run(capacity(target, entries, args.clients, args.capacity_s, args.malformed))
        rate = args.load * cap["requests_per_s"]
        print(f"capacity {cap['requests_per_s']:.2f} req/s; soaking at {rate:.2f} req/s for {args.duration_s:g} s",
              flush=True)
        result = asyncio.run(soak(target, server.pid, entries, rate, args))
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log.seek(0)
    server_log = log.read()
    ok = (result["unanswered"] == 0 and result["wrong_answers"] == 0 and result["unexpected_status"] == 0
          and result["rss_growth_percent"] < 5.0 and cap["wrong_answers"] == 0 and cap["unexpected_status"] == 0)
    report = {
        "benchmark": "soak", "started_utc": started, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "note": "shared machine; server --threads 1"},
        "model": str(args.model or "random FieldMACE, 8 channels, O/Si, heads sio2/other"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "capacity": cap, "soak": result, "server_exit_code": exit_code,
        "server_tracebacks": server_log.count("Traceback"), "pass": bool(ok and exit_code == 0),
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"soak-{started}.json"
    write_json(out, report, say=False)
    s = result
    print(json.dumps({"pass": report["pass"], "sent": s["sent"], "unanswered": s["unanswered"],
                      "wrong_answers": s["wrong_answers"], "unexpected_status": s["unexpected_status"],
                      "codes": s["codes"], "rss_growth_percent": round(s["rss_growth_percent"], 2),
                      "capacity_per_s": round(cap["requests_per_s"], 2), "offered_per_s": round(rate, 2),
                      "latency_ms": s["latency_ms"], "out": str(out)}))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
