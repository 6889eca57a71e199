"""The interface between a batcher and the model it serves: what a batch needs from the engine.

The batcher (:mod:`.batcher`) forms batches, keeps deadlines and the memory
budget, and splits a batch that runs out of memory; it never imports the
engine.  Everything it asks of a model goes through :class:`Backend`:

* :meth:`Backend.collate`: pack queued structures into one batch (prep thread);
* :meth:`Backend.evaluate`: one engine pass over a batch, one result per
  structure, each cut to that structure's outputs and checked finite
  (compute thread);
* :meth:`Backend.pass_fits`: whether a pass of that many edges and atoms fits
  the memory budget (the memory model measured at warm-up);
* :meth:`Backend.is_out_of_memory` / :meth:`Backend.release_memory`: how the
  device reports and recovers from an allocation failure.

:class:`.engine_backend.EngineBackend` implements it for a served MACE-Field
model; tests implement it with a fake evaluate and no torch.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Protocol, Sequence, Union

import numpy as np


class BatchItem(Protocol):
    """What a backend reads of one queued structure (:class:`.batcher.WorkItem`)."""

    structure: Any  #: the engine's structure (positions A, cell A, field V/A, head)
    graph: Any  #: its neighbour list
    head_index: int
    outputs: FrozenSet[str]
    request_id: str

    @property
    def n_atoms(self) -> int: ...


#: one structure's outcome: its named result arrays (contract units), or the exception that is its answer
Outcome = Union[Dict[str, np.ndarray], Exception]


class Backend(Protocol):
    """One served model as a batcher sees it."""

    #: the served model's name (metric labels, log lines)
    name: str
    #: ``"cpu"`` or ``"cuda"``: selects the batch limits (:meth:`.config.BatchingConfig.limits_for`)
    device_type: str
    #: head names, indexed by :attr:`BatchItem.head_index`
    heads: Sequence[str]

    def collate(self, items: Sequence[BatchItem]) -> Any:
        """Pack ``items`` into one batch for :meth:`evaluate` (prep thread)."""

    def evaluate(self, batch: Any, items: Sequence[BatchItem]) -> List[Outcome]:
        """One pass over ``batch`` (made from ``items``): one outcome per item, in order (compute thread)."""

    def pass_fits(self, tier: int, edges: int, atoms: int) -> bool:
        """Whether one pass of output ``tier`` over ``edges`` directed edges and ``atoms`` atoms fits the budget."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the device running out of memory (the batch is then split)."""

    def release_memory(self) -> None:
        """Return cached device memory after an out-of-memory failure."""

    def record_memory(self) -> None:
        """Report the device's memory use (metrics) after a batch."""
