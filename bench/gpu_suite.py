#!/usr/bin/env python3
"""One-call GPU suite: correctness, engine throughput, served load and the cost of one MD step.

Runs on a bare GPU machine in about five minutes (``--budget-s``, default
240 s for the sections, plus imports and installs: every section stops
starting new points when its share is spent and the JSON is rewritten,
atomically, after each section, engine series and client level, so a killed
run still leaves results).  Sections:

1. ``correctness``: CUDA float64 against CPU float64 on a mixed batch (two
   heads, three fields, a SiO2 molecule, 72-atom alpha-quartz, 135-atom cubic
   BaTiO3) for every output, and cueq against e3nn on CUDA (float64 and
   float32) for the embedded default model and an MH-0-size random model;
   relative error = max |a - b| / max |a| per output over the batch.
2. ``engine``: structures/s, microseconds per atom and peak GPU memory of one
   engine pass (``respond``) against batch size (1, 4, 16, 64, 256 rattled
   72-atom quartz cells) for energy+forces and the full response, float32 and
   float64, e3nn and cueq, second order by loop and (e3nn only) vmap; for the
   64-channel default model and a random model of MACEField-MH-0's size
   (128x0e+128x1o, max_ell 3, correlation 3, 2 layers, r_max 6 A, 79 elements,
   3 heads).
3. ``server``: ``macefield-serve`` on the device (MH-0-size model, float32,
   backend auto) under closed-loop load from 1, 8, 64 and 256 clients over
   Predict and PredictStream, against batching off (``max_structures: 1``,
   same backend: only batching differs) and direct in-process batched
   evaluation (bench/load.py's machinery).  Both servers are started before
   the correctness section, so that they load (and convert) their model while
   it runs, and are SERVING before the engine section starts timing.  Also
   ``ensemble``: the client's ensemble MD (``macefield_client.workflows.Ensemble``,
   each step's N replicas in one PredictBatch call to the batching server) of
   the 72-atom cell, N = 8 and 32, Langevin 300 K, a constant field, energy,
   forces, stress and P every step, and the same with alpha every step: steps/s,
   replica-steps/s and the mean batch the client sent.
4. ``md_step``: where one MD step of a single PredictStream client goes:
   decode, validation, neighbour list, collate, host-to-device, compute,
   device-to-host, split, encode (in-process, the server's own functions), and
   the end-to-end stream round trip; the rest is gRPC and scheduling.  Also
   ``host_path``: bench/host_path.py's breakdown for 72- and 576-atom quartz on
   the served model, summarised next to the engine's best E+F us/atom
   (``host_path_*`` checks: ``limited_by`` host or device, with host neighbour lists;
   ``device_nl_limited_by`` with the lists built on the device, whose search
   and collation, ``device_collate``, are timed on the GPU).

Every model is made once per (model, dtype, device, backend) and kept
(:class:`ModelCache`; ``conversions`` in the JSON says what each took):
converting the MH-0-size model to cueq is the slowest step of the suite on
cuEquivariance's CPU fallback.  Without cuEquivariance's CUDA kernels
(``cuequivariance_ops_torch``) the suite runs e3nn only and says so in
``notes``.  ``--smoke`` runs every code path on CPU with tiny models and
structures (tests/test_gpu_suite.py; its numbers mean nothing).

Before anything is built it checks the machine (a few seconds): without a
visible CUDA device (the default device is cuda; ``--device cpu`` runs the
full suite on the CPU, ``--smoke`` defaults to it) or with a required module
that does not import (:data:`REQUIRED_MODULES`), it prints one line per
problem ("no CUDA device visible: ..." with what torch reports; "missing
packages: ..."), writes the environment report (torch, its CUDA build, the
driver's error, every module's version) as the JSON and exits with code 2.
SIGTERM, SIGINT or SIGHUP write what was measured (``terminated`` in the
JSON), stop the servers (SIGKILL after 5 s) and exit with 128 + the signal
number; a second signal ends the suite at once.  The servers run in their
own session and get SIGKILL from the kernel when the suite dies, however it
dies (Linux ``PR_SET_PDEATHSIG``): no server outlives it.

Optional, off by default (``--sections ... hysteresis``): ``hysteresis``, the published P-E loop
(arXiv:2508.17870) on the embedded default model served on the device: the built-in 135-atom BaTiO3 cell,
E0 = 0.3636 V/A along z, one cosine cycle of ``--hysteresis-period-ps`` (default 200 ps: 100 000 steps of
2 fs), 0 K with damping 0.02 /fs, head batio3; Pr, Ec, Ps and the wall time beside the paper's numbers.
It runs to the end whatever ``--budget-s`` says (the loop is all or nothing), so it is not in the default
sections; ``--smoke`` shortens it to 10 steps.

On a GPU host without a package registry (see bench/gpu_wheels.sh for the two steps)::

    PYTHONPATH=/tmp/site:/tmp/site-ops:client:server python3 bench/gpu_suite.py --out $OUT

Writes ``gpu_suite-<device>-<UTC>.json``, a short ``.txt`` summary and the two
servers' logs (``...-server-batching.log``, ``...-server-no-batching.log``,
the last 2 MiB of each) in ``--out`` (default: $OUT if set, else
bench/results): four files.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from load import Server  # noqa: E402  (bench/load.py: standard library and numpy only at import)

FULL = ("energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability")
EF = ("energy", "forces")
#: MACEField-MH-0 (arXiv 2508.17870; checkpoint MACEField-MH-0-omat-dielectric.model)
MH0_HEADS = ["pt_head", "mp-dielectric", "mp-ferroelectric"]
TARGETS = {
    "cueq_vs_e3nn_float64": 1e-10,
    # a float32-trained checkpoint in float64 (the embedded default model): its coupling tensors are float32
    # numbers, so the two backends agree to their precision (4e-9 measured on CPU), see docs/serving.md
    "cueq_vs_e3nn_float64_float32_coupling": 1e-8,
    "cueq_vs_e3nn_float32": 1e-5,
    "cuda_vs_cpu_float64": 1e-8,
    "batching_gain_full": 10.0,
    "full_over_energy_forces": 4.0,
    "cueq_over_e3nn_mh0": 2.0,
    "served_over_direct_64_clients": 0.8,
    "anchor_us_per_atom_energy_forces": 3.0,  # published: large MACE on an H100, energy+forces
}


# ------------------------------------------------------------------ structures
def alpha_quartz(repeat=(2, 2, 2), rattle=0.0, seed=0):
    """alpha-quartz at the experimental cell (macefield_client.structures, checked by tests/test_structures.py)."""
    from macefield_client.structures import alpha_quartz as build

    return build(repeat=repeat, rattle=rattle, seed=seed)


def cubic_batio3(repeat=(3, 3, 3), a=4.00):
    """Cubic perovskite BaTiO3 (Pm-3m, a = 4.00 A): Ti-O 2.00 A, Ba-O 2.83 A."""
    from ase import Atoms

    cell = Atoms("BaTiO3", cell=[a, a, a], pbc=True,
                 scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)])
    return cell * repeat


def sio2_molecule(bond=1.52):
    """Linear O=Si=O (gas-phase SiO2, Si-O about 1.52 A)."""
    from ase import Atoms

    return Atoms("OSiO", positions=[(-bond, 0, 0), (0, 0, 0), (bond, 0, 0)], pbc=False)


def check_structures():
    """Coordination and bond lengths of the suite's structures (AssertionError if wrong)."""
    from ase.neighborlist import neighbor_list

    q = alpha_quartz((1, 1, 1))
    i, j, d = neighbor_list("ijd", q, 2.0)
    si = [k for k, z in enumerate(q.numbers) if z == 14]
    assert all(sum(i == k) == 4 for k in si), "quartz: every Si must have 4 O within 2 A"
    assert np.all(q.numbers[j[np.isin(i, si)]] == 8)
    bonds = np.unique(np.round(d[np.isin(i, si)], 3))
    assert np.allclose(bonds, [1.605, 1.614], atol=0.003), bonds
    b = cubic_batio3((1, 1, 1))
    i, j, d = neighbor_list("ijd", b, 2.1)
    ti = int(np.flatnonzero(b.numbers == 22)[0])
    assert sum(i == ti) == 6 and np.allclose(d[i == ti], 2.0)
    assert len(alpha_quartz()) == 72 and len(cubic_batio3()) == 135
    return {"quartz_si_o_A": bonds.tolist(), "batio3_ti_o_A": 2.0, "sio2_molecule_si_o_A": 1.52}


