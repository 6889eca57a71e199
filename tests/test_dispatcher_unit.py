"""The dispatcher without a server or a model pass: requests parsed for a tiny model's registry, neighbour lists
built for real, batchers over a fake backend.  Admission is all or nothing per call (queue room in every
model, the neighbour-list budget), results come back in order, and a call that fails, is cancelled or runs
out of time leaves nothing queued and no neighbour-list bytes held."""

from __future__ import annotations

import asyncio
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from ase import Atoms
from conftest import quartz_like, sio_molecule
from fake_backend import FakeBackend, flat, sample, until
from macefield_server.engine.graph import expected_edges, neighbour_list
from macefield_server.serving.batcher import Batcher, DeadlinePassed, QueueFull
from macefield_server.serving.config import BatchingConfig, LimitsConfig
from macefield_server.serving.dispatcher import Dispatcher
from macefield_server.serving.memory import graph_bytes
from macefield_server.serving.metrics import Metrics
from macefield_server.serving.registry import ModelRegistry, ServedModel
from macefield_server.serving.validation import InvalidRequest, parse_request
from serving import request_for

LIMITS = LimitsConfig()


@pytest.fixture(scope="module")
def registry(two_head_model):
    model = copy.deepcopy(two_head_model)  # a copy: ServedModel freezes its parameters; never evaluated here
    return ModelRegistry([ServedModel("tiny", model, "sio2"), ServedModel("other", model, "sio2")])


class Setup:
    """A dispatcher over one fake-backed batcher per model of ``registry`` (real clock: the dispatcher stamps
    items with time.monotonic())."""

    def __init__(self, registry, graph_budget=None, backend_class=FakeBackend, **batching):
        self.registry = registry
        self.metrics = Metrics()
        self.prep = ThreadPoolExecutor(max_workers=1)
        batching.setdefault("max_wait_ms", 60_000)  # nothing closes by age: a test drains when it wants answers
        self.backends = {name: backend_class(name=name, heads=("sio2", "other")) for name in registry.names()}
        self.batchers = {}
        self.batching = BatchingConfig(**batching)
        self.graph_budget = graph_budget

    async def __aenter__(self):
        self.batchers = {name: Batcher(b, self.batching, self.metrics, self.prep) for name, b in self.backends.items()}
        for b in self.batchers.values():
            b.start()
        self.dispatcher = Dispatcher(self.registry, self.batchers, LIMITS, self.prep, self.graph_budget)
        return self

    async def __aexit__(self, *exc):
        for b in self.batchers.values():
            await b.close()
        self.prep.shutdown(wait=True)

    def parse(self, atoms, model="tiny", request_id="", **kwargs):
        return parse_request(request_for(atoms, model=model, request_id=request_id, **kwargs), self.registry, LIMITS)

    def drain(self):
        for b in self.batchers.values():
            b.begin_drain()

    def queued(self, name="tiny"):
        return sample(self.metrics, "macefield_queue_depth", model=name)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_results_come_back_in_order_each_its_own(registry):
    async def main():
        async with Setup(registry, max_wait_ms=1) as s:
            parsed = [s.parse(quartz_like(seed=1), request_id="q1"), s.parse(sio_molecule(), request_id="mol"),
                      s.parse(quartz_like((2, 1, 1)), request_id="q2", head="other"),
                      s.parse(quartz_like(seed=3), model="other", request_id="q3")]
            results = await s.dispatcher.run(parsed, deadline=None)
            assert [outcome_["request_id"] for outcome_, _ in results] == ["q1", "mol", "q2", "q3"]
            assert [outcome_["head"] for outcome_, _ in results] == ["sio2", "sio2", "other", "sio2"]
            assert [r[0]["energy"] for r in results] == [-1.5 * p.n_atoms for p in parsed]
            assert sorted(flat(s.backends["tiny"].passes)) == ["mol", "q1", "q2"]
            assert s.backends["other"].passes == [["q3"]]
            assert s.dispatcher.graph_bytes == 0  # nothing held once answered

    run(main())


