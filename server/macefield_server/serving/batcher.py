"""Dynamic batching of queued structures into single response-engine passes (one batcher per model).

Pipeline (asyncio on the server's event loop, CPU/GPU work on threads)::

    submit() -> per-tier FIFO queues -> [former] close a batch, collate it (prep thread)
             -> [computer] evaluate (compute thread) -> scatter results to each caller's future

* Requests are grouped by output tier (0: energy, 1: first derivatives,
  2: Born charges / polarizability); heads and fields mix freely in a batch.
* A batch closes when it holds ``max_structures``, or adding the next
  structure would pass ``max_atoms`` / ``max_edges`` (per device when
  "auto", see :data:`macefield_server.batch_limits.AUTO_LIMITS`), or its oldest request has waited
  ``max_wait_ms`` (immediately while draining).  A structure larger than the
  limits is computed alone.
* The former prepares batch k+1 (collate: tensor assembly) while batch k
  computes; neighbour lists are built per request on admission (prep thread).
* The queue is bounded (``max_queue`` structures): :meth:`Batcher.submit`
  raises :class:`QueueFull` at once beyond it.  Cancelled callers and passed
  deadlines leave the queue without being computed.
* Out of memory during a batch: it is split in halves that are retried; a
  structure that does not fit alone fails with :class:`DoesNotFit`.

The model is reached only through a :class:`.backend.Backend` (collate,
evaluate, memory budget, out-of-memory handling): this module imports no
engine code and no torch, and its unit tests run with a fake backend.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, FrozenSet, List, Optional, Protocol, Tuple

from .backend import Backend, Outcome
from .config import BatchingConfig
from .metrics import Metrics

log = logging.getLogger("macefield.batcher")

QUEUED, BATCHED, DROPPED = "queued", "batched", "dropped"


class QueueFull(Exception):
    """The model's queue cannot take the request now (RESOURCE_EXHAUSTED)."""


class DoesNotFit(Exception):
    """A structure ran out of memory even alone in its batch (RESOURCE_EXHAUSTED)."""


class Stopped(Exception):
    """The server stopped before the request was computed (UNAVAILABLE: retry elsewhere or after a restart)."""


class DeadlinePassed(Exception):
    """The request's deadline passed before its batch was formed (DEADLINE_EXCEEDED)."""


@dataclass
class Timing:
    queue_s: float
    compute_s: float
    total_s: float
    batch_structures: int
    batch_atoms: int


@dataclass(eq=False)
class WorkItem:
    """One structure waiting for (or in) a batch."""

    structure: Any  #: the engine's structure (opaque here; the backend reads it)
    graph: Any  #: its neighbour list (``edge_index``: (2, E)); None: built on the device with its batch
    head_index: int
    outputs: FrozenSet[str]
    tier: int
    request_id: str
    future: asyncio.Future
    deadline: Optional[float] = None  #: time.monotonic() after which it is not computed
    enqueued: float = field(default_factory=time.monotonic)
    state: str = QUEUED
    edges: int = 0  #: directed edges expected when ``graph`` is None (a guess until the batch's search)

    @property
    def n_atoms(self) -> int:
        return self.structure.n_atoms

    @property
    def n_edges(self) -> int:
        return self.edges if self.graph is None else int(self.graph.edge_index.shape[1])

    def alive(self, now: float) -> bool:
        return not self.future.done() and (self.deadline is None or now < self.deadline)


class FaultHook(Protocol):
    """Injected compute faults (:class:`macefield_server.testing.faults.InjectedFault`; tests only)."""

    def next_batch(self) -> bool: ...

    def check(self, n_atoms: int, error: bool) -> None: ...