# ------------------------------------------------------------------ helpers
class Budget:
    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.total = total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def until(self, fraction_end: float) -> float:
        """Monotonic deadline at ``fraction_end`` of the whole budget."""
        return self.start + self.total * fraction_end


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_errors(a_list, b_list, keys=FULL):
    out = {}
    for key in keys:
        a = [r[key] for r in a_list if key in r]
        b = [r[key] for r in b_list if key in r]
        if not a:
            continue
        scale = max(float(np.abs(x).max()) for x in a)
        out[key] = max(float(np.abs(x - y).max()) for x, y in zip(a, b)) / max(scale, 1e-300)
    return out


def is_oom(exc: BaseException) -> bool:
    from macefield_server.serving.engine_backend import is_out_of_memory

    return is_out_of_memory(exc)


def mh0_architecture(smoke: bool):
    from macefield_server.engine import default_architecture

    if smoke:  # MH-0's layout (L=1, correlation 3, three heads) at the cheapest width and max_ell (conversion ~2 s)
        return default_architecture([8, 14, 22, 56], heads=MH0_HEADS, channels=8, max_L=1, max_ell=1, correlation=3,
                                    r_max=4.5, radial_MLP=(16, 16), mlp_channels=8)
    return default_architecture(list(range(1, 80)), heads=MH0_HEADS, channels=128, max_L=1, max_ell=3,
                                correlation=3, r_max=6.0, num_interactions=2, radial_MLP=(64, 64, 64),
                                mlp_channels=16, avg_num_neighbors=40.0)