def test_a_call_is_queued_whole_or_refused_whole_across_models(registry):
    async def main():
        async with Setup(registry, max_queue=2) as s:
            first = asyncio.ensure_future(s.dispatcher.run([s.parse(quartz_like(seed=i), model="other")
                                                           for i in range(2)], deadline=None))
            await until(lambda: s.queued("other") == 2, what="'other' full")
            held = s.dispatcher.graph_bytes
            mixed = [s.parse(quartz_like(seed=5), model="tiny"), s.parse(quartz_like(seed=6), model="other")]
            with pytest.raises(QueueFull, match="queue full: 2 structures / 18 atoms queued for model 'other'"):
                await s.dispatcher.run(mixed, deadline=None)
            assert s.queued("tiny") == 0 and s.batchers["tiny"].queued == 0  # its 'tiny' structure was not queued
            assert s.dispatcher.graph_bytes == held  # refused before any neighbour list
            with pytest.raises(QueueFull, match="exceed the queue size .* split the request"):
                await s.dispatcher.run([s.parse(quartz_like(seed=i)) for i in range(3)], deadline=None)
            s.drain()
            assert len(await first) == 2
            await until(lambda: s.queued("other") == 0, what="'other' empty")
            assert s.backends["tiny"].collated == []

    run(main())


def test_neighbour_list_budget(registry):
    async def main():
        atoms = quartz_like((2, 1, 1))
        structure = parse_request(request_for(atoms), registry, LIMITS)
        reserved = graph_bytes(min(structure.edges, expected_edges(structure.structure, 4.0)), len(atoms))
        graph = neighbour_list(structure.structure, 4.0)
        built = graph.nbytes + graph_bytes(0, len(atoms))
        budget = max(reserved, built) + min(reserved, built) // 2  # one call fits, a second does not
        async with Setup(registry, graph_budget=budget) as s:
            first = asyncio.ensure_future(s.dispatcher.run([s.parse(atoms, request_id="a")], deadline=None))
            await until(lambda: s.queued() == 1, what="the first call queued")
            assert s.dispatcher.graph_bytes == built  # the real size replaced the guess
            with pytest.raises(QueueFull, match="neighbour lists of this call") as info:
                await s.dispatcher.run([s.parse(atoms, request_id="b")], deadline=None)
            assert "retry later" in str(info.value) and "split the call" not in str(info.value)
            assert s.dispatcher.graph_bytes == built and s.queued() == 1
            s.drain()
            assert outcome_of(await first) == ["a"]
            assert s.dispatcher.graph_bytes == 0
            assert outcome_of(await s.dispatcher.run([s.parse(atoms, request_id="b")], deadline=None)) == ["b"]
        async with Setup(registry, graph_budget=budget) as s:  # a call larger than the whole budget
            with pytest.raises(QueueFull, match="or split the call"):
                await s.dispatcher.run([s.parse(atoms), s.parse(atoms)], deadline=None)
            assert s.dispatcher.graph_bytes == 0 and s.queued() == 0

    run(main())


def outcome_of(results):
    return [values["request_id"] for values, _ in results]


def test_overlapping_atoms_are_refused_by_name_and_nothing_is_queued(registry):
    async def main():
        async with Setup(registry) as s:
            close = Atoms("SiO", positions=[[0, 0, 0], [0.3, 0, 0]])
            parsed = [s.parse(quartz_like()), s.parse(close)]
            with pytest.raises(InvalidRequest) as info:
                await s.dispatcher.run(parsed, deadline=None, prefixes=["structures[0].", "structures[1]."])
            assert str(info.value).startswith("structures[1].positions: ")
            assert "closer than limits.min_distance = 0.5 A" in str(info.value)
            assert s.queued() == 0 and s.dispatcher.graph_bytes == 0

    run(main())


