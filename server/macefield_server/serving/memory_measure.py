"""Measuring a served model's memory per engine pass at warm-up (the coefficients of :class:`.memory.MemoryModel`).

Two jittered lattices of the model's elements (dense and sparse, so that
edges and atoms separate) go through one pass per output tier; a least-squares
fit gives bytes per edge and per atom.  On CUDA the peak allocated bytes are
measured; on CPU the bytes autograd keeps for the pass, times the factors
:data:`.memory.CPU_PEAK_PER_SAVED` calibrated by bench/memory_model.py.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..engine.graph import Structure, neighbour_list
from ..engine.predict import prepare_batch
from ..engine.response import engine_outputs, respond
from .memory import CPU_PEAK_PER_SAVED, CPU_TIER0_OF_TIER1, MemoryModel, machine_memory


def default_budget(device: torch.device) -> int:
    """Bytes a device's passes and graphs may use: half of the machine's memory on CPU, 80 % of the GPU's."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.5 * machine_memory())


def lattice(numbers: Sequence[int], spacing: float, n_side: int, seed: int = 0):
    """A jittered simple-cubic periodic lattice of the model's elements (no two atoms closer than 0.8 spacing)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    positions = (grid + rng.uniform(-0.1, 0.1, grid.shape)) * spacing
    zs = [int(numbers[i % len(numbers)]) for i in range(len(grid))]
    return Structure(np.asarray(zs, dtype=np.int64), positions, np.eye(3) * spacing * n_side, np.ones(3, dtype=bool))


def _pass_cost(model, batch, outputs, device: torch.device) -> float:
    """Bytes one pass needs: the CUDA peak, or on CPU the bytes autograd keeps for it (unique storages)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        respond(model, batch.tensors, None, outputs)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        respond(model, batch.tensors, None, outputs)
    return float(sum(seen.values()))


def measure(served, target_edges: int = 3000) -> MemoryModel:
    """Fit :class:`MemoryModel` for ``served`` from two lattices (runs on the caller's thread: the compute thread)."""
    model, device = served.model, served.device
    zs = sorted(served.atomic_numbers)
    cutoff = served.cutoff
    rows: List[Tuple[int, int]] = []
    costs: Dict[int, List[float]] = {1: [], 2: [], 0: []}
    tier_outputs = {0: frozenset({"energy"}), 1: frozenset({"forces", "stress", "dipole"}),
                    2: frozenset({"forces", "stress", "dipole", "born_charges", "polarizability"})}
    # dense (condensed-matter density, ~2.4 A apart) and sparse (~3.4 A): edges per atom differ by ~3x
    for spacing in (2.4, 3.4):
        per_atom_edges = 4.19 * cutoff**3 / spacing**3
        n_side = max(3, int(round((target_edges / per_atom_edges) ** (1 / 3))))
        n_side = max(n_side, int(np.ceil(2 * cutoff / spacing)) + 1)  # cell wider than the cutoff: no self images
        structure = lattice(zs, spacing, n_side)
        structure.head = served.default_head
        batch = prepare_batch(model, [structure], graphs=[neighbour_list(structure, cutoff)], device=device)
        rows.append((batch.num_edges, structure.n_atoms))
        for tier in (0, 1, 2) if device.type == "cuda" else (1, 2):
            costs[tier].append(_pass_cost(model, batch, engine_outputs(tier_outputs[tier]), device))
    if device.type != "cuda":
        costs[0] = [CPU_TIER0_OF_TIER1 * CPU_PEAK_PER_SAVED[1] * c for c in costs[1]]
        costs[1] = [CPU_PEAK_PER_SAVED[1] * c for c in costs[1]]
        costs[2] = [CPU_PEAK_PER_SAVED[2] * c for c in costs[2]]
    a = np.array(rows, dtype=float)
    per_edge: List[float] = []
    per_atom: List[float] = []
    for tier in (0, 1, 2):
        y = np.array(costs[tier])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        e, n = float(coef[0]), float(coef[1])
        if e <= 0 or n < 0:  # noise or a tiny model: all of it per edge, at the denser lattice's ratio
            e, n = float(max(y[0], y[1] * rows[0][0] / rows[1][0]) / rows[0][0]), 0.0
        per_edge.append(e)
        per_atom.append(n)
    source = "cuda peak allocated" if device.type == "cuda" else "cpu autograd saved bytes"
    return MemoryModel((per_edge[0], per_edge[1], per_edge[2]), (per_atom[0], per_atom[1], per_atom[2]),
                       f"{source}, {rows[0][0]}/{rows[1][0]}-edge lattices")


__all__ = ["default_budget", "lattice", "measure"]
