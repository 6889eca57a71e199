"""Dynamic batching of queued structures into single response-engine passes (one batcher per model).

Pipeline (asyncio on the server's event loop, CPU/GPU work on threads)::

    submit() -> per-tier FIFO queues -> [former] close a batch, collate it (prep thread)
             -> [computer] evaluate (compute thread) -> scatter results to each caller's future

* Requests are grouped by output tier (0: energy, 1: first derivatives,
  2: Born charges / polarizability); heads and fields mix freely in a batch.
* A batch closes when it holds ``max_structures``, or adding the next
  structure would pass ``max_atoms`` / ``max_edges`` (per device when
  "auto", see :data:`.config.AUTO_LIMITS`), or its oldest request has waited
  ``max_wait_ms`` (immediately while draining).  A structure larger than the
  limits is computed alone.
* The former prepares batch k+1 (collate: tensor assembly) while batch k
  computes; neighbour lists are built per request on admission (prep thread).
* The queue is bounded (``max_queue`` structures): :meth:`Batcher.submit`
  raises :class:`QueueFull` at once beyond it.  Cancelled callers and passed
  deadlines leave the queue without being computed.
* Out of memory during a batch: it is split in halves that are retried; a
  structure that does not fit alone fails with :class:`DoesNotFit`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import torch

from .config import BatchingConfig
from .metrics import Metrics
from .model.graph import GraphBatch, NeighbourGraph, Structure, collate
from .model.predict import NonFiniteResult, check_finite, graded_head_indices, keep_requested, split_results
from .model.response import engine_outputs, respond
from .registry import ServedModel

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

    structure: Structure
    graph: NeighbourGraph
    head_index: int
    outputs: FrozenSet[str]
    tier: int
    request_id: str
    future: asyncio.Future
    deadline: Optional[float] = None  #: time.monotonic() after which it is not computed
    enqueued: float = field(default_factory=time.monotonic)
    state: str = QUEUED

    @property
    def n_atoms(self) -> int:
        return self.structure.n_atoms

    @property
    def n_edges(self) -> int:
        return int(self.graph.edge_index.shape[1])

    def alive(self, now: float) -> bool:
        return not self.future.done() and (self.deadline is None or now < self.deadline)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class InjectedFault:
    """Test-only compute faults at the batch boundary, from ``$MACEFIELD_TEST_FAULT`` (off when unset).

    Read once when the server starts; comma-separated:

    * ``oom_above_atoms=N``: every engine pass (after any split) with more than
      N atoms raises an out-of-memory RuntimeError, as CUDA would: batches are
      split in halves, a lone structure above N atoms gets RESOURCE_EXHAUSTED.
    * ``error_on_batch=K``: the K-th batch computed after warm-up (1-based)
      raises a generic RuntimeError: its requests get INTERNAL, later batches
      are served.
    * ``compute_delay_s=S``: every batch after warm-up takes S more seconds
      (a slow model: drain and shutdown tests).
    * ``load_delay_s=S``: the server waits S seconds before loading its models
      (health NOT_SERVING meanwhile: probe tests see a replica that is loading).

    For fault tests only; never set it in production.
    """

    ENV = "MACEFIELD_TEST_FAULT"
    KEYS = ("oom_above_atoms", "error_on_batch", "compute_delay_s", "load_delay_s")

    def __init__(self, oom_above_atoms: Optional[int] = None, error_on_batch: Optional[int] = None,
                 compute_delay_s: Optional[int] = None, load_delay_s: Optional[int] = None):
        self.oom_above_atoms = oom_above_atoms
        self.error_on_batch = error_on_batch
        self.compute_delay_s = compute_delay_s
        self.load_delay_s = load_delay_s
        self.batches = 0

    @classmethod
    def from_env(cls, environ=None) -> Optional["InjectedFault"]:
        import os

        text = (environ if environ is not None else os.environ).get(cls.ENV, "").strip()
        if not text:
            return None
        values: Dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if key not in cls.KEYS or not sep or not value.strip().isdigit():
                raise ValueError(f"{cls.ENV}: expected comma-separated {'=N, '.join(cls.KEYS)}=N, got {text!r}")
            values[key] = int(value)
        fault = cls(**values)
        log.warning("%s=%s: injecting compute faults (test only)", cls.ENV, text)
        return fault

    def next_batch(self) -> bool:
        """Count one served batch; whether it is the one that fails."""
        self.batches += 1
        return self.error_on_batch is not None and self.batches == self.error_on_batch

    def check(self, n_atoms: int, error: bool) -> None:
        if self.compute_delay_s:
            time.sleep(self.compute_delay_s)
        if error:
            raise RuntimeError(f"injected compute error on batch {self.batches} ({self.ENV})")
        if self.oom_above_atoms is not None and n_atoms > self.oom_above_atoms:
            raise RuntimeError(
                f"CUDA out of memory (injected: {n_atoms} atoms > {self.oom_above_atoms}, {self.ENV})"
            )


EvaluateFn = Callable[[torch.nn.Module, GraphBatch, FrozenSet[str]], List[Dict[str, np.ndarray]]]


def default_evaluate(model, batch: GraphBatch, outputs: FrozenSet[str]) -> List[Dict[str, np.ndarray]]:
    """The response engine on one batch, split per structure (runs on the compute thread).

    ``outputs``: the requested names of every structure in the batch; each
    caller's result is cut to its own request afterwards (:func:`keep_requested`).
    """
    needed = engine_outputs(outputs)
    return split_results(batch, respond(model, batch.tensors, None, needed), needed, graded_head_indices(model))


class Batcher:
    """Queues, batches and computes requests for one :class:`ServedModel`."""

    def __init__(
        self,
        served: ServedModel,
        config: BatchingConfig,
        metrics: Metrics,
        prep_executor: ThreadPoolExecutor,
        *,
        evaluate_fn: EvaluateFn = default_evaluate,
        fault: Optional[InjectedFault] = None,
    ):
        self.served = served
        self.fault = fault
        self.config = config
        self.metrics = metrics
        self.prep_executor = prep_executor
        self.compute_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{served.name}")
        self.evaluate_fn = evaluate_fn
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
        self._progress_at = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()
        self._atomic_numbers = [int(z) for z in served.model.atomic_numbers]
        self.max_atoms, self.max_edges = config.limits_for(served.device.type)
        self._depth = metrics.queue_depth.labels(model=served.name)
        self._depth.set(0)

    # ---------------------------------------------------------------- public
    @property
    def queued(self) -> int:
        return self._queued

    def full_message(self) -> str:
        return (
            f"queue full: {self._queued} structures / {self._queued_atoms} atoms queued for model "
            f"{self.served.name!r} (limits {self.config.max_queue} / {self.config.max_queue_atoms}); retry later"
        )

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._former(), name=f"former-{self.served.name}"),
            asyncio.create_task(self._computer(), name=f"computer-{self.served.name}"),
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
            self._progress_at = time.monotonic()  # idle until now: the stall clock starts with this work
        for item in items:
            item.future.add_done_callback(lambda _f, it=item: self._left_queue(it))
            self._pending[item.tier].append(item)
        self._queued += len(items)
        self._queued_atoms += sum(it.n_atoms for it in items)
        self._depth.set(self._queued)
        self._idle.clear()
        self._wake.set()

    def begin_drain(self) -> None:
        """Stop waiting for company: flush queued work now (the service refuses new calls)."""
        self._draining = True
        self._wake.set()

    async def wait_idle(self) -> None:
        while self._queued or self._busy:
            self._idle.clear()
            await self._idle.wait()

    @property
    def busy(self) -> int:
        """Batches formed and not yet answered (preparing or computing)."""
        return self._busy

    def stalled_for(self, now: Optional[float] = None) -> float:
        """Seconds that work has been queued or computing without a batch finishing (0 when idle): the
        liveness watchdog's measure of a hung compute thread."""
        if not self._queued and not self._busy:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self._progress_at)

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
    def _left_queue(self, item: WorkItem) -> None:
        """Done-callback: a still-queued future that finished was cancelled or expired."""
        if item.state != QUEUED:
            return
        item.state = DROPPED
        self._queued -= 1
        self._queued_atoms -= item.n_atoms
        self._depth.set(self._queued)
        expired = item.deadline is not None and time.monotonic() >= item.deadline
        self.metrics.dropped.labels(model=self.served.name, reason="deadline" if expired else "cancelled").inc()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queued and not self._busy:
            self._idle.set()

    def _expire(self, item: WorkItem) -> None:
        if not item.future.done():
            item.future.set_exception(DeadlinePassed(f"deadline passed after {time.monotonic() - item.enqueued:.3f} s in queue"))

    def _scan(self, dq: Deque[WorkItem], now: float) -> Tuple[int, bool]:
        """(number of items the next batch takes from ``dq``, whether a limit closes it)."""
        cfg = self.config
        count = atoms = edges = 0
        memory, budget = self.served.memory, self.served.budget
        for item in dq:
            if item.state != QUEUED:
                continue
            if count and (atoms + item.n_atoms > self.max_atoms or edges + item.n_edges > self.max_edges):
                return count, True
            if count and memory is not None and budget is not None and memory.estimate(
                    item.tier, edges + item.n_edges, atoms + item.n_atoms) > budget.per_pass:
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
            now = time.monotonic()
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
                self.metrics.dropped.labels(model=self.served.name, reason=reason).inc()
        self._depth.set(self._queued)
        return batch

    def _collate(self, items: List[WorkItem]) -> GraphBatch:
        model = self.served.model
        return collate(
            [it.structure for it in items],
            [it.graph for it in items],
            atomic_numbers=self._atomic_numbers,
            head_index=[it.head_index for it in items],
            dtype=self.served.dtype,
            device=self.served.device,
        )

    async def _former(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slot.acquire()
            items = await self._next_batch()
            if not items:
                self._slot.release()
                self._check_idle()
                continue
            self._busy += 1
            try:
                batch = await loop.run_in_executor(self.prep_executor, self._collate, items)
            except Exception as exc:  # noqa: BLE001 - never take the server down
                log.warning("collate failed for requests %s: %r", [it.request_id for it in items], exc)
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                self._busy -= 1
                self._slot.release()
                self._check_idle()
                continue
            await self._ready.put((items, batch))

    async def _computer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items, batch = await self._ready.get()
            self._slot.release()
            try:
                now = time.monotonic()
                alive = [it for it in items if it.alive(now)]
                for it in items:
                    if it not in alive:
                        reason = "cancelled" if it.future.done() else "deadline"
                        self._expire(it)
                        self.metrics.dropped.labels(model=self.served.name, reason=reason).inc()
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
                self._check_idle()

    async def _compute(self, loop, items: List[WorkItem], batch: Optional[GraphBatch]) -> None:
        start = time.monotonic()
        fail = self.fault.next_batch() if self.fault is not None else False
        try:
            outcomes = await loop.run_in_executor(self.compute_executor, self._compute_with_split, items, batch, fail)
        finally:
            self._progress_at = time.monotonic()  # a batch finished (answered or failed): the compute is alive
        elapsed = time.monotonic() - start
        name = self.served.name
        n_atoms = sum(it.n_atoms for it in items)
        self.metrics.compute.labels(model=name).observe(elapsed)
        i, passes = 0, []
        while i < len(outcomes):  # one observation per engine pass (several after an OOM split)
            _, pass_structures, pass_atoms = outcomes[i]
            self.metrics.batch_structures.labels(model=name).observe(pass_structures)
            self.metrics.batch_atoms.labels(model=name).observe(pass_atoms)
            passes.append(pass_structures)
            i += pass_structures
        self.metrics.record_gpu_memory(self.served.device)
        done = time.monotonic()
        for item, (outcome, pass_structures, pass_atoms) in zip(items, outcomes):
            self.metrics.queue_wait.labels(model=name).observe(start - item.enqueued)
            if item.future.done():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                timing = Timing(start - item.enqueued, elapsed, done - item.enqueued, pass_structures, pass_atoms)
                if "extrapolation_max" in outcome:  # already cut to the item's outputs
                    self.metrics.observe_extrapolation(name, self.served.heads[item.head_index],
                                                       float(outcome["extrapolation_max"]))
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

    def _finite(self, result, item: WorkItem):
        """The result, or :class:`NonFiniteResult` for this structure alone (the batch's others are served)."""
        try:
            return check_finite(result, item.graph, item.structure.numbers)
        except NonFiniteResult as exc:
            log.warning("request %s: %s", item.request_id, exc)
            self.metrics.non_finite.labels(model=self.served.name).inc()
            return exc

    def _compute_with_split(
        self, items: List[WorkItem], batch: Optional[GraphBatch], fail: bool = False, faults: bool = True
    ) -> list:
        """Evaluate ``items``; on OOM split in halves and retry (compute thread).

        Returns one (result dict or exception, structures in its pass, atoms in its pass) per item.
        """
        outputs = frozenset().union(*(it.outputs for it in items))
        try:
            if batch is None:
                batch = self._collate(items)
            n_atoms = sum(it.n_atoms for it in items)
            if self.fault is not None and faults:  # warm-up (compute_items) never sees injected faults
                self.fault.check(n_atoms, fail)
            results = self.evaluate_fn(self.served.model, batch, outputs)
            return [(self._finite(keep_requested(r, it.outputs), it), len(items), n_atoms)
                    for r, it in zip(results, items)]
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            del batch
            if self.served.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                n = items[0].n_atoms
                log.warning("request %s: %d atoms do not fit in memory alone: %s", items[0].request_id, n, exc)
                return [(DoesNotFit(f"a structure of {n} atoms does not fit in memory on {self.served.device}"), 1, n)]
            self.metrics.oom_splits.labels(model=self.served.name).inc()
            half = len(items) // 2
            log.warning("out of memory on a batch of %d structures; retrying as %d + %d", len(items), half, len(items) - half)
            return self._compute_with_split(items[:half], None, faults=faults) + self._compute_with_split(
                items[half:], None, faults=faults
            )