class Batcher:
    """Queues, batches and computes requests for one served model (its :class:`.backend.Backend`).

    ``clock``: the monotonic clock (seconds) that ages, deadlines and the stall measure are read from;
    items' ``enqueued`` and ``deadline`` must be on the same clock.
    """

    def __init__(
        self,
        backend: Backend,
        config: BatchingConfig,
        metrics: Metrics,
        prep_executor: ThreadPoolExecutor,
        *,
        fault: Optional[FaultHook] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend
        self.name = backend.name
        self.fault = fault
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self.prep_executor = prep_executor
        self.compute_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{backend.name}")
        self._pending: Dict[int, Deque[WorkItem]] = {0: deque(), 1: deque(), 2: deque()}
        self._queued = 0
        self._queued_atoms = 0
        self._wake = asyncio.Event()
        self._slot = asyncio.Semaphore(1)  # one batch preparing/prepared beyond the one computing
        self._ready: asyncio.Queue = asyncio.Queue()
        self._draining = False
        self._tasks: List[asyncio.Task] = []
        self._busy = 0  # batches formed and not yet scattered
        #: time.monotonic() of the last sign of progress: a batch finished, or work arrived at an idle batcher
        self._progress_at = clock()
        self.max_atoms, self.max_edges = config.limits_for(backend.device_type)
        self._depth = metrics.queue_depth.labels(model=backend.name)
        self._depth.set(0)

    # ---------------------------------------------------------------- public
    @property
    def queued(self) -> int:
        return self._queued

    def full_message(self) -> str:
        return (
            f"queue full: {self._queued} structures / {self._queued_atoms} atoms queued for model "
            f"{self.name!r} (limits {self.config.max_queue} / {self.config.max_queue_atoms}); retry later"
        )

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._former(), name=f"former-{self.name}"),
            asyncio.create_task(self._computer(), name=f"computer-{self.name}"),
        ]

    def has_room(self, n: int, atoms: int = 0) -> bool:
        """Whether ``n`` more structures with ``atoms`` atoms in all fit in the queue now."""
        return (
            self._queued + n <= self.config.max_queue
            and self._queued_atoms + atoms <= self.config.max_queue_atoms
        )

    def submit(self, items: List[WorkItem]) -> None:
        """Queue all of ``items`` or none (QueueFull)."""
        if not self.has_room(len(items), sum(it.n_atoms for it in items)):
            raise QueueFull(self.full_message())
        if not self._queued and not self._busy:
            self._progress_at = self.clock()  # idle until now: the stall clock starts with this work
        for item in items:
            item.future.add_done_callback(functools.partial(self._left_queue, item))
            self._pending[item.tier].append(item)
        self._queued += len(items)
        self._queued_atoms += sum(it.n_atoms for it in items)
        self._depth.set(self._queued)
        self._wake.set()

    def begin_drain(self) -> None:
        """Stop waiting for company: flush queued work now (the service refuses new calls)."""
        self._draining = True
        self._wake.set()

    @property
    def busy(self) -> int:
        """Batches formed and not yet answered (preparing or computing)."""
        return self._busy

    def stalled_for(self, now: Optional[float] = None) -> float:
        """Seconds that work has been queued or computing without a batch finishing (0 when idle): the
        liveness watchdog's measure of a hung compute thread."""
        if not self._queued and not self._busy:
            return 0.0
        return max(0.0, (self.clock() if now is None else now) - self._progress_at)

    async def close(self, wait: bool = True) -> None:
        """Stop forming batches; fail what is still queued; ``wait``: let a pass that is computing finish."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for dq in self._pending.values():
            for item in dq:
                if not item.future.done():
                    item.future.set_exception(Stopped("server stopped before this request was computed"))
        # waiting for a computing pass happens off the event loop: signals (a second SIGTERM) are still handled
        await asyncio.to_thread(self.compute_executor.shutdown, wait=wait, cancel_futures=not wait)

    # ------------------------------------------------------------ internals
    def _left_queue(self, item: WorkItem, _future: Optional[asyncio.Future] = None) -> None:
        """Done-callback: a still-queued future that finished was cancelled or expired."""
        if item.state != QUEUED:
            return
        item.state = DROPPED
        self._queued -= 1
        self._queued_atoms -= item.n_atoms
        self._depth.set(self._queued)
        expired = item.deadline is not None and self.clock() >= item.deadline
        self.metrics.dropped.labels(model=self.name, reason="deadline" if expired else "cancelled").inc()

    def _expire(self, item: WorkItem) -> None:
        if not item.future.done():
            waited = self.clock() - item.enqueued
            item.future.set_exception(DeadlinePassed(f"deadline passed after {waited:.3f} s in queue"))

    def _scan(self, dq: Deque[WorkItem], now: float) -> Tuple[int, bool]:
        """(number of items the next batch takes from ``dq``, whether a limit closes it)."""
        cfg = self.config
        count = atoms = edges = 0
        for item in dq:
            if item.state != QUEUED:
                continue
            if count and (atoms + item.n_atoms > self.max_atoms or edges + item.n_edges > self.max_edges):
                return count, True
            if count and not self.backend.pass_fits(item.tier, edges + item.n_edges, atoms + item.n_atoms):
                return count, True  # the batch's pass would not fit the memory budget
            count += 1
            atoms += item.n_atoms
            edges += item.n_edges
            if count >= cfg.max_structures:
                return count, True
        return count, False

    async def _next_batch(self) -> List[WorkItem]:
        """Wait until some tier's batch closes; take its items off the queue."""
        wait_s = self.config.max_wait_ms / 1000.0
        while True:
            now = self.clock()
            chosen, chosen_age, timeout = None, -1.0, None
            for tier, dq in self._pending.items():
                while dq and dq[0].state != QUEUED:
                    dq.popleft()
                while dq and not dq[0].alive(now):  # expired at the head: answer now
                    self._expire(dq.popleft())
                if not dq:
                    continue
                age = now - dq[0].enqueued
                _, full = self._scan(dq, now)
                if full or self._draining or age >= wait_s:
                    if age > chosen_age:
                        chosen, chosen_age = tier, age
                else:
                    remaining = wait_s - age
                    timeout = remaining if timeout is None else min(timeout, remaining)
            if chosen is not None:
                return self._take(self._pending[chosen], now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _take(self, dq: Deque[WorkItem], now: float) -> List[WorkItem]:
        count, _ = self._scan(dq, now)
        batch: List[WorkItem] = []
        while dq and len(batch) < count:
            item = dq.popleft()
            if item.state != QUEUED:
                continue
            item.state = BATCHED
            self._queued -= 1
            self._queued_atoms -= item.n_atoms
            if item.alive(now):
                batch.append(item)
            else:  # cancelled (callback still pending) or expired
                reason = "cancelled" if item.future.done() else "deadline"
                self._expire(item)
                self.metrics.dropped.labels(model=self.name, reason=reason).inc()
        self._depth.set(self._queued)
        return batch

    async def _former(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slot.acquire()
            items = await self._next_batch()
            if not items:
                self._slot.release()
                continue
            self._busy += 1
            try:
                batch = await loop.run_in_executor(self.prep_executor, self.backend.collate, items)
            except Exception as exc:  # noqa: BLE001 - never take the server down
                log.warning("collate failed for requests %s: %r", [it.request_id for it in items], exc)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                self._busy -= 1
                self._slot.release()
                continue
            await self._ready.put((items, batch))

    async def _computer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items, batch = await self._ready.get()
            self._slot.release()
            try:
                now = self.clock()
                alive = [it for it in items if it.alive(now)]
                for it in items:
                    if it not in alive:
                        reason = "cancelled" if it.future.done() else "deadline"
                        self._expire(it)
                        self.metrics.dropped.labels(model=self.name, reason=reason).inc()
                if alive:
                    if len(alive) != len(items):
                        batch = None  # rebuilt on the compute thread
                    await self._compute(loop, alive, batch)
            except Exception as exc:  # noqa: BLE001
                log.warning("batch failed for requests %s: %r", [it.request_id for it in items], exc)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
            finally:
                self._busy -= 1

    async def _compute(self, loop: asyncio.AbstractEventLoop, items: List[WorkItem], batch: Any) -> None:
        start = self.clock()
        fail = self.fault.next_batch() if self.fault is not None else False
        try:
            outcomes = await loop.run_in_executor(self.compute_executor, self._compute_with_split, items, batch, fail)
        finally:
            self._progress_at = self.clock()  # a batch finished (answered or failed): the compute is alive
        elapsed = self.clock() - start
        name = self.name
        n_atoms = sum(it.n_atoms for it in items)
        self.metrics.compute.labels(model=name).observe(elapsed)
        i, passes = 0, []
        while i < len(outcomes):  # one observation per engine pass (several after an OOM split)
            _, pass_structures, pass_atoms = outcomes[i]
            self.metrics.batch_structures.labels(model=name).observe(pass_structures)
            self.metrics.batch_atoms.labels(model=name).observe(pass_atoms)
            passes.append(pass_structures)
            i += pass_structures
        self.backend.record_memory()
        done = self.clock()
        for item, (outcome, pass_structures, pass_atoms) in zip(items, outcomes):
            self.metrics.queue_wait.labels(model=name).observe(start - item.enqueued)
            if item.future.done():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                timing = Timing(start - item.enqueued, elapsed, done - item.enqueued, pass_structures, pass_atoms)
                if "extrapolation_max" in outcome:  # already cut to the item's outputs
                    self.metrics.observe_extrapolation(name, self.backend.heads[item.head_index],
                                                       float(outcome["extrapolation_max"]))
                if "field_extrapolation" in outcome:
                    self.metrics.observe_field_extrapolation(name, self.backend.heads[item.head_index],
                                                             float(outcome["field_extrapolation"]))
                item.future.set_result((outcome, timing))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                json.dumps(
                    {
                        "event": "batch",
                        "model": name,
                        "tier": items[0].tier,
                        "structures": len(items),
                        "atoms": n_atoms,
                        "edges": sum(it.n_edges for it in items),
                        "passes": passes,
                        "compute_ms": round(elapsed * 1e3, 3),
                        "oldest_wait_ms": round((start - min(it.enqueued for it in items)) * 1e3, 3),
                        "request_ids": [it.request_id for it in items][:16],
                    }
                )
            )

    def compute_items(self, items: List[WorkItem]) -> list:
        """Collate and evaluate ``items`` now, on the calling thread (warm-up); see :meth:`_compute_with_split`."""
        return self._compute_with_split(items, None, faults=False)

    def _compute_with_split(self, items: List[WorkItem], batch: Any, fail: bool = False,
                            faults: bool = True) -> List[Tuple[Outcome, int, int]]:
        """Evaluate ``items``; on out-of-memory split in halves and retry (compute thread).

        Returns one (result dict or exception, structures in its pass, atoms in its pass) per item.
        """
        try:
            if batch is None:
                batch = self.backend.collate(items)
            n_atoms = sum(it.n_atoms for it in items)
            if self.fault is not None and faults:  # warm-up (compute_items) never sees injected faults
                self.fault.check(n_atoms, fail)
            return [(outcome, len(items), n_atoms) for outcome in self.backend.evaluate(batch, items)]
        except Exception as exc:  # noqa: BLE001
            if not self.backend.is_out_of_memory(exc):
                raise
            del batch
            self.backend.release_memory()
            if len(items) == 1:
                n = items[0].n_atoms
                log.warning("request %s: %d atoms do not fit in memory alone: %s", items[0].request_id, n, exc)
                return [(DoesNotFit(f"a structure of {n} atoms does not fit in memory on "
                                    f"{self.backend.device_type}"), 1, n)]
            self.metrics.oom_splits.labels(model=self.name).inc()
            half = len(items) // 2
            log.warning("out of memory on a batch of %d structures; retrying as %d + %d", len(items), half,
                        len(items) - half)
            return self._compute_with_split(items[:half], None, faults=faults) + self._compute_with_split(
                items[half:], None, faults=faults
            )
