"""The batcher on its own: batch formation, waiting, deadlines, cancellation, queue bounds, memory budget,
out-of-memory splits, non-finite results, draining and stopping, with a fake backend and a hand-moved clock."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_backend import (
    WAIT_MS,
    WAIT_S,
    FakeBackend,
    FakeClock,
    Harness,
    flat,
    outcome,
    sample,
    until,
)
from macefield_server.engine.predict import NonFiniteResult
from macefield_server.serving.batcher import (
    DeadlinePassed,
    DoesNotFit,
    QueueFull,
    Stopped,
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ------------------------------------------------------------------------------------------ batch formation
def test_max_structures_closes_a_batch_without_waiting():
    async def main():
        async with Harness(max_structures=3, max_wait_ms=WAIT_MS) as h:
            items = [h.item(f"r{i}") for i in range(7)]
            h.batcher.submit(items)
            await until(lambda: len(h.backend.passes) == 2, what="two full batches")
            await h.looked()
            # the clock never moved: only full batches closed; the seventh waits for company
            assert h.backend.passes == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
            assert h.batcher.queued == 1 and h.depth() == 1
            for it in items[:6]:
                _, timing = it.future.result()
                assert timing.batch_structures == 3 and timing.batch_atoms == 9
            assert not items[6].future.done()

    run(main())


@pytest.mark.parametrize("limit, sizes, expected", [
    ({"max_atoms": 10}, [(4, 1), (4, 1), (4, 1), (4, 1), (4, 1)], [["r0", "r1"], ["r2", "r3"]]),
    ({"max_edges": 25}, [(1, 10), (1, 10), (1, 10), (1, 10), (1, 10)], [["r0", "r1"], ["r2", "r3"]]),
    ({"max_atoms": 10}, [(2, 1), (12, 1), (2, 1), (2, 1)], [["r0"], ["r1"]]),  # too large: computed alone
])
def test_atom_and_edge_limits_close_a_batch(limit, sizes, expected):
    async def main():
        async with Harness(max_structures=64, **limit) as h:
            h.batcher.submit([h.item(f"r{i}", n_atoms=a, n_edges=e) for i, (a, e) in enumerate(sizes)])
            await until(lambda: len(h.backend.passes) == len(expected), what="the closed batches")
            await h.looked()
            assert h.backend.passes == expected  # the rest is not full: it waits (clock frozen)
            h.batcher.begin_drain()
            await until(lambda: h.batcher.queued == 0 and h.batcher.busy == 0, what="the rest")
            assert flat(h.backend.passes) == [f"r{i}" for i in range(len(sizes))]

    run(main())


def test_tiers_are_never_mixed_and_heads_are():
    async def main():
        async with Harness(max_structures=64) as h:
            items = [h.item(f"r{i}", tier=i % 3, head_index=(i // 3) % 2) for i in range(12)]
            h.batcher.submit(items)
            h.batcher.begin_drain()
            await until(lambda: all(it.future.done() for it in items), what="every item")
            assert sorted(flat(h.backend.passes)) == sorted(it.request_id for it in items)
            assert len(h.backend.passes) == 3
            for ids in h.backend.passes:
                answers = [outcome(it.future) for it in items if it.request_id in ids]
                assert len({a["tier"] for a in answers}) == 1, answers
                assert {a["head"] for a in answers} == {"a", "b"}, answers
            for it in items:  # every answer is its own structure's
                assert outcome(it.future)["request_id"] == it.request_id
                assert outcome(it.future)["head"] == "ab"[it.head_index]

    run(main())


def test_max_wait_closes_a_batch_that_is_not_full():
    async def main():
        async with Harness(max_structures=64, max_wait_ms=WAIT_MS) as h:
            h.batcher.submit([h.item("r0"), h.item("r1")])
            await h.looked(5)
            assert h.backend.passes == []  # younger than max_wait_ms on the batcher's clock
            h.clock.advance(WAIT_S * 0.75)
            await h.looked(5)
            assert h.backend.passes == []
            h.clock.advance(WAIT_S * 0.25)
            await until(lambda: h.backend.passes, what="the batch to close")
            assert h.backend.passes == [["r0", "r1"]]

    run(main())


def test_the_memory_budget_closes_a_batch():
    def budget(tier, edges, atoms):
        return atoms <= 6

    async def main():
        async with Harness(FakeBackend(budget=budget), max_structures=64) as h:
            h.batcher.submit([h.item(f"r{i}", n_atoms=3, tier=2) for i in range(5)])
            await until(lambda: len(h.backend.passes) == 2, what="two batches the budget closed")
            assert h.backend.passes == [["r0", "r1"], ["r2", "r3"]]
            assert (2, 30, 9) in h.backend.fits_asked  # asked with the tier and the batch's edges and atoms

    run(main())


# ----------------------------------------------------------------------------- deadlines and cancellation
def test_expired_item_at_the_head_is_answered_deadline_passed_and_never_evaluated():
    async def main():
        clock = FakeClock()
        async with Harness(clock=clock, max_structures=64) as h:
            late = h.item("late", deadline=clock.now + WAIT_S / 2)
            h.batcher.submit([late])
            clock.advance(WAIT_S / 2)
            await until(late.future.done, what="the deadline answer")
            with pytest.raises(DeadlinePassed):
                late.future.result()
            await until(lambda: h.dropped("deadline") == 1, what="the drop count")
            assert h.depth() == 0 and h.batcher.queued == 0
            assert h.backend.passes == [] and h.backend.collated == []

    run(main())


def test_expired_item_inside_a_batch_is_left_out():
    async def main():
        clock = FakeClock()
        async with Harness(clock=clock, max_structures=64) as h:
            items = [h.item("r0"), h.item("r1", deadline=clock.now + WAIT_S), h.item("r2")]
            h.batcher.submit(items)
            clock.advance(WAIT_S)  # the batch closes and r1's deadline passes at the same moment
            await until(lambda: all(it.future.done() for it in items), what="every answer")
            assert h.backend.passes == [["r0", "r2"]]
            with pytest.raises(DeadlinePassed):
                items[1].future.result()
            assert h.dropped("deadline") == 1 and h.dropped("cancelled") == 0

    run(main())


def test_cancelled_item_leaves_the_queue_and_is_not_computed():
    async def main():
        async with Harness(max_structures=64) as h:
            keep, gone = h.item("keep"), h.item("gone")
            h.batcher.submit([keep, gone])
            assert h.depth() == 2
            gone.future.cancel()
            await until(lambda: h.depth() == 1, what="the cancelled item to leave")
            assert h.batcher.queued == 1 and h.dropped("cancelled") == 1
            keep.future.cancel()
            await until(lambda: h.depth() == 0, what="an empty queue")
            assert h.batcher.queued == 0 and h.dropped("cancelled") == 2
            h.clock.advance(10 * WAIT_S)  # well past the moment their batch would have closed
            probe = h.item("probe")  # wakes the former: the next batch holds only what is still queued
            h.batcher.submit([probe])
            h.batcher.begin_drain()
            await until(probe.future.done, what="the probe")
            assert h.backend.passes == [["probe"]] and h.backend.collated == [["probe"]]

    run(main())


# ------------------------------------------------------------------------------------------- queue bounds
def test_a_full_queue_refuses_a_whole_submit():
    async def main():
        async with Harness(max_queue=3, max_queue_atoms=100, max_structures=64) as h:
            h.batcher.submit([h.item("r0"), h.item("r1")])
            with pytest.raises(QueueFull, match="queue full: 2 structures / 6 atoms"):
                h.batcher.submit([h.item("r2"), h.item("r3")])
            assert h.batcher.queued == 2 and h.depth() == 2  # all or nothing: r2 was not queued either
            h.batcher.submit([h.item("r2")])
            with pytest.raises(QueueFull):
                h.batcher.submit([h.item("r3")])
            assert h.batcher.has_room(0) and not h.batcher.has_room(1)
            h.batcher.begin_drain()
            await until(lambda: h.batcher.queued == 0 and h.batcher.busy == 0, what="the queue to empty")
            assert h.backend.passes == [["r0", "r1", "r2"]]

    run(main())


def test_the_queue_is_bounded_in_atoms():
    async def main():
        async with Harness(max_queue=100, max_queue_atoms=10, max_structures=64) as h:
            h.batcher.submit([h.item("r0", n_atoms=6)])
            with pytest.raises(QueueFull, match="6 atoms queued"):
                h.batcher.submit([h.item("r1", n_atoms=5)])
            h.batcher.submit([h.item("r1", n_atoms=4)])
            assert h.batcher.queued == 2

    run(main())


# ---------------------------------------------------------------------------------------- out of memory
def test_out_of_memory_splits_the_batch_in_halves():
    async def main():
        async with Harness(FakeBackend(oom_above=6), max_structures=4) as h:
            items = [h.item(f"r{i}", n_atoms=3) for i in range(4)]
            h.batcher.submit(items)
            await until(lambda: all(it.future.done() for it in items), what="every answer")
            assert h.backend.failed_passes == [["r0", "r1", "r2", "r3"]]
            assert h.backend.passes == [["r0", "r1"], ["r2", "r3"]]
            assert h.backend.released == 1
            for it in items:
                values, timing = it.future.result()
                assert values["request_id"] == it.request_id
                assert (timing.batch_structures, timing.batch_atoms) == (2, 6)  # the pass it was computed in
            assert sample(h.metrics, "macefield_oom_splits_total", model="fake") == 1
            assert sample(h.metrics, "macefield_batch_structures_count", model="fake") == 2  # one per pass

    run(main())


def test_a_structure_too_large_alone_does_not_fit_and_the_others_are_served():
    async def main():
        async with Harness(FakeBackend(oom_above=6), max_structures=3) as h:
            big, small = h.item("big", n_atoms=10), [h.item(f"s{i}", n_atoms=3) for i in range(2)]
            h.batcher.submit([big, *small])
            await until(lambda: all(it.future.done() for it in [big, *small]), what="every answer")
            with pytest.raises(DoesNotFit, match="10 atoms does not fit in memory on cpu"):
                big.future.result()
            assert [outcome(it.future)["request_id"] for it in small] == ["s0", "s1"]
            assert h.backend.failed_passes == [["big", "s0", "s1"], ["big"]]
            assert h.backend.passes == [["s0", "s1"]]
            assert sample(h.metrics, "macefield_oom_splits_total", model="fake") == 1
            h.batcher.submit([h.item("after")])  # still serving
            h.clock.advance(WAIT_S)
            await until(lambda: h.backend.passes[-1] == ["after"], what="the next request")

    run(main())


def test_a_failure_that_is_not_out_of_memory_fails_the_batch_without_a_split():
    class Broken(FakeBackend):
        def evaluate(self, batch, items):
            raise ValueError("engine bug")

    async def main():
        async with Harness(Broken(), max_structures=2) as h:
            items = [h.item("r0"), h.item("r1")]
            h.batcher.submit(items)
            await until(lambda: all(it.future.done() for it in items), what="the failure")
            for it in items:
                with pytest.raises(ValueError, match="engine bug"):
                    it.future.result()
            assert h.backend.released == 0
            assert sample(h.metrics, "macefield_oom_splits_total", model="fake") == 0
            assert h.batcher.busy == 0

    run(main())


def test_a_non_finite_result_fails_only_its_structure():
    async def main():
        async with Harness(FakeBackend(non_finite=["nan"]), max_structures=3) as h:
            items = [h.item("ok0"), h.item("nan"), h.item("ok1")]
            h.batcher.submit(items)
            await until(lambda: all(it.future.done() for it in items), what="every answer")
            with pytest.raises(NonFiniteResult, match="nan"):
                items[1].future.result()
            assert outcome(items[0].future)["request_id"] == "ok0"
            assert outcome(items[2].future)["request_id"] == "ok1"
            assert h.backend.passes == [["ok0", "nan", "ok1"]]

    run(main())


# --------------------------------------------------------------------------------- draining and stopping
def test_begin_drain_flushes_without_waiting():
    async def main():
        async with Harness(max_structures=64) as h:
            items = [h.item("r0"), h.item("r1", tier=0)]
            h.batcher.submit(items)
            await h.looked(3)
            assert h.backend.passes == []
            h.batcher.begin_drain()  # the clock has not moved: only the drain closes these batches
            await until(lambda: all(it.future.done() for it in items), what="the flush")
            assert sorted(h.backend.passes) == [["r0"], ["r1"]]
            late = h.item("late")
            h.batcher.submit([late])  # still draining: computed at once
            await until(late.future.done, what="the late item")

    run(main())


def test_close_fails_queued_items_with_stopped():
    async def main():
        h = Harness(max_structures=64)
        async with h:
            items = [h.item("r0"), h.item("r1")]
            h.batcher.submit(items)
            await h.looked()
        for it in items:  # closed on leaving the block
            with pytest.raises(Stopped, match="stopped before this request was computed"):
                it.future.result()
        assert h.backend.passes == []

    run(main())


def test_stalled_for_counts_only_while_work_waits_for_a_batch_to_finish():
    gate = threading.Event()

    async def main():
        clock = FakeClock()
        async with Harness(FakeBackend(gate=gate), clock=clock, max_structures=1) as h:
            assert h.batcher.stalled_for() == 0.0
            clock.advance(100)
            assert h.batcher.stalled_for() == 0.0  # idle: not stalled, however long
            item = h.item("r0")
            h.batcher.submit([item])
            await until(lambda: h.batcher.busy == 1 and h.batcher.queued == 0, what="the pass to start")
            clock.advance(7)
            assert h.batcher.stalled_for() == 7.0  # computing (blocked) since the work arrived
            assert h.batcher.stalled_for(now=clock.now + 3) == 10.0
            gate.set()
            await until(item.future.done, what="the pass to finish")
            await until(lambda: h.batcher.busy == 0, what="the batch to be scattered")
            assert h.batcher.stalled_for() == 0.0
            assert h.backend.recorded == 1

    try:
        run(main())
    finally:
        gate.set()
