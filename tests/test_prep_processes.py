"""Neighbour lists built in worker processes (batching.prep_mode: process) against the prep threads.

Two real servers over loopback serve one model, one per prep mode: the same answers bit for bit, the same
refusals naming the same field, and a prep worker killed with SIGKILL does not stop the process server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import quartz_like, random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from serving import request_for, stub_to, tiny_server

from macefield_server.engine.graph import Structure, neighbour_list
from macefield_server.serving.config import BatchingConfig

OUTPUTS = ["forces", "stress", "born_charges"]


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=3)


@pytest.fixture(scope="module")
def servers(model):
    with tiny_server(model, batching=BatchingConfig(prep_mode="thread")) as threads, \
            tiny_server(model, batching=BatchingConfig(prep_mode="process", prep_workers=2)) as processes:
        yield threads, processes


def prep_of(server):
    return server._started().process_prep


def on_loop(server, coroutine):
    """Run ``coroutine`` on the server's event loop (where its prep pool is used) and return its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(timeout=120)


def a_worker(prep, timeout: float = 30.0) -> int:
    """The pid of a live worker of ``prep`` (a rebuilt pool starts its workers with its first tasks)."""
    end = time.monotonic() + timeout
    while not prep.pids():
        assert time.monotonic() < end, "no prep worker started"
        time.sleep(0.05)
    return prep.pids()[0]


def structures():
    """Bulk quartz (9 and 72 atoms), a quartz slab (periodic in x, y) and an isolated Si-O cluster."""
    slab = quartz_like(seed=5)
    slab.pbc = (True, True, False)
    cluster = quartz_like(seed=6)
    cluster.pbc = False
    return [quartz_like(seed=1), quartz_like(repeat=(2, 2, 2), seed=2), slab, cluster]


def test_worker_lists_are_bitwise_the_in_process_lists(servers):
    _, processes = servers
    prep = prep_of(processes)
    assert prep is not None and len(prep.pids()) == 2
    jobs = [(Structure.from_atoms(a), 4.0) for a in structures()]
    built = on_loop(processes, prep.graphs(jobs))
    assert len(built) == len(jobs)
    # concurrent calls, coalesced while the workers are busy: each gets its own lists, in its own order
    calls = [jobs[k:] + jobs[:k] for k in range(len(jobs))] * 3

    async def concurrently():
        return await asyncio.gather(*(prep.graphs(c) for c in calls))

    for call, answer in zip(calls, on_loop(processes, concurrently())):
        assert [g.edge_index.tobytes() for g in answer] == [neighbour_list(s, c).edge_index.tobytes() for s, c in call]
    for (structure, cutoff), got in zip(jobs, built):
        want = neighbour_list(structure, cutoff)
        assert got.edge_index.dtype == np.int64 and got.edge_index.tobytes() == want.edge_index.tobytes()
        assert got.unit_shifts.tobytes() == want.unit_shifts.tobytes()
        assert got.positions.tobytes() == want.positions.tobytes()
        assert got.cell.tobytes() == want.cell.tobytes()
        assert got.closest == want.closest


def test_answers_are_bitwise_equal_in_both_modes(servers):
    threads, processes = servers
    requests = [request_for(a, field=(0.0, 0.01, 0.0), outputs=OUTPUTS, request_id=str(k))
                for k, a in enumerate(structures())]
    with stub_to(threads.port) as a, stub_to(processes.port) as b:
        for r in requests:
            one, two = a.Predict(r, timeout=120), b.Predict(r, timeout=120)
            assert one.energy == two.energy
            assert len(one.forces) == 3 * len(r.atomic_numbers)
            assert list(one.forces) == list(two.forces) and list(one.born_charges) == list(two.born_charges)
            assert list(one.stress) == list(two.stress)
        batch = pb.PredictBatchRequest(structures=requests)
        for x, y in zip(a.PredictBatch(batch, timeout=120).results, b.PredictBatch(batch, timeout=120).results):
            assert x.energy == y.energy and list(x.forces) == list(y.forces)


def refusal(stub, call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(stub)(request, timeout=60)
    return info.value.code(), info.value.details()


def test_bad_input_gets_the_same_error_in_both_modes(servers):
    threads, processes = servers
    close = quartz_like(seed=2)
    close.positions[4] = close.positions[3] + [0.1, 0.0, 0.0]  # found by the list built in the worker
    nan = request_for(quartz_like(seed=3))
    nan.positions[5] = float("nan")
    single = [request_for(close), nan]
    batch = pb.PredictBatchRequest(structures=[request_for(quartz_like(seed=4)), request_for(close)])
    with stub_to(threads.port) as a, stub_to(processes.port) as b:
        for r in single:
            want = refusal(a, lambda s: s.Predict, r)
            assert want[0] == grpc.StatusCode.INVALID_ARGUMENT
            assert refusal(b, lambda s: s.Predict, r) == want
        want = refusal(a, lambda s: s.PredictBatch, batch)
        assert want[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert want[1].startswith("structures[1].positions: atoms 3 (") and "closer than" in want[1]
        assert refusal(b, lambda s: s.PredictBatch, batch) == want


def test_a_killed_prep_worker_is_survived(servers):
    threads, processes = servers
    prep = prep_of(processes)
    request = request_for(quartz_like(repeat=(2, 2, 2), seed=8), outputs=["forces"])
    with stub_to(threads.port) as a, stub_to(processes.port) as b:
        want = a.Predict(request, timeout=120)
        rebuilds = prep.rebuilds
        victim = a_worker(prep)
        os.kill(victim, signal.SIGKILL)  # idle: the pool is broken when the next call submits to it
        time.sleep(0.5)
        got = b.Predict(request, timeout=60)  # retried once on a rebuilt pool
        assert got.energy == want.energy and list(got.forces) == list(want.forces)
        assert prep.rebuilds == rebuilds + 1 and victim not in prep.pids()

        # killed while calls are in flight: each is answered (retried) or refused UNAVAILABLE, none hangs
        codes, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    b.Predict(request, timeout=60)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        workers = [threading.Thread(target=client) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        for _ in range(2):
            os.kill(a_worker(prep), signal.SIGKILL)
            time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join(timeout=90)
            assert not w.is_alive()
        assert codes and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert prep.rebuilds >= rebuilds + 2
        after = b.Predict(request, timeout=60)
        assert after.energy == want.energy
