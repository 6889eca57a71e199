"""The MACE-Field engine behind the batcher's :class:`.backend.Backend` interface.

Neighbour lists: by default each item carries its host list (built at
admission) and :meth:`EngineBackend.collate` packs them.  With
``search_on_device`` (``batching.neighbour_search``; "auto" for CUDA models)
the items carry none: collate copies the batch's geometry to the model's
device once and builds every list there (:func:`..engine.device_graph.collate_on_device`),
then applies the admission checks the host would have applied (edges per
structure, min distance); a structure that fails them is left out of the pass
and gets its INVALID_ARGUMENT as its outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, cast

import numpy as np
import torch

from ..engine.device_graph import closest_pair, collate_on_device, shortest_edges
from ..engine.graph import GraphBatch, collate
from ..engine.predict import NonFiniteResult, check_finite, graded_head_indices, keep_requested, split_results
from ..engine.response import engine_outputs, respond
from .backend import BatchItem, Outcome
from .config import LimitsConfig
from .metrics import Metrics
from .registry import ServedModel
from .validation import InvalidRequest, too_close, too_dense

log = logging.getLogger("macefield.batcher")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class DeviceBatch:
    """A batch whose neighbour lists were built on the device: the pass over the structures that passed the
    admission checks (None: none did) and the refusal of each that did not (by position in the items)."""

    batch: Optional[GraphBatch]
    kept: List[int]
    refused: Dict[int, InvalidRequest] = field(default_factory=dict)


class EngineBackend:
    """Collate and evaluate batches of one :class:`ServedModel` with the response engine.

    ``search_on_device``: build the neighbour lists on the model's device per batch (items carry no list);
    ``limits``: the admission checks applied to those lists (default :class:`.config.LimitsConfig`).
    """

    def __init__(self, served: ServedModel, metrics: Metrics, *, search_on_device: bool = False,
                 limits: Optional[LimitsConfig] = None):
        self.served = served
        self.metrics = metrics
        self.name = served.name
        self.device_type = served.device.type
        self.heads: Sequence[str] = list(served.heads)
        self._atomic_numbers = [int(z) for z in cast(torch.Tensor, served.model.atomic_numbers)]  # a buffer
        self.search_on_device = search_on_device
        self.limits = limits or LimitsConfig()
        self._cutoff = served.cutoff

    def collate(self, items: Sequence[BatchItem]):
        """A :class:`GraphBatch` from the items' host lists, or a :class:`DeviceBatch` (``search_on_device``)."""
        if self.search_on_device:
            return self._collate_on_device(items)
        return collate([it.structure for it in items], [it.graph for it in items],
                       atomic_numbers=self._atomic_numbers, head_index=[it.head_index for it in items],
                       dtype=self.served.dtype, device=self.served.device)

    def _collate_on_device(self, items: Sequence[BatchItem]) -> DeviceBatch:
        kept = list(range(len(items)))
        refused: Dict[int, InvalidRequest] = {}
        while kept:
            structures = [items[k].structure for k in kept]
            batch, edges = collate_on_device(structures, cutoff=self._cutoff, atomic_numbers=self._atomic_numbers,
                                             head_index=[items[k].head_index for k in kept],
                                             dtype=self.served.dtype, device=self.served.device)
            limits = self.limits
            minima = shortest_edges(edges) if limits.min_distance > 0 else [float("inf")] * len(kept)
            failed = {}
            for g, k in enumerate(kept):
                if edges.edges[g] > limits.max_edges_per_structure:
                    failed[k] = too_dense(edges.edges[g], self._cutoff, limits)
                elif minima[g] < limits.min_distance:
                    pair = closest_pair(edges, g, batch.n_atoms)
                    assert pair is not None  # a finite minimum has an edge
                    failed[k] = too_close(pair, structures[g], limits)
            if not failed:
                return DeviceBatch(batch, kept, refused)
            refused.update(failed)  # rare: the pass is rebuilt without them
            kept = [k for k in kept if k not in failed]
        return DeviceBatch(None, [], refused)

    def run(self, batch: GraphBatch, outputs: FrozenSet[str]) -> List[Dict[str, np.ndarray]]:
        """The response engine on one batch, split per structure, every output the batch needs."""
        needed = engine_outputs(outputs)
        model = self.served.model
        # respond sets every key it returns to a tensor (its declared value type is Optional)
        raw = cast(Dict[str, torch.Tensor], respond(model, batch.tensors, None, needed))
        return split_results(batch, raw, needed, graded_head_indices(model))

    def evaluate(self, batch, items: Sequence[BatchItem]) -> List[Outcome]:
        if isinstance(batch, DeviceBatch):
            outcomes: Dict[int, Outcome] = dict(batch.refused)
            if batch.batch is not None:
                outcomes.update(zip(batch.kept, self.evaluate(batch.batch, [items[k] for k in batch.kept])))
            return [outcomes[k] for k in range(len(items))]
        outputs: FrozenSet[str] = frozenset().union(*(it.outputs for it in items))
        results = self.run(batch, outputs)
        return [self._finite(keep_requested(r, it.outputs), it) for r, it in zip(results, items)]

    def _finite(self, result: Dict[str, np.ndarray], item: BatchItem) -> Outcome:
        """The result, or :class:`NonFiniteResult` for this structure alone (the batch's others are served)."""
        try:
            return check_finite(result, item.graph, item.structure.numbers)
        except NonFiniteResult as exc:
            log.warning("request %s: %s", item.request_id, exc)
            self.metrics.non_finite.labels(model=self.name).inc()
            return exc

    def pass_fits(self, tier: int, edges: int, atoms: int) -> bool:
        memory, budget = self.served.memory, self.served.budget
        return memory is None or budget is None or memory.estimate(tier, edges, atoms) <= budget.per_pass

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def release_memory(self) -> None:
        if self.served.device.type == "cuda":
            torch.cuda.empty_cache()

    def record_memory(self) -> None:
        device = self.served.device
        if device.type == "cuda":
            self.metrics.gpu_memory.labels(device=str(device)).set(torch.cuda.memory_allocated(device))
