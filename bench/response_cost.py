"""Cost of the full response (F, forces, stress, P, Z*, alpha) versus energy + forces.

Measures, in one run and on one device:

* ``energy_forces``: the engine asked for energy and forces only;
* ``full``: the engine asked for everything (one forward, one first-order
  backward, the batch-wide second-derivative pass);

both as ``predict`` runs them: on CPU a call is cut into passes of at most
``macefield_server.batch_limits.AUTO_LIMITS["cpu"]`` edges (cache-sized; it also bounds memory), on GPU one
pass.  ``one_pass_*`` columns time the whole batch as a single pass (up to
``--one-pass-max`` structures), with each second-order strategy;
* ``reference_recipe``: the recipe of the reference MACE-Field code, one
  structure at a time: forces by one backward pass, P by another, then Z* and
  alpha each by a Python loop of three backward passes, run as the reference
  code runs it: on mace-torch's modules as built (e3nn's TorchScript tensor
  products).  ``reference_recipe_same_modules`` runs the same recipe on the
  engine's model (tensor products rewritten by
  ``macefield_server.engine.tp_rewrite``), which isolates the gain of the
  batched recipe alone.  ``engine_stock_modules`` times the engine on the
  stock modules (batch 1), which isolates the gain of the rewrite.

Structures: 72-atom alpha-quartz frames from ../shared/data/sio2-quartz-md.xyz
(read at run time), or an ASE-built 2x2x2 quartz-like cell when absent.
Model: random FieldMACE, 64 channels, L=1, 2 layers, r_max 5 A, float64 by default.

Usage::

    python bench/response_cost.py --out bench/results/response_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from results_io import write_json

import numpy as np
import torch

from macefield_server.engine import build_field_mace, default_architecture, prepare_batch
from macefield_server.engine.graph import Structure, neighbour_list
from macefield_server.batch_limits import auto_limits
from macefield_server.engine.predict import _passes
from macefield_server.engine.response import SECOND_ORDER_DEFAULT, respond
from macefield_server.serving.runtime import tune_cpu_allocator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sio2-quartz-md.xyz"
FULL = frozenset({"energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"})
EF = frozenset({"energy", "forces"})


def quartz_frames(n: int):
    import ase.io

    if DATA.exists():
        frames = ase.io.read(DATA, f":{n}")
    else:  # fall back to alpha-quartz 2x2x2 (72 atoms, PBE cell; tests/test_structures.py checks it), rattled
        from macefield_client.structures import alpha_quartz

        frames = [alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=0.05, seed=i) for i in range(n)]
    while len(frames) < n:
        frames = frames + frames
    return frames[:n]


def timed(fn, device, repeats: int):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def reference_recipe(model, batch):
    """One structure (batch of one) the reference way: 1 + 1 + 3 + 3 backward passes."""
    g = batch.tensors
    positions = g["positions"].detach().clone().requires_grad_(True)
    field = g["electric_field"].detach().clone().requires_grad_(True)
    energy, _ = model.enthalpy(g, positions, field)
    (grad_r,) = torch.autograd.grad(energy.sum(), positions, create_graph=True, retain_graph=True)
    forces = -grad_r
    (grad_e,) = torch.autograd.grad(energy.sum(), field, create_graph=True, retain_graph=True)
    dipole = -grad_e[0]
    becs = torch.stack(
        [torch.autograd.grad(dipole[i], positions, retain_graph=True)[0] for i in range(3)], dim=1
    )
    alpha = torch.stack([torch.autograd.grad(dipole[i], field, retain_graph=True)[0][0] for i in range(3)])
    return forces.detach(), dipole.detach(), becs, alpha


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--second-order", nargs="+", default=["loop", "vmap"], choices=["loop", "vmap"],
                        help="second-derivative strategies to time (the engine default is reported as full_s)")
    parser.add_argument("--no-tune-allocator", action="store_true", help="leave glibc malloc at its defaults")
    parser.add_argument("--one-pass-max", type=int, default=8,
                        help="also time the whole batch as one pass up to this many structures (CPU memory!)")
    parser.add_argument("--max-ell", type=int, default=3, help="spherical-harmonics order of the edges")
    parser.add_argument("--reference-structures", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "response_cost.json")
    args = parser.parse_args()
    allocator_tuned = not args.no_tune_allocator and tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    arch = default_architecture(
        [8, 14], channels=args.channels, max_L=1, num_interactions=2, r_max=5.0, max_ell=args.max_ell
    )
    torch.manual_seed(0)
    model = build_field_mace(arch, dtype=dtype)
    with torch.no_grad():
        for p in model.field_linear.parameters():
            p.normal_(0.0, 0.1)
    model = model.to(device).eval()
    stock = build_field_mace(arch, dtype=dtype, rewrite_products=False)  # same weights, e3nn modules as built
    stock.load_state_dict(model.state_dict(), strict=True)
    stock = stock.to(device).eval()

    frames = quartz_frames(max(args.batch_sizes))
    rng = np.random.default_rng(0)
    structures = [Structure.from_atoms(a, electric_field=rng.normal(0, 0.05, 3)) for a in frames]

    r_max = float(model.r_max)
    graphs = [neighbour_list(s, r_max) for s in structures]
    default = SECOND_ORDER_DEFAULT[device.type == "cuda"]

    def engine_passes(bs, tier):
        """The passes predict() makes for bs structures (auto edge limit), prepared ahead."""
        limit = None if device.type == "cuda" else auto_limits("cpu")[1]
        return [
            prepare_batch(model, [structures[i] for i in grp], graphs=[graphs[i] for i in grp], device=device)
            for grp in _passes(graphs[:bs], None, limit)
        ]

    def run(batches, outputs, mode=None, net=None):
        return [respond(model if net is None else net, b.tensors, None, outputs, second_order=mode) for b in batches]

    warm = engine_passes(1, 2)  # first calls pay one-off costs (allocator, kernels)
    for _ in range(2):
        run(warm, FULL, default)
        run(warm, EF)

    rows = []
    for bs in args.batch_sizes:
        ef_batches, full_batches = engine_passes(bs, 1), engine_passes(bs, 2)
        t_ef = timed(lambda: run(ef_batches, EF), device, args.repeats)
        t_full = timed(lambda: run(full_batches, FULL, default), device, args.repeats)
        row = {
            "batch_size": bs,
            "atoms": bs * len(frames[0]),
            "edges": sum(int(g.edge_index.shape[1]) for g in graphs[:bs]),
            "engine_passes_energy_forces": len(ef_batches),
            "engine_passes_full": len(full_batches),
            "energy_forces_s": t_ef,
            "full_s": t_full,
            "full_over_energy_forces": t_full / t_ef,
            "full_structures_per_s": bs / t_full,
        }
        if bs <= args.one_pass_max:  # the whole batch in a single pass, each second-order strategy
            one = [prepare_batch(model, structures[:bs], graphs=graphs[:bs], device=device)]
            row["one_pass_energy_forces_s"] = t_one_ef = timed(lambda: run(one, EF), device, args.repeats)
            for mode in args.second_order:
                t = timed(lambda: run(one, FULL, mode), device, args.repeats)
                row[f"one_pass_full_{mode}_s"] = t
                row[f"one_pass_full_{mode}_over_energy_forces"] = t / t_one_ef
        rows.append(row)
        print(json.dumps(row))

    singles = [prepare_batch(model, [s], device=device) for s in structures[: args.reference_structures]]
    for net in (stock, model):  # warm both
        reference_recipe(net, singles[0])
        run(singles[:1], FULL, default, net)
    t_ref = timed(lambda: [reference_recipe(stock, b) for b in singles], device, args.repeats)
    t_ref_same = timed(lambda: [reference_recipe(model, b) for b in singles], device, args.repeats)
    t_engine_stock = timed(lambda: run(singles, FULL, default, stock), device, args.repeats)
    t_engine_singles = timed(lambda: run(singles, FULL, default), device, args.repeats)
    ref_rate = len(singles) / t_ref
    ref_same_rate = len(singles) / t_ref_same
    best = max(rows, key=lambda r: r["full_structures_per_s"])

    # the two recipes must agree, or the comparison means nothing
    check = respond(model, singles[0].tensors, None, FULL)
    f_ref, mu_ref, z_ref, a_ref = reference_recipe(stock, singles[0])
    agreement = {
        "forces": float((check["forces"] - f_ref).abs().max()),
        "dipole": float((check["dipole"][0] - mu_ref).abs().max()),
        "born_charges": float((check["born_charges"] - z_ref).abs().max()),
        "polarizability": float((check["polarizability"][0] - a_ref).abs().max()),
    }

    result = {
        "benchmark": "response_cost",
        "engine_second_order_default": SECOND_ORDER_DEFAULT[device.type == "cuda"],
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"),
        "torch": torch.__version__,
        "allocator_tuned": allocator_tuned,
        "dtype": args.dtype,
        "model": {"channels": args.channels, "L": 1, "layers": 2, "r_max": 5.0, "max_ell": args.max_ell,
                  "correlation": 3},
        "structure_atoms": len(frames[0]),
        "structures_source": str(DATA.name) if DATA.exists() else "ase-built quartz 2x2x2",
        "rows": rows,
        "reference_recipe": {"structures": len(singles), "seconds": t_ref, "structures_per_s": ref_rate,
                             "modules": "mace-torch/e3nn as built (TorchScript tensor products)"},
        "reference_recipe_same_modules": {"structures": len(singles), "seconds": t_ref_same,
                                          "structures_per_s": ref_same_rate,
                                          "modules": "the engine's (tensor products rewritten)"},
        "engine_batch1_structures_per_s": {"stock_modules": len(singles) / t_engine_stock,
                                           "rewritten_modules": len(singles) / t_engine_singles},
        "best_batch_size": best["batch_size"],
        "best_batched_over_reference": best["full_structures_per_s"] / ref_rate,
        "best_batched_over_reference_same_modules": best["full_structures_per_s"] / ref_same_rate,
        "max_full_over_energy_forces": max(r["full_over_energy_forces"] for r in rows),
        "targets": {"full_over_energy_forces_max": 4.0, "batched_over_reference_min": 1.5},
        "recipes_agree_max_abs_diff": agreement,
    }
    write_json(args.out, result, indent=2)
    print(json.dumps({k: result[k] for k in ("best_batched_over_reference", "best_batched_over_reference_same_modules",
                                             "max_full_over_energy_forces")}))


if __name__ == "__main__":
    main()
