"""Neighbour lists built in worker processes (``batching.prep_mode: process``).

A prep thread runs vesin's search without the GIL, but the numpy around it
(wrapping into the cell, the mirrored half list) holds it: threads gain at
most ~1.4x however many cores there are.  Worker processes each have their
own interpreter, so the whole list is built in parallel.

Each task is a chunk of structures (the calls waiting for a worker, split
across the workers); a worker returns, per structure, one packed ``uint8``
buffer holding the canonical positions (N, 3) float64 and vesin's half list
(atom indices int32, unit shifts int8 where they fit), plus the cell and
the shortest edge: about a seventh of the bytes of the mirrored list.  The
server mirrors it (:func:`..engine.graph.mirrored`, the step the in-process
list ends with): the lists are bitwise the ones
:func:`..engine.graph.neighbour_list` builds in process.

Workers start from a forkserver that has imported :mod:`..engine.graph` once
(torch comes with the engine package: it is paid once in the forkserver, not per worker).
A worker that dies (killed, crashed) breaks the pool: it is rebuilt and the
affected tasks are retried once on the new pool; a second loss gives
:class:`PrepUnavailable` (UNAVAILABLE on the wire).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import List, Optional, Sequence, Set, Tuple, cast

import numpy as np

from ..engine.graph import ClosestPair, HalfGraph, NeighbourGraph, Structure, half_neighbour_list, \
    neighbour_backend, neighbour_list, set_neighbour_backend

log = logging.getLogger("macefield.prep")

#: (structure, cutoff in Angstrom) of one neighbour list
Job = Tuple[Structure, float]
#: one structure's list as a worker returns it: (kind, packed buffer, atoms N, pairs m, shift dtype, cell,
#: closest pair as a tuple or None); kind "half": vesin's half list, "full": the mirrored list (matscipy)
Packed = Tuple[str, np.ndarray, int, int, str, np.ndarray, Optional[Tuple[int, int, Tuple[int, int, int], float]]]


class PrepUnavailable(RuntimeError):
    """The prep workers died twice while building a call's neighbour lists (UNAVAILABLE: retry later)."""


def _start_worker(backend: str) -> None:
    set_neighbour_backend(backend)


def _closest(pair: Optional[ClosestPair]):
    return None if pair is None else (pair.i, pair.j, pair.shift, pair.distance)


def _pair(closest) -> Optional[ClosestPair]:
    return None if closest is None else ClosestPair(closest[0], closest[1], closest[2], closest[3])


def pack(structure: Structure, cutoff: float) -> Packed:
    """The neighbour list of ``structure`` as one contiguous buffer and its small parts.

    vesin: the half list, atom indices as int32 and shifts as int8 when they fit (else int32), after the
    canonical positions (float64): about a seventh of the mirrored list's bytes.  matscipy: the full list
    (edge_index int64, unit_shifts float64, positions).
    """
    n = structure.n_atoms
    if neighbour_backend() == "vesin" and n:
        half = half_neighbour_list(structure, cutoff)
        m = int(half.i.shape[0])
        small = m == 0 or int(np.abs(half.shifts).max()) < 127
        shift_type = "i1" if small else "i4"
        nbytes = 24 * n + 8 * m + 3 * m * np.dtype(shift_type).itemsize
        buffer = np.empty(nbytes, dtype=np.uint8)
        buffer[:24 * n].view(np.float64).reshape(n, 3)[:] = half.positions
        indices = buffer[24 * n:24 * n + 8 * m].view(np.int32)
        indices[:m] = half.i
        indices[m:] = half.j
        buffer[24 * n + 8 * m:].view(shift_type).reshape(m, 3)[:] = half.shifts
        return "half", buffer, n, m, shift_type, half.cell, _closest(half.closest)
    graph = neighbour_list(structure, cutoff)
    e = int(graph.edge_index.shape[1])
    positions = graph.positions if graph.positions is not None else np.zeros((0, 3))
    buffer = np.empty(8 * (2 * e + 3 * e + 3 * n), dtype=np.uint8)
    words = buffer.view(np.float64)
    words[:3 * n].reshape(n, 3)[:] = positions
    words[3 * n:3 * n + 2 * e].view(np.int64).reshape(2, e)[:] = graph.edge_index
    words[3 * n + 2 * e:].reshape(e, 3)[:] = graph.unit_shifts
    return "full", buffer, n, e, "f8", graph.cell, _closest(graph.closest)


def unpack(packed: Packed) -> NeighbourGraph:
    """The :class:`NeighbourGraph` of :func:`pack`'s output (positions: a view of the buffer)."""
    kind, buffer, n, m, shift_type, cell, closest = packed
    positions = buffer[:24 * n].view(np.float64).reshape(n, 3)
    if kind == "half":
        indices = buffer[24 * n:24 * n + 8 * m].view(np.int32)
        shifts = buffer[24 * n + 8 * m:].view(shift_type).reshape(m, 3)
        return HalfGraph(indices[:m], indices[m:], shifts, cell, positions, _pair(closest)).graph()
    words = buffer.view(np.float64)
    edge_index = words[3 * n:3 * n + 2 * m].view(np.int64).reshape(2, m)
    unit_shifts = words[3 * n + 2 * m:].reshape(m, 3)
    return NeighbourGraph(edge_index=edge_index, unit_shifts=unit_shifts, cell=cell, closest=_pair(closest),
                          positions=positions)