def build_models(smoke: bool):
    """{name: e3nn float64 model on CPU}: the embedded default model (64 channels) and an MH-0-size random one."""
    import torch

    from macefield_server.engine import build_field_mace, default_architecture
    from macefield_server.serving.registry import load_default_model

    if smoke:
        arch = default_architecture([8, 14, 22, 56], heads=["sio2", "batio3"], channels=8, max_L=1, max_ell=2,
                                    correlation=2, r_max=4.5, radial_MLP=(16, 16), mlp_channels=8)
        torch.manual_seed(0)
        default = build_field_mace(arch, dtype=torch.float64)
    else:
        default = load_default_model(dtype="float64").model
    torch.manual_seed(1)
    mh0 = build_field_mace(mh0_architecture(smoke), dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero field coupling, like a trained model
        for model in (default, mh0):
            for p in model.field_linear.parameters():
                if not p.abs().sum():
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
    return {"default": default.eval(), "mh0": mh0.eval()}


class ModelCache:
    """The suite's models in every (dtype, device, backend) it uses, each made once and kept.

    ``base``: {name: e3nn float64 model on CPU}, never modified (every model
    is a copy).  A cueq model is converted from the cached e3nn model of the
    same dtype and device.  ``log``: one entry per model made, with seconds.
    """

    def __init__(self, base):
        self.base = base
        self._made = {}
        self.log = []

    def get(self, name, dtype, device, backend):
        import copy

        import torch

        from macefield_server.engine.cueq import to_cueq

        device = torch.device(device)
        key = (name, dtype, device, backend)
        if key not in self._made:
            source = self.get(name, dtype, device, "e3nn") if backend == "cueq" else self.base[name]
            t0 = time.monotonic()
            if backend == "cueq":
                model = to_cueq(source)
            else:
                model = copy.deepcopy(source).to(dtype=dtype, device=device)
                for p in model.parameters():
                    p.requires_grad_(False)
            self._made[key] = model
            self.log.append({"model": name, "dtype": str(dtype)[6:], "device": str(device), "backend": backend,
                             "seconds": round(time.monotonic() - t0, 2)})
        return self._made[key]


#: modules the suite cannot run without, in import order (mace before e3nn: torch >= 2.6); mace.modules, as the
#: server imports it, imports torchmetrics (mace.tools.train), which the device has preinstalled
REQUIRED_MODULES = ("mace.modules", "e3nn", "torchmetrics", "ase", "grpc", "grpc_health", "macefield_server",
                    "macefield_client")
#: cuEquivariance: without it (or without its CUDA kernels, cuequivariance_ops_torch, whose libcue_ops needs the
#: CUDA libraries) the suite runs e3nn only and says so
OPTIONAL_MODULES = ("cuequivariance", "cuequivariance_torch", "cuequivariance_ops_torch")
#: exit code when the machine cannot run the suite (no CUDA device, a required module missing)
EXIT_UNUSABLE = 2


def import_report(names: Sequence[str]) -> dict[str, str]:
    """{package: its version ("?" when it has none), or "not importable: <why>"}, importing each module of
    ``names`` in order (``mace.modules`` is reported as ``mace``)."""
    report = {}
    for name in names:
        package = name.split(".")[0]
        try:
            importlib.import_module(name)
            report[package] = str(getattr(sys.modules[package], "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - any import failure (a missing shared library too) is reported
            report[package] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    return report


def missing_line(report: dict[str, str], required: Sequence[str] = REQUIRED_MODULES) -> str | None:
    """One line naming every required module of ``report`` that does not import, or None."""
    packages = [name.split(".")[0] for name in required]
    missing = [f"{name} ({report[name][len('not importable: '):]})" for name in packages
               if report.get(name, "").startswith("not importable")]
    return "missing packages: " + "; ".join(missing) if missing else None


def cuda_report() -> dict[str, object]:
    """What torch says about CUDA: build, availability, device count, the driver's error when unusable."""
    import torch

    report: dict[str, object] = {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
                                 "cuda_available": torch.cuda.is_available(),
                                 "cuda_device_count": torch.cuda.device_count(),
                                 "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                 "dev_nvidia": sorted(str(p) for p in Path("/dev").glob("nvidia*"))}
    driver = Path("/proc/driver/nvidia/version")
    report["nvidia_driver"] = driver.read_text().splitlines()[0] if driver.is_file() else None
    if not report["cuda_available"]:
        try:
            torch.cuda.init()
            report["cuda_init_error"] = None
        except Exception as exc:  # noqa: BLE001 - the reason CUDA is unusable, reported as is
            report["cuda_init_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return report


def cuda_line(device, cuda: dict[str, object]) -> str | None:
    """None when ``device`` (a torch.device) is usable, else one line saying what torch reports."""
    if device.type != "cuda":
        return None
    count = int(cuda["cuda_device_count"]) if cuda["cuda_available"] else 0
    if count and (device.index or 0) < count:
        return None
    what = (f"torch {cuda['torch']} (CUDA build {cuda['torch_cuda_build']}), torch.cuda.is_available() "
            f"{cuda['cuda_available']}, {count} device(s), CUDA_VISIBLE_DEVICES={cuda['CUDA_VISIBLE_DEVICES']}")
    if cuda.get("cuda_init_error"):
        what += f", torch.cuda.init(): {str(cuda['cuda_init_error']).splitlines()[0]}"
    if count:
        return f"no CUDA device {device} visible: {what}"
    return f"no CUDA device visible: {what} (--device cpu runs the full suite on the CPU)"


def preflight(device) -> dict[str, object]:
    """The environment report (JSON-ready) and ``problems``: one line per reason the suite cannot run here.

    Imports every required and optional module once (a few seconds: mace);
    touches the GPU only through torch's CUDA queries, never allocating.
    """
    cuda = cuda_report()
    modules = import_report(REQUIRED_MODULES + OPTIONAL_MODULES)
    env: dict[str, object] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "machine": platform.machine(), "device": str(device), **cuda}
    env.update({f"{name}_version": version for name, version in modules.items()})
    env["problems"] = [line for line in (cuda_line(device, cuda), missing_line(modules)) if line]
    return env


def environment(env: dict[str, object], device) -> dict[str, object]:
    """``env`` (from :func:`preflight`, the device usable) with the GPU's properties and cueq's availability."""
    import torch

    from macefield_server.engine.cueq import cueq_import_error, cueq_kernels_available

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    missing = cueq_import_error()
    env["cueq"] = missing is None
    env["cueq_kernels"] = cueq_kernels_available()
    return env


# ------------------------------------------------------------------ signals and child processes
#: signals that stop the suite in order: the sections measured so far are written first, then the servers stopped
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Terminated(BaseException):
    """Raised in the main thread by a stop signal (not an Exception: no section's error handling catches it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the stop signal received, if any: the handler's exception can land inside a library callback that logs and
#: swallows every exception (an asyncio callback, a finaliser), so the suite also checks this between steps
_STOPPED: list[int] = []


def check_stop() -> None:
    """Raise :class:`Terminated` if a stop signal arrived (and its first raise was swallowed)."""
    if _STOPPED:
        raise Terminated(_STOPPED[0])


def stop_on_signals(on_stop: Callable[[str], None]) -> None:
    """Install handlers for :data:`STOP_SIGNALS`: ``on_stop(signal name)``, then :class:`Terminated`.

    A second stop signal kills the suite at once (default action); its
    servers die with it (:class:`TiedServer`).
    """

    def handler(signum: int, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _STOPPED.append(signum)
        on_stop(signal.Signals(signum).name)
        raise Terminated(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it dies (Linux), and exits at once
    if ``parent_pid`` is already gone.  Start children from the main thread (the kernel watches the thread)."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the suite died between fork and prctl
            os._exit(1)

    return preexec


# ------------------------------------------------------------------ 1. correctness
def correctness(cache, device, args, record, deadline):
    import torch

    from macefield_server.engine import predict
    from macefield_server.engine.contraction_basis import basis_precision

    q = alpha_quartz((1, 1, 1) if args.smoke else (2, 2, 2), rattle=0.02, seed=1)
    b = cubic_batio3((2, 2, 1) if args.smoke else (3, 3, 3))
    b.rattle(0.02, seed=2)
    atoms = [q, sio2_molecule(), b]
    fields = [[0.05, -0.02, 0.03], [0.0, 0.04, -0.01], [-0.03, 0.0, 0.05]]
    out = record["sections"]["correctness"] = {"structures": {"n_atoms": [len(a) for a in atoms], "heads": None}}
    default = cache.base["default"]
    heads = [default.heads[0], default.heads[-1], default.heads[-1]]
    out["structures"]["heads"] = heads
    cpu = predict(default, atoms, electric_fields=fields, heads=heads, outputs="all")
    if device.type == "cuda":
        cuda = predict(cache.get("default", torch.float64, device, "e3nn"), atoms, electric_fields=fields, heads=heads,
                       outputs="all")
        out["cuda_vs_cpu_float64_default"] = rel_errors(cpu, cuda)
    comparisons = {}
    if record["environment"]["cueq_measured"]:
        for name, model in cache.base.items():
            hs = [model.heads[i % len(model.heads)] for i in range(len(atoms))]
            for dtype in (torch.float64, torch.float32):
                if time.monotonic() > deadline:
                    record["notes"].append("correctness: budget spent before every cueq comparison")
                    break
                ref = predict(cache.get(name, dtype, device, "e3nn"), atoms, electric_fields=fields, heads=hs,
                              outputs="all")
                got = predict(cache.get(name, dtype, device, "cueq"), atoms, electric_fields=fields, heads=hs,
                              outputs="all")
                comparisons[f"{name}_{str(dtype)[6:]}"] = rel_errors(ref, got)
    out["cueq_vs_e3nn"] = comparisons
    out["coupling_tensor_precision"] = {name: str(basis_precision(u for n, u in model.named_buffers()
                                                                  if ".U_matrix_" in n))[6:]
                                        for name, model in cache.base.items()}
    return out


# ------------------------------------------------------------------ 2. engine throughput
def engine(cache, device, args, record, deadline):
    import torch

    from macefield_server.engine import Structure, prepare_batch
    from macefield_server.engine.graph import neighbour_list
    from macefield_server.engine.response import respond

    frames = [alpha_quartz((1, 1, 1) if args.smoke else (2, 2, 2), rattle=0.02, seed=s) for s in range(8)]
    n_atoms = len(frames[0])
    backends = ["e3nn"] + (["cueq"] if record["environment"]["cueq_measured"] else [])
    dtypes = [torch.float32, torch.float64]
    series = []
    for name in ("mh0",) if args.smoke else ("mh0", "default"):  # smoke: the code paths once
        for dtype in dtypes:
            for backend in backends:
                for tier, outputs in (("energy_forces", EF), ("full", FULL)):
                    strategies = ["loop"] + (["vmap"] if backend == "e3nn" and tier == "full" else [])
                    for strategy in strategies:
                        series.append((name, dtype, backend, tier, outputs, strategy))
    results = []
    out = record["sections"]["engine"] = {"series": results}
    per_series = max(1.0, (deadline - time.monotonic()) / max(len(series), 1))
    for name, dtype, backend, tier, outputs, strategy in series:
        if time.monotonic() > deadline:
            record["notes"].append("engine: budget spent; later series not measured")
            break
        model = cache.get(name, dtype, device, backend)  # made once: the correctness section made most
        graphs = [neighbour_list(Structure.from_atoms(a), float(model.r_max)) for a in frames]
        row = {"model": name, "dtype": str(dtype)[6:], "backend": backend, "outputs": tier, "second_order": strategy,
               "n_atoms": n_atoms, "edges_per_structure": int(np.mean([g.edge_index.shape[1] for g in graphs])),
               "points": []}
        series_end = min(deadline, time.monotonic() + per_series)
        for size in args.batch_sizes:
            structures = [Structure.from_atoms(frames[i % 8], electric_field=[0.01 * (i % 3), 0.0, 0.02],
                                               head=model.heads[i % len(model.heads)]) for i in range(size)]
            try:
                batch = prepare_batch(model, structures, graphs=[graphs[i % 8] for i in range(size)])
                wanted = frozenset(outputs)

                def call(tensors=batch.tensors):
                    respond(model, tensors, None, wanted, second_order=strategy)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                samples = timed(call, device, until=min(series_end, time.monotonic() + args.point_s),
                                min_repeats=args.min_repeats)
                seconds = statistics.median(samples)
                point = {"structures": size, "seconds": seconds, "repeats": len(samples),
                         "structures_per_s": size / seconds, "us_per_atom": 1e6 * seconds / (size * n_atoms)}
                if device.type == "cuda":
                    point["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                del batch, call  # the next size's peak must not see this batch
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    point = {"structures": size, "error": f"{type(exc).__name__}: {exc}"[:300]}
                else:
                    point = {"structures": size, "oom": True}
                row["points"].append(point)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            row["points"].append(point)
            # stop growing when the next batch (about 4x the time) would not fit this series' share
            if time.monotonic() + 4 * seconds * 2 > series_end:
                break
        results.append(row)
        save(record)  # a killed suite keeps the series measured
        print(json.dumps({k: v for k, v in row.items() if k != "points"} | {"points": len(row["points"])}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next series starts from the same allocator state
    return out


def timed(fn, device, until: float, min_repeats: int = 2, max_repeats: int = 10):
    fn()  # warm-up (allocator, kernel selection)
    sync(device)
    samples = []
    while len(samples) < min_repeats or (len(samples) < max_repeats and time.monotonic() < until):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


# ------------------------------------------------------------------ 3. served throughput
async def closed_loop_stream(port: int, atoms, clients: int, duration: float):
    """Each client: one PredictStream, one request in flight (an MD code stepping)."""
    import grpc
    from load import summarise
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc

    base = dict(atomic_numbers=[int(z) for z in atoms.numbers], positions=np.asarray(atoms.positions).ravel().tolist(),
                cell=np.asarray(atoms.cell).ravel().tolist(), pbc=[bool(p) for p in atoms.pbc], outputs=list(FULL))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(clients, 16))]
    latencies, batch_sizes, counts = [], [], [0] * clients
    start = time.perf_counter()

    async def client(k: int):
        rng = np.random.default_rng(k)
        call = rpc.MaceFieldStub(channels[k % len(channels)]).PredictStream(timeout=3600)
        while time.perf_counter() - start < duration or counts[k] < 1:
            t0 = time.perf_counter()
            await call.write(pb.PredictRequest(request_id=f"s{k}-{counts[k]}",
                                               electric_field=rng.normal(0, 0.01, 3).tolist(), **base))
            response = await call.read()
            latencies.append(time.perf_counter() - t0)
            batch_sizes.append(response.timing.batch_structures)
            counts[k] += 1
        await call.done_writing()

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    for c in channels:
        await c.close()
    return summarise(latencies, sum(counts), wall, batch_sizes)


#: the served model: MH-0 size in float32 on the device, backend auto (cueq where its kernels import)
SERVED_DTYPE, SERVED_BACKEND = "float32", "auto"
#: the end of a server log that is kept in the output folder
LOG_TAIL_BYTES = 2 * 2**20


def server_options(args):
    threads = 1 if args.smoke else min(8, os.cpu_count() or 1)
    return argparse.Namespace(threads=threads, max_wait_ms=5.0, duration=args.load_s, min_per_client=1)


class TiedServer(Server):
    """bench/load.py's ``Server`` in its own session (process group), killed by the kernel when the suite dies
    (SIGKILL included, :func:`die_with_parent`) and stopped group-wide.  Start it from the main thread."""

    def __init__(self, checkpoint: Path, max_structures: int, args, workdir: Path, extra_args=(),
                 log_path: Path | None = None):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("start servers from the main thread: they die with the thread that made them")
        config = workdir / f"serve-{max_structures}.yaml"
        config.write_text(f"batching: {{max_structures: {max_structures}, max_wait_ms: {args.max_wait_ms}}}\n"
                          "warmup_passes: 2\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.log_path = Path(log_path or workdir / f"server-{max_structures}.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the server's stderr until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "macefield_server.cli.serve", "--config", str(config), "--model",
             f"bench={checkpoint}", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--threads", str(args.threads), *extra_args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()))  # noqa: PLW1509 - prctl and getppid only, no allocation
        self._port = None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM to the group, SIGKILL after ``timeout_s`` seconds; the exit code (idempotent)."""
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return code


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to process group ``pgid`` (nothing if it is gone)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_servers(cache, device, args, workdir: Path, out_dir: Path, stem: str):
    """{label: TiedServer} for the served section, started at once (they load while other sections run).

    The checkpoint is written from a float32 copy (the cache's): the float64
    model every other section uses is never touched.  Each server's log goes to
    ``out_dir`` (so that a server that fails leaves its reason there).
    """
    import torch

    from macefield_server.engine import save_model

    checkpoint = save_model(cache.get("mh0", torch.float32, "cpu", "e3nn"), workdir / "mh0.pt")
    extra = ["--device", str(device), "--dtype", SERVED_DTYPE, "--backend", SERVED_BACKEND]
    opts = server_options(args)
    return {label: TiedServer(checkpoint, size, opts, workdir, extra, log_path=out_dir / f"{stem}-server-{label}.log")
            for label, size in (("batching", max(args.clients)), ("no-batching", 1))}


def stop_servers(servers, timeout_s: float = 60.0) -> dict:
    """Exit codes (SIGKILL after ``timeout_s`` seconds each); each log cut to its last LOG_TAIL_BYTES
    (idempotent)."""
    codes = {label: server.stop(timeout_s) for label, server in servers.items()}
    for server in servers.values():
        size = server.log_path.stat().st_size
        if size > LOG_TAIL_BYTES:
            with server.log_path.open("rb") as f:
                f.seek(size - LOG_TAIL_BYTES)
                tail = f.read()
            server.log_path.write_bytes(b"[... first %d bytes cut ...]\n" % (size - LOG_TAIL_BYTES) + tail)
    return codes


def served(cache, servers, device, args, record, deadline):
    """The served section (``record["sections"]["server"]``, saved after each client level) and md_step.

    Stops no server: :func:`main` does, after the section or on a stop signal.
    """
    import torch
    from load import closed_loop, run_direct

    from macefield_server.serving.config import BatchingConfig
    from macefield_server.engine import Structure, prepare_batch
    from macefield_server.engine.cueq import resolve_backend

    atoms = alpha_quartz((1, 1, 1) if args.smoke else (2, 2, 2), rattle=0.02, seed=3)
    opts = server_options(args)
    top = max(args.clients)
    out = record["sections"]["server"] = {"model": "mh0", "dtype": SERVED_DTYPE, "backend": SERVED_BACKEND,
                                          "n_atoms": len(atoms), "clients": args.clients,
                                          "duration_s": args.load_s, "results": {}}
    for server in servers.values():
        server.wait_serving(timeout=max(60.0, deadline - time.monotonic()))
    out["backend_resolved"] = resolve_backend(SERVED_BACKEND, device)[0]
    direct_model = cache.get("mh0", getattr(torch, SERVED_DTYPE), device, out["backend_resolved"])
    edges = prepare_batch(direct_model, [Structure.from_atoms(atoms)]).num_edges
    limits = BatchingConfig().limits_for(device.type)
    warm = argparse.Namespace(duration=0.5, min_per_client=1)
    for server in servers.values():
        asyncio.run(closed_loop(server.port, atoms, 8, warm))
    run_direct(direct_model, atoms, 8, argparse.Namespace(duration=0.5, min_per_client=1, edges=edges), (top, *limits))
    for clients in args.clients:
        if time.monotonic() > deadline:
            record["notes"].append(f"server: budget spent before {clients} clients")
            break
        row = {}
        row["predict_batching"] = asyncio.run(closed_loop(servers["batching"].port, atoms, clients, opts))
        row["stream_batching"] = asyncio.run(
            closed_loop_stream(servers["batching"].port, atoms, clients, args.load_s))
        row["predict_no_batching"] = asyncio.run(closed_loop(servers["no-batching"].port, atoms, clients, opts))
        row["direct"] = run_direct(direct_model, atoms, clients,
                                   argparse.Namespace(duration=args.load_s, min_per_client=1, edges=edges),
                                   (top, *limits))
        for v in row.values():
            v.pop("_latencies"), v.pop("_batch_sizes")
        out["results"][str(clients)] = row
        save(record)  # a killed suite keeps the levels measured
        print(json.dumps({"clients": clients, **{k: v["throughput_sps"] for k, v in row.items()}}), flush=True)
        check_stop()
    try:
        out["ensemble"] = ensemble_steps(servers["batching"].port, atoms, args, record, deadline)
    except Exception as exc:  # noqa: BLE001 - the rest of the section stands
        out["ensemble"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        record["notes"].append(f"server: ensemble failed: {out['ensemble']['error']}")
    save(record)
    check_stop()
    md = md_step(direct_model, atoms, device, args, servers["batching"].port)
    return out, md


def ensemble_steps(port: int, atoms, args, record, deadline) -> dict:
    """Ensemble MD through the served model: N replicas in lockstep, each step one PredictBatch call (E, F,
    stress, P; and with alpha every step), after one untimed step."""
    from macefield_client import Client
    from macefield_client.workflows import Ensemble

    sizes, steps = ((2,), 2) if args.smoke else ((8, 32), 10)
    out: dict = {"n_atoms": len(atoms), "steps": steps, "thermostat": "langevin 300 K, 1 fs",
                 "field_V_A": [0.0, 0.0, 0.01], "results": {}}
    with Client(f"127.0.0.1:{port}") as client:
        for n in sizes:
            for alpha in (False, True):
                label = f"{n}_{'alpha' if alpha else 'efp'}"
                if time.monotonic() > deadline:
                    record["notes"].append(f"server: budget spent before ensemble {label}")
                    return out
                ens = Ensemble(client, atoms, replicas=n, temperature=300.0, fields=(0.0, 0.0, 0.01), timestep_fs=1.0,
                               record_every=1, record_alpha=alpha, seed=0)
                ens.run(1)  # the starting state and one step: warm-up
                calls = ens.gatherer.calls
                t0 = time.perf_counter()
                ens.run(steps)
                wall = time.perf_counter() - t0
                out["results"][label] = {"replicas": n, "alpha": alpha, "steps_per_s": steps / wall,
                                         "replica_steps_per_s": n * steps / wall, "ms_per_step": 1e3 * wall / steps,
                                         "calls_per_step": (ens.gatherer.calls - calls) / steps,
                                         "mean_batch": ens.mean_batch}
                print(json.dumps({"ensemble": label, "steps_per_s": out["results"][label]["steps_per_s"]}), flush=True)
    return out


#: the published loop (arXiv:2508.17870): 135-atom BaTiO3, 0 K with damping, T = 200 ps
HYSTERESIS_PUBLISHED = {"period_ps": 200.0, "amplitude_V_A": 0.3636,
                        "single_material_mace_field": {"remanent_polarization_uC_cm2": 54.5,
                                                       "coercive_field_MV_cm": 16.5},
                        "pbe_allegro_pol": {"remanent_polarization_uC_cm2": 54.8, "coercive_field_MV_cm": 18.1}}


def hysteresis_loop(device, args, record, workdir: Path, out_dir: Path, stem: str) -> None:
    """The optional ``hysteresis`` section: the published P-E loop on the embedded default model, served on
    ``device`` by its own ``macefield-serve`` (stopped at the end); ``record["sections"]["hysteresis"]``."""
    from macefield_client import Client
    from macefield_client.structures import perovskite_batio3
    from macefield_client.workflows import hysteresis

    atoms = perovskite_batio3(repeat=(3, 3, 3))  # the built-in batio3 of macefield hysteresis (135 atoms)
    period_ps = 0.02 if args.smoke else args.hysteresis_period_ps
    record_every = 1 if args.smoke else 10
    out = record["sections"]["hysteresis"] = {
        "model": "default (embedded)", "n_atoms": len(atoms), "period_ps": period_ps, "published": HYSTERESIS_PUBLISHED,
        "protocol": {"waveform": "cosine", "axis": "z", "amplitude_V_A": 0.3636, "cycles": 1, "temperature_K": 0.0,
                     "damping_per_fs": 0.02, "timestep_fs": 2.0, "record_every": record_every, "head": "batio3"}}
    checkpoint = REPO / "server" / "macefield_server" / "weights" / "default.pt"
    server = TiedServer(checkpoint, 1, server_options(args), workdir, ["--device", str(device)],
                        log_path=out_dir / f"{stem}-server-hysteresis.log")
    try:
        server.wait_serving(timeout=600)
        with Client(f"127.0.0.1:{server.port}") as client:
            client.predict(atoms, head="batio3")  # first call, untimed
            t0 = time.perf_counter()
            loop = hysteresis(client, atoms, axis="z", amplitude=0.3636, period_ps=period_ps, waveform="cosine",
                              temperature=0.0, damping=0.02, timestep_fs=2.0, record_every=record_every, head="batio3")
            wall = time.perf_counter() - t0
        steps = int(loop.settings["steps"])
        out.update(steps=steps, wall_s=wall, ms_per_step=1e3 * wall / steps, **loop.extracted)
        print(json.dumps({"hysteresis": period_ps, "steps": steps, "wall_s": round(wall, 1),
                          "Pr": loop.extracted["remanent_polarization_uC_cm2"],
                          "Ec": loop.extracted["coercive_field_MV_cm"]}), flush=True)
    finally:
        out["exit_code"] = stop_servers({"hysteresis": server})["hysteresis"]


# ------------------------------------------------------------------ 4. one MD step
def md_step(model, atoms, device, args, port):
    """Stage costs of one single-client step (in-process, the server's functions) and the stream round trip."""
    import grpc
    import torch
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc

    from macefield_server.serving.batcher import Timing
    from macefield_server.serving.config import LimitsConfig
    from macefield_server.engine.graph import collate, neighbour_list
    from macefield_server.engine.predict import split_results
    from macefield_server.engine.response import respond
    from macefield_server.serving.registry import ModelRegistry, ServedModel
    from macefield_server.serving.service import result_to_proto
    from macefield_server.serving.validation import parse_request

    served_model = ServedModel("bench", model, "")
    registry = ModelRegistry([served_model])
    limits = LimitsConfig()
    request = pb.PredictRequest(atomic_numbers=[int(z) for z in atoms.numbers],
                                positions=np.asarray(atoms.positions).ravel().tolist(),
                                cell=np.asarray(atoms.cell).ravel().tolist(), pbc=[True] * 3,
                                electric_field=[0.0, 0.0, 0.01], outputs=list(FULL))
    wire = request.SerializeToString()
    stages = {k: [] for k in ("decode", "validation", "neighbour_list", "collate_cpu", "host_to_device", "compute",
                              "device_to_host", "split", "encode")}
    zs = [int(z) for z in model.atomic_numbers]
    for _ in range(args.md_steps + 1):
        t = [time.perf_counter()]
        req = pb.PredictRequest.FromString(wire)
        t.append(time.perf_counter())
        parsed = parse_request(req, registry, limits)
        t.append(time.perf_counter())
        graph = neighbour_list(parsed.structure, served_model.cutoff)
        t.append(time.perf_counter())
        batch = collate([parsed.structure], [graph], atomic_numbers=zs, head_index=[parsed.head_index],
                        dtype=served_model.dtype, device=torch.device("cpu"))
        t.append(time.perf_counter())
        batch.tensors = {k: v.to(device, non_blocking=False) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.tensors.items()}
        sync(device)
        t.append(time.perf_counter())
        raw = respond(model, batch.tensors, None, parsed.outputs)
        sync(device)
        t.append(time.perf_counter())
        host = {k: v.cpu() for k, v in raw.items() if isinstance(v, torch.Tensor)}
        t.append(time.perf_counter())
        values = split_results(batch, host, parsed.outputs)[0]
        t.append(time.perf_counter())
        result_to_proto(parsed, values, Timing(0, 0, 0, 1, parsed.n_atoms)).SerializeToString()
        t.append(time.perf_counter())
        if _ == 0:
            continue  # warm-up
        for name, a, b in zip(stages, t[:-1], t[1:]):
            stages[name].append(b - a)
    out = {"n_atoms": len(atoms), "steps": args.md_steps,
           "stage_ms": {k: 1e3 * statistics.median(v) for k, v in stages.items()}}
    out["stages_total_ms"] = sum(out["stage_ms"].values())
    out["overhead_ms_excluding_compute"] = out["stages_total_ms"] - out["stage_ms"]["compute"]
    try:  # the host path stage by stage (bench/host_path.py), to set against the engine's compute per atom
        sys.path.insert(0, str(REPO / "bench"))
        from host_path import cases as host_cases, host_breakdown

        out["host_path"] = host_breakdown(served_model, host_cases(batio3=None, sizes=(72, 576)),
                                          min_repeats=5 if args.smoke else 20, min_seconds=0.02 if args.smoke else 0.2,
                                          device=device)
    except Exception as exc:  # noqa: BLE001 - the rest of the section stands
        out["host_path_error"] = f"{type(exc).__name__}: {exc}"[:500]

    async def stream():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = rpc.MaceFieldStub(channel).PredictStream(timeout=3600)
            latencies, server_ms = [], []
            for i in range(args.md_steps + 1):
                t0 = time.perf_counter()
                await call.write(pb.PredictRequest.FromString(wire))
                response = await call.read()
                if i:
                    latencies.append(time.perf_counter() - t0)
                    server_ms.append((response.timing.queue_ms, response.timing.compute_ms, response.timing.total_ms))
            await call.done_writing()
            return latencies, server_ms

    latencies, server_ms = asyncio.run(stream())
    out["stream_round_trip_ms"] = 1e3 * statistics.median(latencies)
    out["server_timing_ms"] = {k: statistics.median(x[i] for x in server_ms)
                               for i, k in enumerate(("queue", "compute", "total"))}
    out["unaccounted_ms"] = out["stream_round_trip_ms"] - out["stages_total_ms"]
    return out


# ------------------------------------------------------------------ summary
def summarise_record(record):
    """The GPU targets that this run can judge: {name: {value, target, pass}}."""
    checks = {}
    corr = record["sections"].get("correctness", {})
    precision = corr.get("coupling_tensor_precision") or {}
    for label, errs in (corr.get("cueq_vs_e3nn") or {}).items():
        name, dtype = label.rsplit("_", 1)
        if dtype == "float32":
            target = TARGETS["cueq_vs_e3nn_float32"]
        elif precision.get(name) == "float32":
            target = TARGETS["cueq_vs_e3nn_float64_float32_coupling"]
        else:
            target = TARGETS["cueq_vs_e3nn_float64"]
        worst = max(errs.values())
        checks[f"cueq_vs_e3nn_{label}"] = {"value": worst, "target": f"<= {target}", "pass": worst <= target}
    if "cuda_vs_cpu_float64_default" in corr:
        worst = max(corr["cuda_vs_cpu_float64_default"].values())
        checks["cuda_vs_cpu_float64"] = {"value": worst, "target": "<= 1e-8",
                                         "pass": worst <= TARGETS["cuda_vs_cpu_float64"]}
    series = (record["sections"].get("engine") or {}).get("series", [])

    def best(name, dtype, backend, outputs, strategy="loop"):
        for row in series:
            if (row["model"], row["dtype"], row["backend"], row["outputs"], row["second_order"]) == (
                    name, dtype, backend, outputs, strategy):
                points = [p for p in row["points"] if "seconds" in p]
                return points
        return []

    for name in ("default", "mh0"):
        for backend in ("e3nn", "cueq"):
            full = best(name, "float32", backend, "full")
            ef = best(name, "float32", backend, "energy_forces")
            if len(full) > 1:
                top = max(full, key=lambda p: p["structures_per_s"])
                gain = top["structures_per_s"] / full[0]["structures_per_s"]
                checks[f"batching_gain_full_{name}_{backend}_float32"] = {
                    "value": gain, "target": ">= 10", "pass": gain >= TARGETS["batching_gain_full"],
                    "best_batch": top["structures"]}
                same = {p["structures"]: p for p in ef}
                if top["structures"] in same:
                    ratio = top["seconds"] / same[top["structures"]]["seconds"]
                    checks[f"full_over_ef_{name}_{backend}_float32"] = {
                        "value": ratio, "target": "<= 4", "pass": ratio <= TARGETS["full_over_energy_forces"]}
    for outputs in ("energy_forces", "full"):
        e3nn, cueq = best("mh0", "float32", "e3nn", outputs), best("mh0", "float32", "cueq", outputs)
        if e3nn and cueq:
            speedup = max(p["structures_per_s"] for p in cueq) / max(p["structures_per_s"] for p in e3nn)
            checks[f"cueq_over_e3nn_mh0_float32_{outputs}"] = {"value": speedup, "target": ">= 2",
                                                                "pass": speedup >= TARGETS["cueq_over_e3nn_mh0"]}
        if cueq:
            checks[f"us_per_atom_mh0_cueq_float32_{outputs}"] = {
                "value": min(p["us_per_atom"] for p in cueq), "target": "report (anchor ~3 us/atom E+F, H100)",
                "pass": None}
    device_us = [p["us_per_atom"] for backend in ("cueq", "e3nn")
                 for p in best("mh0", "float32", backend, "energy_forces") if p.get("us_per_atom")]
    for row in (record["sections"].get("md_step") or {}).get("host_path", []):
        host = row["host_total"]["us_per_atom"]
        device_nl_host = row["device_nl_total"]["us_per_atom"]
        entry = {"value": host, "target": "report: host us/atom (received bytes to sent bytes, not the model)",
                 "pass": None, "device_nl_host_us_per_atom": device_nl_host}
        if "device_collate" in row["stages"]:  # the lists built on the device: copy + search + tensors
            entry["device_collate_us_per_atom"] = row["stages"]["device_collate"]["us_per_atom"]
        if device_us:  # the device's best compute per atom (E+F, any batch): which side limits throughput
            best_device = min(device_us)
            entry.update(device_us_per_atom=best_device, limited_by="host" if host > best_device else "device")
            if "device_collate_us_per_atom" in entry:  # with device lists the device also searches
                on_device = best_device + entry["device_collate_us_per_atom"]
                entry.update(device_nl_device_us_per_atom=on_device,
                             device_nl_limited_by="host" if device_nl_host > on_device else "device")
        checks[f"host_path_{row['name']}"] = entry
    srv = (record["sections"].get("server") or {}).get("results", {})
    if "64" in srv:
        ratio = srv["64"]["predict_batching"]["throughput_sps"] / srv["64"]["direct"]["throughput_sps"]
        checks["served_over_direct_64_clients"] = {"value": ratio, "target": ">= 0.8",
                                                   "pass": ratio >= TARGETS["served_over_direct_64_clients"]}
    ensemble = ((record["sections"].get("server") or {}).get("ensemble") or {}).get("results", {})
    for label, row in ensemble.items():
        checks[f"ensemble_{label}_replica_steps_per_s"] = {
            "value": row["replica_steps_per_s"], "target": f"report ({row['replicas']} replicas, one batch per step, "
                                                           f"{'E+F+P+alpha' if row['alpha'] else 'E+F+P'})",
            "pass": None}
    return checks


def write_atomically(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file and a rename: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(record, out_dir: Path, stem: str):
    """The JSON and the text summary of ``record`` (rewritten after every section and every measured step)."""
    record["checks"] = summarise_record(record)
    record["elapsed_s"] = round(time.monotonic() - record["_start"], 1)
    clean = {k: v for k, v in record.items() if not k.startswith("_")}
    write_atomically(out_dir / f"{stem}.json", json.dumps(clean, indent=1, default=float) + "\n")
    env = record["environment"]
    lines = [f"gpu_suite on {env.get('gpu', env['device'])} ({'smoke' if record['smoke'] else 'full'}), "
             + f"{clean['elapsed_s']} s"]
    lines += list(env.get("problems", []))
    if "terminated" in record:
        lines.append(f"stopped by {record['terminated']['signal']} during {record['terminated']['during']}")
    lines += [f"note: {n}" for n in record["notes"]]
    loop = record["sections"].get("hysteresis") or {}
    if "coercive_field_MV_cm" in loop:
        lines.append(f"hysteresis, period {loop['period_ps']:g} ps ({loop['steps']} steps, {loop['wall_s']:.0f} s): "
                     f"Pr {loop['remanent_polarization_uC_cm2']:.1f} uC/cm^2, Ec {loop['coercive_field_MV_cm']:.1f} "
                     "MV/cm (paper, 200 ps: 54.5 / 16.5 MACE-Field, 54.8 / 18.1 PBE)")
    for name, section in record["sections"].items():
        if isinstance(section, dict) and "error" in section:
            lines.append(f"{name}: ERROR {section['error']}")
    for name, c in record["checks"].items():
        verdict = "" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        lines.append(f"{name}: {c['value']:.3g} (target {c['target']}) {verdict}".rstrip())
    write_atomically(out_dir / f"{stem}.txt", "\n".join(lines) + "\n")


def save(record) -> None:
    """:func:`write` to the record's own folder and stem (``record["_out"]``)."""
    write(record, *record["_out"])


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the sizes that ``--smoke`` shrinks (seconds, structures, clients)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every code path on CPU in seconds (tiny sizes)")
    p.add_argument("--device", default=None,
                   help="cuda (the default; without a visible CUDA device the suite exits at once, code 2) or cpu "
                        "(the full suite on the CPU; the default with --smoke)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON, the text summary and the server logs")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the sections and model building, seconds (default 240; smoke 600: never cut)")
    p.add_argument("--sections", nargs="+", default=["correctness", "engine", "server"],
                   choices=["correctness", "engine", "server", "hysteresis"],
                   help="server includes md_step; hysteresis (the published 200 ps BaTiO3 loop, outside the "
                        "budget) only when named")
    p.add_argument("--hysteresis-period-ps", type=float, default=200.0,
                   help="period of the hysteresis section's loop, ps (default 200, the paper's)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (600.0 if args.smoke else 240.0)  # smoke: small work, never cut
    args.batch_sizes = [1, 2] if args.smoke else [1, 4, 16, 64, 256]
    args.clients = [1, 2] if args.smoke else [1, 8, 64, 256]
    args.load_s = 0.3 if args.smoke else 3.0
    args.point_s = 0.05 if args.smoke else 1.0
    args.md_steps = 3 if args.smoke else 20
    args.min_repeats = 1 if args.smoke else 2  # timed passes per engine point after the warm-up
    return args


def setup(record, args, device) -> ModelCache:
    """Notes on cueq and the device, the structures' check, the models (kept in the returned cache)."""
    env = record["environment"]
    # on a GPU cueq is measured only with its kernels (the pure-PyTorch fallback would only spend the budget)
    env["cueq_measured"] = env["cueq"] and (device.type != "cuda" or env["cueq_kernels"])
    if not env["cueq"]:
        record["notes"].append(f"cuequivariance-torch not importable ({env['cuequivariance_torch_version']}): "
                               "e3nn only")
    elif not env["cueq_measured"]:
        record["notes"].append("cuequivariance_ops_torch (CUDA kernels) not importable "
                               f"({env['cuequivariance_ops_torch_version']}): e3nn only; was /tmp/site-ops installed "
                               "by the first call on this machine? (bench/gpu_wheels.sh)")
    if device.type != "cuda":
        record["notes"].append(f"device {device}: not a GPU measurement")
    record["structures"] = check_structures()
    models = build_models(args.smoke)
    record["models"] = {name: {"parameters": int(sum(p.numel() for p in m.parameters())),
                               "hidden_irreps": m.arch_config["hidden_irreps"], "max_ell": m.arch_config["max_ell"],
                               "correlation": m.arch_config["correlation"], "r_max": m.arch_config["r_max"],
                               "elements": len(m.arch_config["atomic_numbers"]), "heads": list(m.heads)}
                        for name, m in models.items()}
    cache = ModelCache(models)
    record["conversions"] = cache.log
    return cache


def run_sections(record, cache, device, args, budget: Budget, workdir: Path, out_dir: Path, stem: str):
    """The sections in order; the servers (started first) are stopped on the way out, whatever ends the run:
    within 60 s each after the last section, 5 s after a stop signal."""
    plan = [("correctness", 0.2), ("engine", 0.7), ("server", 0.97), ("hysteresis", 1.0)]
    servers = {}
    stop_timeout_s = 5.0
    try:
        if "server" in args.sections:  # they load their model while the correctness section runs
            try:
                servers = start_servers(cache, device, args, workdir, out_dir, stem)
                record["server_pids"] = {label: server.proc.pid for label, server in servers.items()}
            except Exception as exc:  # noqa: BLE001
                record["sections"]["server"] = {"error": f"servers did not start: {type(exc).__name__}: {exc}"[:500],
                                                "traceback": traceback.format_exc()[-3000:]}
            save(record)
        for name, end in plan:
            if name not in args.sections or (name == "server" and not servers):
                continue
            if name == "engine" and servers:  # nothing else on the device while the engine is timed
                waited = time.monotonic()
                try:
                    for server in servers.values():
                        server.wait_serving(timeout=max(60.0, budget.until(0.7) - time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - the server section reports it
                    record["notes"].append(f"a server did not become SERVING before the engine section: {exc}")
                record["server_start_wait_s"] = round(time.monotonic() - waited, 1)
            record["running"] = name
            t0 = time.monotonic()
            try:
                if name == "correctness":
                    correctness(cache, device, args, record, budget.until(end))
                elif name == "engine":
                    engine(cache, device, args, record, budget.until(end))
                elif name == "hysteresis":
                    hysteresis_loop(device, args, record, workdir, out_dir, stem)
                else:
                    record["sections"]["md_step"] = served(cache, servers, device, args, record,
                                                           budget.until(end))[1]
            except Exception as exc:  # noqa: BLE001 - record and go on with the next section
                record["sections"].setdefault(name, {}).update(error=f"{type(exc).__name__}: {exc}"[:500],
                                                               traceback=traceback.format_exc()[-3000:])
            record["sections"].setdefault(name, {})["seconds"] = round(time.monotonic() - t0, 1)
            record["running"] = "between sections"
            save(record)
            print(f"{name}: {record['sections'][name]['seconds']} s", flush=True)
            check_stop()
        stop_timeout_s = 60.0
    finally:
        if servers:
            record["running"] = "stopping the servers"
            codes = stop_servers(servers, stop_timeout_s)
            record["sections"].setdefault("server", {}).update(
                exit_codes=codes, logs=[server.log_path.name for server in servers.values()])


def main(argv=None) -> int:
    """Exit code: 0 every section ran, 1 a section failed, 2 the machine cannot run the suite (nothing measured),
    128 + signal number when stopped by a signal (what was measured is written first)."""
    args = parse_args(argv)
    # the server child processes import the project from the same (absolute) paths
    os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(x).resolve()) for x in sys.path if x)
    import torch

    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    out_dir = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    utc = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"gpu_suite-{'smoke' if args.smoke else device.type}-{utc}"
    budget = Budget(args.budget_s)
    record = {"benchmark": "bench/gpu_suite.py", "command": " ".join(["python", "bench/gpu_suite.py", *sys.argv[1:]]),
              "utc": utc, "smoke": args.smoke, "notes": [], "targets": TARGETS, "sections": {},
              "_start": budget.start, "_out": (out_dir, stem)}

    def on_stop(name: str) -> None:
        record["terminated"] = {"signal": name, "during": record.get("running", "preflight"),
                                "after_s": round(budget.elapsed(), 1)}
        if "environment" in record:
            save(record)

    stop_on_signals(on_stop)
    try:
        record["environment"] = preflight(device)
        if record["environment"]["problems"]:
            save(record)
            for line in record["environment"]["problems"]:
                print(line, flush=True)
            print(f"environment: {out_dir / stem}.json", flush=True)
            return EXIT_UNUSABLE
        record["running"] = "setup"
        torch.set_num_threads(1 if args.smoke else min(8, os.cpu_count() or 1))
        environment(record["environment"], device)
        try:
            cache = setup(record, args, device)
        except Exception as exc:  # written, then the usual traceback
            record["sections"]["setup"] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                                           "traceback": traceback.format_exc()[-3000:]}
            save(record)
            raise
        save(record)
        with tempfile.TemporaryDirectory() as tmp:
            run_sections(record, cache, device, args, budget, Path(tmp), out_dir, stem)
        check_stop()
        del record["running"]
    except Terminated as stop:
        if "environment" not in record:  # stopped during the preflight imports
            print(f"stopped by {stop} before the machine was checked: nothing written", flush=True)
            return 128 + stop.signum
        save(record)  # with the servers' exit codes
        print(f"stopped by {stop}: what was measured is in {out_dir / stem}.json", flush=True)
        return 128 + stop.signum
    save(record)
    print((out_dir / f"{stem}.txt").read_text(), flush=True)
    failed = [n for n, s in record["sections"].items() if isinstance(s, dict) and "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
