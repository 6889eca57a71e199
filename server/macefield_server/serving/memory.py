"""Memory budget: what one engine pass costs, measured once per model at warm-up, and the budget it must fit.

A pass's peak memory grows with its directed edges E and atoms N, and with
the derivative order of its outputs (tier 0: energy; 1: forces, stress,
dipole, P; 2: Born charges and polarizability, which keep the first
backward pass's graph)::

    bytes(tier, E, N) = SAFETY * (per_edge[tier] * E + per_atom[tier] * N)

The coefficients are measured at warm-up on two lattices of the model's
elements (dense and sparse, so edges and atoms separate), for the model as
served (channels, irreps, dtype, backend, device):

* CUDA: the peak of ``torch.cuda.max_memory_allocated`` over the pass;
* CPU: the bytes of the tensors autograd keeps for the backward passes
  (counted once per storage through ``saved_tensors_hooks``) times a factor
  for the temporaries: the peak resident growth of a pass was 2.19-3.01x those
  bytes for tier 1 and 1.62-2.25x for tier 2, and tier 0 (which keeps nothing)
  peaked at 0.44-0.56x tier 1's peak, over 16-, 64- and 128-channel models
  (max_ell 1-3) on 576- and 1944-atom quartz and 4608 atoms for the 64-channel
  model (``bench/memory_model.py``, ``bench/results/memory_model_cpu.json``);
  with :data:`SAFETY` the estimate was 1.24-2.02x the measured peak, never
  below it.  Unlike resident memory these counts do not depend on what the
  allocator kept from earlier work.

``limits.memory_budget`` (default: half of the machine's memory, cgroup limit
included, on CPU; 80 % of the GPU's) is shared: 75 % for the passes of the
models on a device (divided among them: their passes may run at once), 25 %
for the neighbour lists of admitted, not yet answered structures.  A
structure whose estimate does not fit a pass alone is refused
RESOURCE_EXHAUSTED naming the estimate, before its neighbour list is built;
a batch closes before its estimate passes the pass budget.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple, Union


log = logging.getLogger("macefield.memory")

#: multiplies every estimate (allocator slack, temporaries the measurement does not see)
SAFETY = 1.25
#: CPU: peak of a pass per byte autograd keeps for it, by tier (about the largest measured ratio, 3.01 and 2.25)
CPU_PEAK_PER_SAVED = {1: 3.0, 2: 2.2}
#: CPU: tier 0 (no graph kept) peaks at this fraction of tier 1's peak
CPU_TIER0_OF_TIER1 = 0.6
#: share of the budget for compute passes; the rest bounds the neighbour lists of admitted structures
PASS_SHARE = 0.75
#: bytes a structure's neighbour list holds per directed edge (int64 pair, float64 shift, distance, index work)
GRAPH_BYTES_PER_EDGE = 64
#: bytes per atom of a structure and its graph bookkeeping (positions, numbers, canonical positions)
GRAPH_BYTES_PER_ATOM = 96

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[None, int, float, str]) -> Optional[int]:
    """``limits.memory_budget``: None or "auto" (None), a number of bytes, or "12GiB" / "500 MB" / "8gb"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected bytes, e.g. 8GiB, 500MB or 2000000000, or 'auto'; got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return int(number * _UNITS[unit])


def machine_memory() -> int:
    """Bytes of memory this process may use: MemTotal, or the cgroup limit when that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def fmt(n: float) -> str:
    """Bytes for people: 2.2 GB, 430 MB, 12 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryModel:
    """Peak bytes of one engine pass of a model on its device, per tier: ``per_edge[t] * E + per_atom[t] * N``."""

    per_edge: Tuple[float, float, float]
    per_atom: Tuple[float, float, float]
    source: str  #: how it was measured ("cuda peak allocated", "cpu autograd saved bytes")

    def estimate(self, tier: int, edges: int, atoms: int) -> int:
        """Bytes one pass over ``edges`` directed edges and ``atoms`` atoms needs for outputs of ``tier``."""
        return int(SAFETY * (self.per_edge[tier] * edges + self.per_atom[tier] * atoms))

    def max_edges(self, tier: int, atoms: int, budget: int) -> int:
        """The most edges a pass of ``atoms`` atoms may have within ``budget`` bytes (0 if none)."""
        room = budget / SAFETY - self.per_atom[tier] * atoms
        return max(0, int(room / max(self.per_edge[tier], 1.0)))

    def describe(self) -> str:
        tiers = ("energy", "forces", "full response")
        return ", ".join(f"{name} {fmt(e)}/edge + {fmt(a)}/atom"
                         for name, e, a in zip(tiers, self.per_edge, self.per_atom)) + f" ({self.source})"


@dataclass
class Budget:
    """A device's memory budget as the server applies it (bytes)."""

    total: int
    per_pass: int  #: one model's engine pass
    graphs: int  #: neighbour lists of admitted, not yet answered structures (server-wide)

    @classmethod
    def split(cls, total: int, models_on_device: int) -> "Budget":
        return cls(total=total, per_pass=int(PASS_SHARE * total / max(1, models_on_device)),
                   graphs=int((1.0 - PASS_SHARE) * total))


def graph_bytes(edges: int, atoms: int) -> int:
    """Bytes a structure's neighbour list and bookkeeping hold while it is admitted."""
    return int(GRAPH_BYTES_PER_EDGE * edges + GRAPH_BYTES_PER_ATOM * atoms)


__all__ = ["MemoryModel", "Budget", "parse_bytes", "machine_memory", "graph_bytes", "fmt", "SAFETY"]
