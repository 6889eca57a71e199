"""A model-free :class:`macefield_server.serving.backend.Backend` and clock for unit tests of the serving layer.

``FakeBackend`` implements the Backend protocol in plain Python: ``collate`` returns the item list,
``evaluate`` records which requests each pass held and answers one dict per structure, ``pass_fits`` reads a
fake memory budget, and ``is_out_of_memory`` recognises :class:`FakeOutOfMemory` (raised above a set number of
atoms per pass).  ``FakeClock`` is a monotonic clock the test moves by hand, counting how often it is read.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Self

import numpy as np
from macefield_server.engine.predict import NonFiniteResult
from macefield_server.serving.batcher import Batcher, WorkItem
from macefield_server.serving.config import BatchingConfig
from macefield_server.serving.metrics import Metrics

#: the harness's max_wait_ms: 1/64 s, so that ages on the fake clock add up exactly (no 0.009999 < 0.01); with the
#: clock frozen the batcher's former looks at the queue every 15.6 ms of real time
WAIT_MS = 15.625
WAIT_S = WAIT_MS / 1000.0


class FakeOutOfMemory(Exception):
    """What the fake device raises when a pass holds too many atoms."""


class FakeClock:
    """A monotonic clock that only moves when the test says so; ``reads`` counts the calls."""

    def __init__(self, start: float = 1024.0):
        self.now = start
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """The Backend protocol without a model.

    ``budget(tier, edges, atoms)``: the memory budget (None: everything fits); ``oom_above``: a pass of more
    atoms raises :class:`FakeOutOfMemory`; ``non_finite``: request ids answered :class:`NonFiniteResult`;
    ``gate``: evaluate blocks until it is set (a compute that hangs).
    """

    def __init__(self, name: str = "fake", heads: Sequence[str] = ("a", "b"),
                 budget: Callable[[int, int, int], bool] | None = None, oom_above: int | None = None,
                 non_finite: Sequence[str] = (), gate: threading.Event | None = None):
        self.name = name
        self.device_type = "cpu"
        self.heads = list(heads)
        self.budget = budget
        self.oom_above = oom_above
        self.non_finite = set(non_finite)
        self.gate = gate
        self.passes: list[list[str]] = []  #: request ids of every pass that was answered
        self.failed_passes: list[list[str]] = []  #: request ids of every pass that ran out of memory
        self.collated: list[list[str]] = []
        self.fits_asked: list[tuple] = []
        self.released = 0
        self.recorded = 0

    def collate(self, items):
        self.collated.append([it.request_id for it in items])
        return list(items)

    def evaluate(self, batch, items) -> list:
        assert [id(b) for b in batch] == [id(it) for it in items], "evaluate got a batch of other items"
        if self.gate is not None:
            self.gate.wait(30)
        ids = [it.request_id for it in items]
        if self.oom_above is not None and sum(it.n_atoms for it in items) > self.oom_above:
            self.failed_passes.append(ids)
            raise FakeOutOfMemory(f"out of fake memory: {sum(it.n_atoms for it in items)} atoms")
        self.passes.append(ids)
        return [NonFiniteResult(f"energy is nan for {it.request_id}") if it.request_id in self.non_finite
                else {"request_id": it.request_id, "head": self.heads[it.head_index], "tier": it.tier,
                      "energy": np.float64(-1.5 * it.n_atoms)}
                for it in items]

    def pass_fits(self, tier: int, edges: int, atoms: int) -> bool:
        self.fits_asked.append((tier, edges, atoms))
        return self.budget is None or self.budget(tier, edges, atoms)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, FakeOutOfMemory)

    def release_memory(self) -> None:
        self.released += 1

    def record_memory(self) -> None:
        self.recorded += 1


def fake_item(request_id: str, n_atoms: int = 3, n_edges: int = 10, tier: int = 1, head_index: int = 0,
              deadline: float | None = None, enqueued: float | None = None,
              clock: Callable[[], float] = time.monotonic) -> WorkItem:
    """A queued structure of ``n_atoms`` atoms and ``n_edges`` edges (no real structure: the fake backend
    reads only the sizes); its future belongs to the running event loop."""
    return WorkItem(
        structure=SimpleNamespace(n_atoms=n_atoms),
        graph=SimpleNamespace(edge_index=np.zeros((2, n_edges), dtype=np.int64)),
        head_index=head_index,
        outputs=frozenset({"energy"}),
        tier=tier,
        request_id=request_id,
        future=asyncio.get_running_loop().create_future(),
        deadline=deadline,
        enqueued=clock() if enqueued is None else enqueued,
    )


def sample(metrics: Metrics, name: str, **labels) -> float:
    """One sample of ``metrics``' own registry (0.0 when it has not been created yet)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Harness:
    """A started :class:`Batcher` over a :class:`FakeBackend`; use as ``async with``."""

    def __init__(self, backend: FakeBackend | None = None, clock: FakeClock | None = None, **batching):
        self.backend = backend or FakeBackend()
        self.clock = clock or FakeClock()
        self.metrics = Metrics()
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-prep")
        batching.setdefault("max_wait_ms", WAIT_MS)
        self.config = BatchingConfig(**batching)
        self.batcher: Batcher | None = None

    async def __aenter__(self) -> Self:
        self.batcher = Batcher(self.backend, self.config, self.metrics, self.prep, clock=self.clock)
        self.batcher.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.batcher.close()
        self.prep.shutdown(wait=True)

    def item(self, request_id: str, **kwargs) -> WorkItem:
        return fake_item(request_id, clock=self.clock, **kwargs)

    def depth(self) -> float:
        return sample(self.metrics, "macefield_queue_depth", model=self.backend.name)

    def dropped(self, reason: str) -> float:
        return sample(self.metrics, "macefield_dropped_total", model=self.backend.name, reason=reason)

    async def looked(self, times: int = 3) -> None:
        """Wait until the former has looked at the queue ``times`` more times (each look reads the clock) and
        left it as it was: what "nothing happens" means without sleeping for a guessed time."""
        target = self.clock.reads + 2 * times  # a look reads the clock at least once; be generous
        await until(lambda: self.clock.reads >= target, what=f"{times} looks at the queue")


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Yield to the event loop until ``condition()`` holds (AssertionError after ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


def flat(passes) -> list:
    """The request ids of ``passes``, one list, in pass order."""
    return [request_id for ids in passes for request_id in ids]


def outcome(future: asyncio.Future) -> dict:
    """The result dict of a finished item's future (its Timing dropped)."""
    values, _timing = future.result()
    return values
