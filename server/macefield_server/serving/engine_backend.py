"""The MACE-Field engine behind the batcher's :class:`.backend.Backend` interface."""

from __future__ import annotations

import logging
from typing import Dict, FrozenSet, List, Sequence, cast

import numpy as np
import torch

from ..engine.graph import GraphBatch, collate
from ..engine.predict import NonFiniteResult, check_finite, graded_head_indices, keep_requested, split_results
from ..engine.response import engine_outputs, respond
from .backend import BatchItem, Outcome
from .metrics import Metrics
from .registry import ServedModel

log = logging.getLogger("macefield.batcher")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class EngineBackend:
    """Collate and evaluate batches of one :class:`ServedModel` with the response engine."""

    def __init__(self, served: ServedModel, metrics: Metrics):
        self.served = served
        self.metrics = metrics
        self.name = served.name
        self.device_type = served.device.type
        self.heads: Sequence[str] = list(served.heads)
        self._atomic_numbers = [int(z) for z in cast(torch.Tensor, served.model.atomic_numbers)]  # a buffer

    def collate(self, items: Sequence[BatchItem]) -> GraphBatch:
        return collate([it.structure for it in items], [it.graph for it in items],
                       atomic_numbers=self._atomic_numbers, head_index=[it.head_index for it in items],
                       dtype=self.served.dtype, device=self.served.device)

    def run(self, batch: GraphBatch, outputs: FrozenSet[str]) -> List[Dict[str, np.ndarray]]:
        """The response engine on one batch, split per structure, every output the batch needs."""
        needed = engine_outputs(outputs)
        model = self.served.model
        # respond sets every key it returns to a tensor (its declared value type is Optional)
        raw = cast(Dict[str, torch.Tensor], respond(model, batch.tensors, None, needed))
        return split_results(batch, raw, needed, graded_head_indices(model))

    def evaluate(self, batch: GraphBatch, items: Sequence[BatchItem]) -> List[Outcome]:
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
