"""Neighbour lists built where the model runs: one copy of positions and cells, then the search on the device.

For CUDA batches the host then only decodes and validates a request; the
search runs on the batch's device with vesin (its CUDA kernels take torch
tensors directly; on a CPU the same call runs vesin's CPU search).  The inputs
are exactly the host path's (:func:`.graph.canonical_positions` and the padded
cell), so both give the same pairs, shifts and distances
(tests/test_neighbour_lists.py checks the CPU build against the host lists).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .graph import ClosestPair, GraphBatch, NeighbourGraph, Structure, _padded_cell, canonical_positions, collate

_local = threading.local()


def _calculator(cutoff: float):
    import vesin

    cache = getattr(_local, "vesin", None)
    if cache is None:
        cache = _local.vesin = {}
    calc = cache.get(cutoff)
    if calc is None:
        calc = cache[cutoff] = vesin.NeighborList(cutoff=cutoff, full_list=True, sorted=False, n_threads=1)
    return calc


@dataclass
class DeviceEdges:
    """A batch's edges, on its device: (2, E) int64 edge_index, (E, 3) float64 unit shifts, (E,) distances
    and (E, 3) float64 shifts in Angstrom (unit shifts times the cell of the edge's structure)."""

    edge_index: torch.Tensor
    unit_shifts: torch.Tensor
    distances: torch.Tensor
    edges: List[int]  #: directed edges per structure (host ints)
    shifts: torch.Tensor


def batch_edges(positions: torch.Tensor, cells: torch.Tensor, pbc: np.ndarray, n_atoms: Sequence[int],
                cutoff: float) -> DeviceEdges:
    """Edges of every structure of a batch, found on the tensors' device.

    ``positions`` (N, 3) float64 canonical positions, ``cells`` (G*3, 3)
    float64 padded cells (both on the device), ``pbc`` (G, 3) host bools,
    ``n_atoms`` per structure.  Node indices are the batch's (offset by the
    structures before).
    """
    calc = _calculator(float(cutoff))
    device = positions.device
    index, shifts, angstrom, distances, counts = [], [], [], [], []
    start = 0
    for g, n in enumerate(n_atoms):
        stop = start + int(n)
        if n == 0:
            counts.append(0)
            continue
        i, j, s, d = calc.compute(positions[start:stop], cells[3 * g:3 * g + 3], pbc[g], "ijSd")
        index.append(torch.stack([i, j]).to(torch.int64) + start)
        shifts.append(s.to(torch.float64))
        angstrom.append(shifts[-1] @ cells[3 * g:3 * g + 3])
        distances.append(d)
        counts.append(int(d.shape[0]))
        start = stop
    if not index:
        return DeviceEdges(torch.zeros((2, 0), dtype=torch.int64, device=device),
                           torch.zeros((0, 3), dtype=torch.float64, device=device),
                           torch.zeros(0, dtype=torch.float64, device=device), counts,
                           torch.zeros((0, 3), dtype=torch.float64, device=device))
    return DeviceEdges(torch.cat(index, dim=1), torch.cat(shifts), torch.cat(distances), counts, torch.cat(angstrom))


def shortest_edges(edges: DeviceEdges) -> List[float]:
    """The length of every structure's shortest edge, Angstrom (inf: no edges).

    One reduction over the batch's edges on their device and one copy of the per-structure minima.
    """
    counts = list(edges.edges)
    if sum(counts) == 0:
        return [float("inf")] * len(counts)
    d = edges.distances
    owner = torch.repeat_interleave(torch.arange(len(counts), device=d.device),
                                    torch.as_tensor(counts, device=d.device))
    minima = torch.full((len(counts),), float("inf"), dtype=d.dtype, device=d.device)
    return minima.scatter_reduce(0, owner, d, reduce="amin").cpu().tolist()


def closest_pair(edges: DeviceEdges, g: int, n_atoms: Sequence[int]) -> Optional[ClosestPair]:
    """Structure ``g``'s shortest edge, its atoms numbered within the structure (None: it has no edges)."""
    start = sum(edges.edges[:g])
    count = edges.edges[g]
    if count == 0:
        return None
    k = start + int(torch.argmin(edges.distances[start:start + count]))
    first = int(sum(n_atoms[:g]))
    i, j = (int(v) - first for v in edges.edge_index[:, k].tolist())
    s0, s1, s2 = (int(round(v)) for v in edges.unit_shifts[k].tolist())
    return ClosestPair(i, j, (s0, s1, s2), float(edges.distances[k]))


def collate_on_device(structures: Sequence[Structure], *, cutoff: float, atomic_numbers: Sequence[int],
                      head_index: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"):
    """:func:`.graph.collate` with the neighbour lists built on ``device`` after one copy of the geometry.

    Returns (GraphBatch, DeviceEdges): the batch's tensors as :func:`.graph.collate` makes them from host
    lists (the edges in the device search's order) and the edges per structure for the admission checks.
    """
    graphs = []
    for s in structures:  # O(N) on the host: wrap into the cell, the padded cell; no search
        cell = _padded_cell(s, cutoff)
        graphs.append(NeighbourGraph(np.zeros((2, 0), np.int64), np.zeros((0, 3)), cell,
                                     positions=canonical_positions(s, cell)))
    batch: GraphBatch = collate(structures, graphs, atomic_numbers=atomic_numbers, head_index=head_index,
                                dtype=dtype, device=device)
    t = batch.tensors
    pbc = np.stack([s.pbc for s in structures]) if structures else np.zeros((0, 3), bool)
    edges = batch_edges(t["positions"], t["cell"], pbc, batch.n_atoms, cutoff)
    t["edge_index"] = edges.edge_index
    t["unit_shifts"] = edges.unit_shifts
    t["shifts"] = edges.shifts
    return batch, edges


__all__ = ["DeviceEdges", "batch_edges", "closest_pair", "collate_on_device", "shortest_edges"]