def test_a_passed_deadline_leaves_the_queue_uncomputed(registry):
    async def main():
        async with Setup(registry) as s:
            parsed = [s.parse(quartz_like(seed=i)) for i in range(2)]
            with pytest.raises(DeadlinePassed, match="2 of 2 structures not computed"):
                await s.dispatcher.run(parsed, deadline=time.monotonic() + 0.2)
            await until(lambda: s.queued() == 0, what="an empty queue")
            assert sample(s.metrics, "macefield_dropped_total", model="tiny", reason="deadline") == 2
            assert s.backends["tiny"].collated == [] and s.dispatcher.graph_bytes == 0

    run(main())


def test_a_cancelled_call_leaves_the_queue_uncomputed(registry):
    async def main():
        async with Setup(registry) as s:
            task = asyncio.ensure_future(s.dispatcher.run([s.parse(quartz_like(seed=i)) for i in range(3)], None))
            await until(lambda: s.queued() == 3, what="three queued")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: s.queued() == 0, what="an empty queue")
            assert sample(s.metrics, "macefield_dropped_total", model="tiny", reason="cancelled") == 3
            s.drain()
            probe = await s.dispatcher.run([s.parse(sio_molecule(), request_id="probe")], deadline=None)
            assert outcome_of(probe) == ["probe"]
            assert s.backends["tiny"].collated == [["probe"]]  # the cancelled three were never batched
            assert s.dispatcher.graph_bytes == 0

    run(main())


def test_queued_items_carry_their_own_neighbour_lists(registry):
    seen = []

    class Recording(FakeBackend):
        def collate(self, items):
            seen.extend((it.request_id, it.n_atoms, it.n_edges) for it in items)
            return super().collate(items)

    async def main():
        async with Setup(registry, backend_class=Recording, max_wait_ms=1) as s:
            molecule, crystal = sio_molecule(), quartz_like()
            await s.dispatcher.run([s.parse(molecule, request_id="m"), s.parse(crystal, request_id="c")], None)
            expected = [(rid, len(a), int(neighbour_list(s.parse(a).structure, 4.0).edge_index.shape[1]))
                        for rid, a in (("m", molecule), ("c", crystal))]
            assert sorted(seen) == sorted(expected)
            assert expected[0][2] == 2 and expected[1][2] > 9 * 4  # the Si-O pair both ways; the crystal's many

    run(main())


def test_models_with_device_lists_are_queued_without_host_lists_and_device_refusals_name_the_structure(registry):
    class RefusingBackend(FakeBackend):
        """Refuses request "bad" as a device-side min-distance check would."""

        def evaluate(self, batch, items):
            out = super().evaluate(batch, items)
            return [InvalidRequest("positions", "atoms 0 and 1 are 0.1 A apart") if it.request_id == "bad" else o
                    for it, o in zip(items, out)]

    async def main():
        async with Setup(registry, backend_class=RefusingBackend, max_wait_ms=1) as s:
            s.dispatcher.device_graphs = frozenset({"tiny"})
            seen = []
            collate = s.backends["tiny"].collate
            s.backends["tiny"].collate = lambda items: (seen.extend(items), collate(items))[1]
            parsed = [s.parse(quartz_like(seed=1), request_id="q1"), s.parse(quartz_like((2, 1, 1)), request_id="q2")]
            results = await s.dispatcher.run(parsed, deadline=None)
            assert [r["request_id"] for r, _ in results] == ["q1", "q2"]
            assert [it.graph for it in seen] == [None, None]  # no host list: the batch builds them
            assert [it.n_edges for it in seen] == [min(p.edges, expected_edges(p.structure, p.served.cutoff))
                                                   for p in parsed]
            calls = [s.parse(quartz_like(seed=3), request_id="ok"), s.parse(quartz_like(seed=4), request_id="bad")]
            with pytest.raises(InvalidRequest, match=r"^structures\[1\]\.positions: atoms 0 and 1"):
                await s.dispatcher.run(calls, deadline=None, prefixes=["structures[0].", "structures[1]."])
            assert s.dispatcher.graph_bytes == 0

    run(main())
