"""Host-side cost of one request, stage by stage: everything the server does outside the model evaluation.

For alpha-quartz (9, 72, 576, 4608 atoms) and a 135-atom BaTiO3 MD frame, single-threaded, in process:

  decode     PredictRequest bytes -> message (protobuf)
  validate   parse_request: field checks, element set, cell, extent, edge count + memory estimate
  neighbours the neighbour list and the admission checks on it (min distance, density)
  collate    graphs -> the batch's tensor dict (model dtype)
  h2d        the host->device moves of the CUDA path (on a CPU: the same tensors copied once)
  d2h        device->host: outputs to numpy, split per structure, finite check
  encode     result arrays -> PredictResponse -> bytes

``host_total`` is their sum: the work per structure from received bytes to sent bytes that is not the model
(``cpu_model_total``: the same without h2d, as a model served on the CPU runs it).
``process_prep_serving_total`` is what the serving process itself does per structure for a CPU model
with ``prep_mode: process`` (decode + validate + unpack (the worker's packed half list mirrored) + collate
+ d2h + encode); ``worker_list`` (not in it) is the worker's share: the list built and packed.
``device_nl_total`` is the host side of a CUDA batch whose neighbour lists are built on the device
(decode + validate + the copy of positions/cells + d2h + encode); ``device_collate`` (not in either total)
is that batch's preparation where the model runs: the copy, the search and the tensors
(:func:`macefield_server.engine.device_graph.collate_on_device`; on a CPU, vesin's CPU search).

``profile`` records where the time goes: every stage's median microseconds per structure for each case, and for
the 72-atom quartz the functions that take most of each stage (cProfile, cumulative microseconds per structure).

The prep stage's throughput (validate + neighbour list, as the server runs it) is measured with 1 and 2
workers of each prep mode (``thread``: a thread pool; ``process``: validation in process, the lists on
worker processes), round by round in turn with a control: SHA-256 of 1 MiB per task on the threads (C
code without the GIL), i.e. the parallelism the machine offers at that moment; and the share of a prep
task spent in the search without the GIL, which bounds what any number of threads can gain.

Usage (from the repository root):
    PYTHONPATH=server:client python bench/host_path.py [--out bench/results/host_path_cpu.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # single-threaded stages
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, write_json  # noqa: E402

BATIO3_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "batio3-md.xyz"  #: ../shared/data
OUTPUTS = ("energy", "forces", "stress")  #: what an NPT MD step asks for
QUARTZ_REPEATS = {9: (1, 1, 1), 72: (2, 2, 2), 576: (4, 4, 4), 4608: (8, 8, 8)}


def timed(fn: Callable[[], Any], min_repeats: int = 20, min_seconds: float = 0.3, max_repeats: int = 5000) -> dict:
    """Median and minimum seconds of ``fn()`` over repeats (one warm-up call first)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def cases(batio3: Optional[Path] = BATIO3_FRAMES, sizes: Sequence[int] = tuple(QUARTZ_REPEATS)) -> List[dict]:
    """[{name, atoms (ase.Atoms), head}] for the quartz sizes and (when the file exists) one BaTiO3 frame."""
    from macefield_client.structures import alpha_quartz

    out = [{"name": f"quartz-{n}", "atoms": alpha_quartz(repeat=QUARTZ_REPEATS[n], rattle=0.02, seed=1), "head": "sio2"}
           for n in sizes]
    if batio3 is not None and batio3.exists():
        import ase.io

        frame = ase.io.read(batio3, index=0)
        out.append({"name": f"batio3-{len(frame)}", "atoms": frame, "head": "batio3"})
    return out


def reference_memory(served) -> None:
    """A fixed memory model and budget, so that validation runs its edge count and memory estimate as served."""
    from macefield_server.serving.memory import Budget, MemoryModel

    if served.memory is None:
        served.memory = MemoryModel(per_edge=(2e3, 6e3, 2e4), per_atom=(1e4, 3e4, 1e5), source="fixed (benchmark)")
    if served.budget is None:
        served.budget = Budget.split(8 * 2**30, 1)