def build_packed(jobs: Sequence[Job]) -> List[Packed]:
    """The worker's task: the neighbour list of every job, packed."""
    return [pack(structure, cutoff) for structure, cutoff in jobs]


class _Call:
    """The lists of one :meth:`ProcessPrep.graphs` call as they come back (possibly from several workers)."""

    def __init__(self, n: int, future: "asyncio.Future[List[NeighbourGraph]]"):
        self.graphs: List[Optional[NeighbourGraph]] = [None] * n
        self.left = n
        self.future = future

    def put(self, k: int, graph: NeighbourGraph) -> None:
        self.graphs[k] = graph
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(cast(List[NeighbourGraph], self.graphs))


class ProcessPrep:
    """A pool of ``workers`` processes building neighbour lists; rebuilt when a worker dies.

    Calls are coalesced: the jobs of the calls that arrive while all workers are busy wait, and a worker
    that frees up takes a 1/workers share of them in one message (instead of one message per call), so
    the cost of a round trip to a worker is shared by the concurrent calls and the workers stay balanced.
    Used from one event loop at a time.
    """

    def __init__(self, workers: int, backend: Optional[str] = None):
        self.workers = workers
        self.backend = backend or neighbour_backend()
        self._lock = threading.Lock()
        self._closed = False
        self.rebuilds = 0  #: pools replaced after a worker died
        self._pool = self._new_pool()
        self._pending: List[Tuple[Job, _Call, int]] = []  #: (job, its call, its place in the call)
        self._busy = 0  #: tasks on the workers now
        self._tasks: Set["asyncio.Task[None]"] = set()

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["macefield_server.engine.graph"])
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_start_worker,
                                   initargs=(self.backend,))

    def warm(self) -> None:
        """Start every worker now (the forkserver's imports and the first search paid before serving)."""
        probe = (Structure(np.array([14]), np.zeros((1, 3)), np.eye(3) * 3.0, np.ones(3, dtype=bool)), 2.0)
        for f in [self._pool.submit(build_packed, [probe]) for _ in range(self.workers)]:
            f.result()

    def pids(self) -> List[int]:
        """Process ids of the current workers (for operators and tests)."""
        return sorted(p.pid for p in list(getattr(self._pool, "_processes", {}).values()) if p.pid is not None)

    def _current(self, broken: Optional[ProcessPoolExecutor]) -> ProcessPoolExecutor:
        """The pool to submit to; ``broken``: a pool seen broken, replaced here unless already replaced."""
        with self._lock:
            if self._closed:
                raise PrepUnavailable("the prep pool is shut down")
            if broken is not None and self._pool is broken:  # the first to see it broken replaces it
                log.warning("a prep worker died: the process pool is rebuilt")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self.rebuilds += 1
            return self._pool

    async def _part(self, part: List[Job]) -> List[Packed]:
        """One worker task, retried once on a rebuilt pool if a worker dies."""
        broken: Optional[ProcessPoolExecutor] = None
        try:
            for attempt in range(2):
                pool = self._current(broken)
                try:
                    return await asyncio.wrap_future(pool.submit(build_packed, part))
                except BrokenProcessPool:
                    broken = pool
            raise PrepUnavailable("a prep worker died twice while building this call's neighbour lists; "
                                  "retry later")
        finally:
            self._busy -= 1
            self._flush()

    def _flush(self) -> None:
        """Send what is pending to the free workers, a 1/workers share each (the rest waits for a worker)."""
        if not self._pending or self._busy >= self.workers:
            return
        share = -(-len(self._pending) // self.workers)  # ceil: the pending jobs spread over all the workers
        loop = asyncio.get_running_loop()
        while self._pending and self._busy < self.workers:
            part, self._pending = self._pending[:share], self._pending[share:]
            self._busy += 1
            task = loop.create_task(self._answer(part))
            self._tasks.add(task)  # a reference until done (the loop keeps only weak ones)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, part: List[Tuple[Job, _Call, int]]) -> None:
        try:
            packed = await self._part([job for job, _, _ in part])
        except BaseException as exc:  # noqa: BLE001  (handed to every waiting call)
            for _, call, _ in part:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        for (_, call, k), one in zip(part, packed):
            if not call.future.done():  # a cancelled call: its lists are dropped
                call.put(k, unpack(one))

    async def graphs(self, jobs: Sequence[Job]) -> List[NeighbourGraph]:
        """The neighbour list of every job, built on the workers (order kept)."""
        if not jobs:
            return []
        call = _Call(len(jobs), asyncio.get_running_loop().create_future())
        self._pending.extend((job, call, k) for k, job in enumerate(jobs))
        self._flush()
        return await call.future

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
