"""Admission: validated requests -> neighbour lists -> work items on each model's batcher -> results.

Models in ``device_graphs`` get no host neighbour list: their lists are built
on the device with each batch (:mod:`..engine.device_graph`), and the density
and min-distance checks run there (a structure that fails them gets its
INVALID_ARGUMENT from the batch; the others of the call are still computed).

All-or-nothing per call: a PredictBatch is queued whole or refused whole
(QueueFull), and when a call is cancelled or its deadline passes every one
of its queued structures leaves the queue uncomputed.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from .batcher import Batcher, DeadlinePassed, QueueFull, Timing, WorkItem
from .config import LimitsConfig
from .memory import PASS_SHARE, fmt, graph_bytes
from .prep_pool import ProcessPrep
from ..engine.graph import NeighbourGraph, expected_edges, neighbour_list
from .registry import ModelRegistry
from .validation import InvalidRequest, ParsedRequest, too_close, too_dense

Result = Tuple[Dict[str, np.ndarray], Timing]


class Dispatcher:
    def __init__(
        self,
        registry: ModelRegistry,
        batchers: Dict[str, Batcher],
        limits: LimitsConfig,
        prep_executor: ThreadPoolExecutor,
        graph_budget: Optional[int] = None,
        device_graphs: FrozenSet[str] = frozenset(),
        process_prep: Optional[ProcessPrep] = None,
    ):
        self.registry = registry
        self.batchers = batchers
        self.limits = limits
        self.prep_executor = prep_executor
        self.graph_budget = graph_budget  #: bytes for the neighbour lists of admitted structures (None: no bound)
        self.graph_bytes = 0  #: what the admitted, not yet answered structures hold now (estimated)
        self.device_graphs = device_graphs  #: names of the models whose lists are built on their device
        self.process_prep = process_prep  #: worker processes for the host lists (None: the prep threads)

    def _on_host(self, p: ParsedRequest) -> bool:
        return p.served.name not in self.device_graphs

    def _graphs(self, parsed: List[ParsedRequest]) -> List[Optional[NeighbourGraph]]:
        return [neighbour_list(p.structure, p.served.cutoff) if self._on_host(p) else None for p in parsed]

    def _check_room(self, parsed: List[ParsedRequest]) -> None:
        counts: Dict[str, Tuple[int, int]] = {}
        for p in parsed:
            n, atoms = counts.get(p.served.name, (0, 0))
            counts[p.served.name] = (n + 1, atoms + p.n_atoms)
        for name, (n, atoms) in counts.items():
            batcher = self.batchers[name]
            cfg = batcher.config
            if n > cfg.max_queue or atoms > cfg.max_queue_atoms:
                raise QueueFull(
                    f"{n} structures / {atoms} atoms for model {name!r} exceed the queue size "
                    f"({cfg.max_queue} structures / {cfg.max_queue_atoms} atoms); split the request"
                )
            if not batcher.has_room(n, atoms):
                raise QueueFull(batcher.full_message())

    async def run(
        self, parsed: List[ParsedRequest], deadline: Optional[float], prefixes: Optional[List[str]] = None
    ) -> List[Result]:
        """Compute every request of one call; results in order.

        Raises InvalidRequest, QueueFull, DeadlinePassed, DoesNotFit, or the
        engine's exception; asyncio.CancelledError if the caller goes away.
        """
        self._check_room(parsed)  # refuse at once, before any work
        # reserve what the neighbour lists will likely hold; once built, their real size replaces the guess
        expected = [min(p.edges, expected_edges(p.structure, p.served.cutoff)) for p in parsed]
        reserved = [graph_bytes(e if self._on_host(p) else 0, p.n_atoms) for p, e in zip(parsed, expected)]
        self._hold(sum(reserved))
        held = sum(reserved)
        try:
            loop = asyncio.get_running_loop()
            graphs: List[Optional[NeighbourGraph]] = [None] * len(parsed)
            host = [k for k, p in enumerate(parsed) if self._on_host(p)]
            if host and self.process_prep is not None:
                built = await self.process_prep.graphs([(parsed[k].structure, parsed[k].served.cutoff)
                                                        for k in host])
                for k, g in zip(host, built):
                    graphs[k] = g
            elif host:  # else no host work: no hop to the prep pool
                graphs = await loop.run_in_executor(self.prep_executor, self._graphs, parsed)
            actual = (sum(g.nbytes for g in graphs if g is not None)
                      + sum(graph_bytes(0, p.n_atoms) for p in parsed))
            self.graph_bytes -= held
            held = 0
            self._hold(actual)
            held = actual
            return await self._run(parsed, graphs, expected, deadline, prefixes)
        finally:
            self.graph_bytes -= held

    def _hold(self, nbytes: int) -> None:
        """Count ``nbytes`` of neighbour lists as admitted, or QueueFull if they would pass their budget."""
        if self.graph_budget is not None and self.graph_bytes + nbytes > self.graph_budget:
            raise QueueFull(
                f"the neighbour lists of this call ({fmt(nbytes)}) and the {fmt(self.graph_bytes)} already admitted "
                f"would pass {fmt(self.graph_budget)} ({1 - PASS_SHARE:.0%} of limits.memory_budget); retry later"
                + ("" if self.graph_bytes else " or split the call"))
        self.graph_bytes += nbytes

    async def _run(self, parsed, graphs, expected, deadline, prefixes) -> List[Result]:
        loop = asyncio.get_running_loop()
        for i, g in enumerate(graphs):
            error = None
            if g is None:  # checked on the device, with its batch
                continue
            if g.edge_index.shape[1] > self.limits.max_edges_per_structure:
                error = too_dense(int(g.edge_index.shape[1]), parsed[i].served.cutoff, self.limits)
            elif g.closest is not None and g.closest.distance < self.limits.min_distance:
                error = too_close(g.closest, parsed[i].structure, self.limits)
            if error is not None:
                raise error.prefixed(prefixes[i]) if prefixes else error
        now = time.monotonic()
        items_by_model: Dict[str, List[WorkItem]] = {}
        items: List[WorkItem] = []
        for p, g, e in zip(parsed, graphs, expected):
            item = WorkItem(
                structure=p.structure,
                graph=g,
                head_index=p.head_index,
                outputs=p.outputs,
                tier=p.tier,
                request_id=p.request_id,
                future=loop.create_future(),
                deadline=deadline,
                enqueued=now,
                edges=e,
            )
            items.append(item)
            items_by_model.setdefault(p.served.name, []).append(item)
        submitted: List[WorkItem] = []
        try:
            for name, model_items in items_by_model.items():
                self.batchers[name].submit(model_items)
                submitted.extend(model_items)
            futures = [it.future for it in items]
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(futures, timeout=timeout)
            if pending:
                raise DeadlinePassed(f"deadline passed with {len(pending)} of {len(futures)} structures not computed")
            results = []
            for i, f in enumerate(futures):
                failure = f.exception()
                if isinstance(failure, InvalidRequest) and prefixes:  # found by a device-side check
                    raise failure.prefixed(prefixes[i])
                results.append(f.result())
            return results
        finally:
            for it in submitted:  # cancelled call, deadline, error: free the queue slots
                if not it.future.done():
                    it.future.cancel()
            for it in items:  # retrieve exceptions so asyncio does not log them
                if it.future.done() and not it.future.cancelled():
                    it.future.exception()


__all__ = ["Dispatcher", "InvalidRequest", "QueueFull", "DeadlinePassed"]