def _h2d(tensors: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    if device.type == "cuda":
        out = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        torch.cuda.synchronize(device)
        return out
    return {k: v.clone() for k, v in tensors.items()}  # the copies a device would make, here in host memory


def _d2h(raw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    return out


def stage_functions(served, case: dict, *, outputs=OUTPUTS, device: Optional[torch.device] = None) -> dict:
    """{stage: a function running it once for ``case``} (see the module docstring), and ``_row``: its sizes."""
    from macefield_client.contract import build_request
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_server.engine.device_graph import collate_on_device
    from macefield_server.engine.graph import collate, neighbour_list
    from macefield_server.engine.predict import check_finite, graded_head_indices, keep_requested, split_results
    from macefield_server.engine.response import engine_outputs, respond
    from macefield_server.serving.batcher import Timing
    from macefield_server.serving.config import LimitsConfig
    from macefield_server.serving.prep_pool import pack, unpack
    from macefield_server.serving.registry import ModelRegistry
    from macefield_server.serving.service import result_to_proto
    from macefield_server.serving.validation import parse_request, too_close, too_dense

    device = device or served.device
    registry = ModelRegistry([served])
    limits = LimitsConfig()
    atoms = case["atoms"]
    n = len(atoms)
    head = case["head"] if case["head"] in served.heads else ""  # another model's heads: its default
    data = build_request(atoms, outputs=list(outputs), head=head, request_id="bench").SerializeToString()
    request = pb.PredictRequest.FromString(data)
    parsed = parse_request(request, registry, limits)
    structure = parsed.structure
    cutoff = served.cutoff
    numbers = [int(z) for z in served.model.atomic_numbers]

    def neighbours():
        g = neighbour_list(structure, cutoff)
        if g.edge_index.shape[1] > limits.max_edges_per_structure:
            raise too_dense(int(g.edge_index.shape[1]), cutoff, limits)
        if g.closest is not None and g.closest.distance < limits.min_distance:
            raise too_close(g.closest, structure, limits)
        return g

    graph = neighbours()

    def do_collate(dev="cpu"):
        return collate([structure], [graph], atomic_numbers=numbers, head_index=[parsed.head_index],
                       dtype=served.dtype, device=dev)

    batch = do_collate()
    needed = engine_outputs(parsed.outputs)
    moved = _h2d(batch.tensors, device)
    raw = respond(served.model, moved, None, needed)
    raw = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    graded = graded_head_indices(served.model)

    def d2h():
        host = _d2h(raw)
        (r,) = split_results(batch, host, needed, graded)
        return check_finite(keep_requested(r, parsed.outputs), graph, structure.numbers)

    values = d2h()
    packed = pack(structure, cutoff)
    timing = Timing(queue_s=1e-3, compute_s=5e-2, total_s=5.1e-2, batch_structures=1, batch_atoms=n)

    def encode():
        return result_to_proto(parsed, values, timing).SerializeToString()

    def copy_geometry():  # the CUDA path with device neighbour lists: only positions, cells, numbers move
        return _h2d({"positions": torch.from_numpy(structure.positions), "cell": torch.from_numpy(structure.cell),
                     "numbers": torch.from_numpy(structure.numbers)}, device)

    def device_collate():  # the device path's batch: geometry copied once, lists built where the model runs
        collate_on_device([structure], cutoff=cutoff, atomic_numbers=numbers, head_index=[parsed.head_index],
                          dtype=served.dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return {
        "decode": lambda: pb.PredictRequest.FromString(data),
        "validate": lambda: parse_request(request, registry, limits),
        "neighbours": neighbours,
        "collate": do_collate,
        "h2d": lambda: _h2d(batch.tensors, device),
        "d2h": d2h,
        "encode": encode,
        "geometry_h2d": copy_geometry,
        "worker_list": lambda: pack(structure, cutoff),
        "unpack": lambda: unpack(packed),
        "device_collate": device_collate,
        "_row": {"name": case["name"], "atoms": n, "edges": int(graph.edge_index.shape[1]),
                 "request_bytes": len(data), "response_bytes": len(encode())},
    }


def stage_costs(served, case: dict, *, outputs=OUTPUTS, min_repeats: int = 20, min_seconds: float = 0.3,
                device: Optional[torch.device] = None) -> dict:
    """Seconds per structure of every host stage for one structure (see the module docstring)."""
    functions = stage_functions(served, case, outputs=outputs, device=device)
    n = functions["_row"]["atoms"]
    kw = {"min_repeats": min_repeats, "min_seconds": min_seconds}
    stages = {name: timed(fn, **kw) for name, fn in functions.items() if name != "_row"}
    host = ("decode", "validate", "neighbours", "collate", "h2d", "d2h", "encode")
    cpu = ("decode", "validate", "neighbours", "collate", "d2h", "encode")  # a CPU model: nothing is copied
    device_nl = ("decode", "validate", "geometry_h2d", "d2h", "encode")
    # prep_mode process, CPU model: what the serving process does (the list comes from a worker, mirrored here)
    serving_process = ("decode", "validate", "unpack", "collate", "d2h", "encode")
    row: Dict[str, Any] = {**functions["_row"], "stages": {}}
    for name, t in stages.items():
        row["stages"][name] = {**t, "us_per_atom": 1e6 * t["median_s"] / n, "min_us_per_atom": 1e6 * t["min_s"] / n}
    for key, names in (("host_total", host), ("cpu_model_total", cpu), ("device_nl_total", device_nl),
                       ("process_prep_serving_total", serving_process)):
        med = sum(stages[s]["median_s"] for s in names)
        low = sum(stages[s]["min_s"] for s in names)
        row[key] = {"stages": list(names), "median_s": med, "min_s": low, "us_per_atom": 1e6 * med / n,
                    "min_us_per_atom": 1e6 * low / n}
    return row


def _prep_task(served, case: dict) -> Callable[[Any], Any]:
    """One prep task of ``case`` as the server runs it (validate + neighbour list), or the control's kernel."""
    from macefield_client.contract import build_request
    from macefield_server.engine.graph import neighbour_list
    from macefield_server.serving.config import LimitsConfig
    from macefield_server.serving.registry import ModelRegistry
    from macefield_server.serving.validation import parse_request

    if case.get("control"):  # a GIL-free C kernel: how much parallelism the machine offers right now
        import hashlib

        blob = os.urandom(1 << 20)
        return lambda _: hashlib.sha256(blob).digest()
    registry = ModelRegistry([served])
    limits = LimitsConfig()
    request = build_request(case["atoms"], outputs=list(OUTPUTS),
                            head=case["head"] if case["head"] in served.heads else "")
    cutoff = served.cutoff

    def prep(_):
        parsed = parse_request(request, registry, limits)
        return neighbour_list(parsed.structure, cutoff)

    return prep


def _process_round(served, case: dict, loop: asyncio.AbstractEventLoop) -> Callable[[Any, int], Any]:
    """A round of ``structures`` concurrent requests of ``case`` as the server runs them in process prep mode:
    each validated on the event loop (``loop``: one for every round, as the server's), its neighbour list
    built on the worker processes of ``prep``."""
    from macefield_client.contract import build_request
    from macefield_server.serving.config import LimitsConfig
    from macefield_server.serving.registry import ModelRegistry
    from macefield_server.serving.validation import parse_request

    registry = ModelRegistry([served])
    limits = LimitsConfig()
    request = build_request(case["atoms"], outputs=list(OUTPUTS),
                            head=case["head"] if case["head"] in served.heads else "")

    async def one(prep):
        parsed = parse_request(request, registry, limits)
        return await prep.graphs([(parsed.structure, parsed.served.cutoff)])

    async def many(prep, structures):
        return await asyncio.gather(*(one(prep) for _ in range(structures)))

    return lambda prep, structures: loop.run_until_complete(many(prep, structures))


def prep_throughput(served, the_cases: List[dict], workers: Sequence[int] = (1, 2), structures: int = 64,
                    rounds: int = 7, modes: Sequence[str] = ("thread", "process")) -> List[dict]:
    """Atoms per second through the prep stage (validate + neighbour list) for each prep mode and pool size.

    ``thread``: each request a task (validate + list) on a thread pool of each size in ``workers``;
    ``process``: each request validated in this process and its list built on :class:`ProcessPrep`
    workers (the server's ``prep_mode: process``).  ``structures`` independent requests per round (as
    concurrent calls are).  The configurations and cases take turns round by round (the load from other
    work on the machine changes over seconds: interleaving exposes every configuration to the same load);
    per case the best and median round of each, and the speedup of each round against one thread in the
    same round.  The control (SHA-256, GIL-free C) runs on the threads only.  CPU time per structure is
    recorded too: the serving process's (all its threads) and, for ``process``, the workers' (/proc), with the
    workers' own rate (atoms per second of their CPU time, times the workers): what they would deliver with the
    cores to themselves, where the serving process's share competes with them on a small machine.
    """
    from macefield_server.serving.prep_pool import ProcessPrep

    configs = [(m, w) for m in modes for w in workers]
    threads = {w: ThreadPoolExecutor(max_workers=w) for w in workers}
    procs = {w: ProcessPrep(w) for w in workers} if "process" in modes else {}
    loop = asyncio.new_event_loop()
    runners: Dict[str, Dict[tuple, Callable[[], Any]]] = {}
    for c in the_cases:
        task = _prep_task(served, c)
        rnd = None if c.get("control") else _process_round(served, c, loop)
        runners[c["name"]] = {}
        for m, w in configs:
            if m == "thread":
                runners[c["name"]][(m, w)] = (lambda pool=threads[w], task=task:
                                              list(pool.map(task, range(structures))))
            elif rnd is not None:
                runners[c["name"]][(m, w)] = (lambda prep=procs[w], rnd=rnd: rnd(prep, structures))
    atoms = {c["name"]: (1 if c.get("control") else len(c["atoms"])) for c in the_cases}
    rates: Dict[str, Dict[tuple, List[float]]] = {n: {k: [] for k in r} for n, r in runners.items()}
    cpu: Dict[str, Dict[tuple, List[float]]] = {n: {k: [0.0, 0.0] for k in r} for n, r in runners.items()}
    try:
        for prep in procs.values():
            prep.warm()
        for by_config in runners.values():  # warm: per-thread calculators, first calls
            for run in by_config.values():
                run()
        for _ in range(rounds):
            for name, by_config in runners.items():
                for key, run in by_config.items():
                    workers_pids = procs[key[1]].pids() if key[0] == "process" else []
                    w0, c0 = _cpu_seconds(workers_pids), time.process_time()
                    t0 = time.perf_counter()
                    run()
                    rates[name][key].append(structures * atoms[name] / (time.perf_counter() - t0))
                    cpu[name][key][0] += time.process_time() - c0
                    cpu[name][key][1] += _cpu_seconds(workers_pids) - w0
    finally:
        for pool in threads.values():
            pool.shutdown()
        for prep in procs.values():
            prep.shutdown()
        loop.close()
    out = []
    for name, by_config in rates.items():
        one = by_config[("thread", workers[0])]
        for (m, w), r in by_config.items():
            speedup = [a / b for a, b in zip(r, one)]
            serving_cpu, workers_cpu = cpu[name][(m, w)]
            done = rounds * structures
            row = {"serving_cpu_us_per_structure": 1e6 * serving_cpu / done}
            if m == "process":  # the workers' own throughput: as if they had the cores to themselves
                row["workers_cpu_us_per_structure"] = 1e6 * workers_cpu / done
                row["workers_atoms_per_s"] = (w * done * atoms[name] / workers_cpu) if workers_cpu > 0 else None
            out.append({**row, "mode": m, "workers": w, "structure": name,
                        "atoms_per_s_median": statistics.median(r),
                        "atoms_per_s_best": max(r), "speedup_median": statistics.median(speedup),
                        "speedup_best_over_best": max(r) / max(one), "rounds": rounds,
                        "structures_per_round": structures})
    return out


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (/proc; clock-tick resolution)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone (a worker replaced)
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def wait_for_cores(seconds: float, want: float = 1.8, tasks: int = 16) -> dict:
    """Probe until two threads of the GIL-free control run ``want`` times one thread's rate, at most ``seconds``.

    Other work on a shared machine takes cores for minutes at a time; the prep measurement that follows
    is only meaningful while two cores are free.  Returns the seconds waited and the last probe's speedup.
    """
    import hashlib

    blob = os.urandom(1 << 20)
    start = time.perf_counter()
    passed = 0
    with ThreadPoolExecutor(max_workers=1) as one, ThreadPoolExecutor(max_workers=2) as two:
        while True:
            rates = []
            for pool in (one, two, one):  # 1, 2, 1 threads: a slow single-thread round alone does not pass
                t0 = time.perf_counter()
                list(pool.map(lambda _: hashlib.sha256(blob).digest(), range(tasks)))
                rates.append(tasks / (time.perf_counter() - t0))
            speedup = rates[1] / max(rates[0], rates[2])
            passed = passed + 1 if speedup >= want else 0
            waited = time.perf_counter() - start
            if passed >= 2 or waited >= seconds:  # two probes in a row
                return {"waited_s": waited, "probe_speedup": speedup, "wanted": want, "found": passed >= 2}
            time.sleep(1.0)


def gil_free_share(served, case: dict, repeats: int = 200) -> dict:
    """Of one prep task (validate + neighbour list), the share spent in vesin's search (C, GIL released).

    With a share f, n threads can run at most min(n, 1 / (1 - f)) times the single-thread rate: the rest
    holds the GIL.  Seconds are minima over ``repeats``.
    """
    from macefield_server.engine.graph import Structure, _padded_cell, canonical_positions, half_list

    task = _prep_task(served, case)
    structure = Structure.from_atoms(case["atoms"])
    cell = _padded_cell(structure, served.cutoff)
    positions = canonical_positions(structure, cell)
    total = timed(lambda: task(0), min_repeats=repeats, min_seconds=0.1)["min_s"]
    search = timed(lambda: half_list(positions, cell, structure.pbc, served.cutoff), min_repeats=repeats,
                   min_seconds=0.1)["min_s"]
    share = search / total
    return {"structure": case["name"], "task_s": total, "search_s": search, "gil_free_share": share,
            "two_worker_bound": min(2.0, 1.0 / max(1e-9, 1.0 - share))}


#: the stages a profile covers: the host path of a CPU or CUDA model with host lists, and the device-list path's
PROFILED = ("decode", "validate", "neighbours", "collate", "h2d", "d2h", "encode", "geometry_h2d")


def _where(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":  # a built-in: "{method 'reduce' of 'numpy.ufunc' objects}"
        return name
    for marker in ("/site-packages/", "/server/", "/client/", "/bench/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"


def profile_stages(served, case: dict, *, calls: int = 400, top: int = 10,
                   device: Optional[torch.device] = None) -> dict:
    """Where each stage's time goes for ``case``: per stage, the ``top`` functions by cumulative time (cProfile,
    ``calls`` runs of the stage), as microseconds and calls per structure.

    cProfile adds about a microsecond per Python call, so its totals exceed the stage's timed median
    (``profiled_us`` against the row's); the order and the split between functions are what it shows.
    """
    import cProfile
    import pstats

    functions = stage_functions(served, case, device=device)
    out: Dict[str, Any] = {"structure": case["name"], "atoms": functions["_row"]["atoms"], "calls": calls,
                           "stages": {}}
    for name in PROFILED:
        fn = functions[name]
        for _ in range(20):
            fn()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = []
        for key, (_, ncalls, tottime, cumtime, _) in stats.items():
            if "_lsprof" in key[2] or (key[0] == __file__ and key[2] == fn.__name__):  # the profiler, the stage itself
                continue
            rows.append({"function": _where(key), "calls": ncalls / calls, "cumulative_us": 1e6 * cumtime / calls,
                         "own_us": 1e6 * tottime / calls})
        rows.sort(key=lambda r: -r["cumulative_us"])
        total = sum(v[2] for v in stats.values())  # every function's own time: the whole profiled run
        out["stages"][name] = {"profiled_us": 1e6 * total / calls, "top": rows[:top]}
    return out


def host_breakdown(served, the_cases: List[dict], *, min_repeats: int = 20, min_seconds: float = 0.3,
                   device: Optional[torch.device] = None) -> List[dict]:
    """:func:`stage_costs` of every case (the GPU suite calls this next to its device timings)."""
    reference_memory(served)
    return [stage_costs(served, c, min_repeats=min_repeats, min_seconds=min_seconds, device=device)
            for c in the_cases]


def table(rows: List[dict]) -> str:
    names = ("decode", "validate", "neighbours", "collate", "h2d", "d2h", "encode")
    head = (f"{'structure':>12} {'atoms':>5} " + " ".join(f"{s:>10}" for s in names)
            + f" {'total':>8} {'dev-NL':>7} {'proc-srv':>8}")
    lines = ["us/atom, median (single thread)", head]
    for r in rows:
        lines.append(f"{r['name']:>12} {r['atoms']:>5} " + " ".join(f"{r['stages'][s]['us_per_atom']:>10.2f}"
                                                                      for s in names)
                     + f" {r['host_total']['us_per_atom']:>8.2f} {r['device_nl_total']['us_per_atom']:>7.2f}"
                     + f" {r['process_prep_serving_total']['us_per_atom']:>8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "host_path_cpu.json"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--label", default="", help="a free-text label stored in the JSON")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the prep throughput measurement")
    parser.add_argument("--wait-for-cores", type=float, default=0.0, metavar="S",
                        help="before the prep measurement, wait up to S seconds for two free cores (probed)")
    parser.add_argument("--backend", default=None, help="host neighbour-list library (default: the server's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from macefield_server.engine import graph
    from macefield_server.serving.registry import load_default_model

    if args.backend and hasattr(graph, "set_neighbour_backend"):
        graph.set_neighbour_backend(args.backend)
    served = load_default_model("cpu")
    the_cases = cases()
    kw = {"min_repeats": 5, "min_seconds": 0.05} if args.quick else {"min_repeats": 30, "min_seconds": 0.5}
    load_before = os.getloadavg()
    rows = host_breakdown(served, the_cases, **kw)
    print(table(rows), flush=True)
    profiled = next(c for c in the_cases if c["name"] == "quartz-72")
    profile = {"stages_us": {r["name"]: {k: 1e6 * v["median_s"] for k, v in r["stages"].items()} for r in rows},
               "quartz_72": profile_stages(served, profiled, calls=50 if args.quick else 400)}
    for name, stage in profile["quartz_72"]["stages"].items():
        first = stage["top"][0] if stage["top"] else {"function": "-", "cumulative_us": 0.0}
        print(f"profile quartz-72 {name}: {stage['profiled_us']:.0f} us profiled; top {first['function']} "
              f"{first['cumulative_us']:.0f} us", flush=True)
    control = {"name": "control-sha256", "atoms": the_cases[0]["atoms"], "head": "", "control": True}
    prep_cases = [c for c in the_cases if c["name"] in ("quartz-72", "quartz-576")] + [control]
    cores = wait_for_cores(args.wait_for_cores) if args.wait_for_cores > 0 else None
    if cores is not None:
        print(f"two cores: probe x{cores['probe_speedup']:.2f} after {cores['waited_s']:.0f} s", flush=True)
    load_prep = os.getloadavg()
    prep = prep_throughput(served, prep_cases, rounds=3 if args.quick else args.rounds)
    for p in prep:
        print(f"prep {p['structure']}: {p['mode']} x{p['workers']}: {p['atoms_per_s_best']:.3g} atoms/s best, "
              f"{p['atoms_per_s_median']:.3g} median (against 1 thread: x{p['speedup_best_over_best']:.2f} best "
              f"over best, same-round x{p['speedup_median']:.2f} median); CPU per structure: serving process "
              f"{p['serving_cpu_us_per_structure']:.0f} us"
              + (f", workers {p['workers_cpu_us_per_structure']:.0f} us (their own rate "
                 f"{p['workers_atoms_per_s'] or 0:.3g} atoms/s)" if p["mode"] == "process" else ""))
    shares = [gil_free_share(served, c) for c in prep_cases if not c.get("control")]
    for sh in shares:
        print(f"prep {sh['structure']}: {sh['gil_free_share']:.0%} of a task without the GIL "
              f"(2 workers at most x{sh['two_worker_bound']:.2f})")
    result = {
        "benchmark": "host_path",
        "label": args.label,
        "outputs": list(OUTPUTS),
        "model": served.name,
        "cutoff": served.cutoff,
        "neighbour_backend": graph.neighbour_backend() if hasattr(graph, "neighbour_backend") else "matscipy",
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "loadavg_before": load_before, "loadavg_before_prep": load_prep,
                     "loadavg_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "rows": rows,
        "profile": profile,
        "prep_throughput": prep,
        "prep_gil_free": shares,
        "prep_waited_for_cores": cores,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
