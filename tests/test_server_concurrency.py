"""Many concurrent clients over real gRPC get exactly the response engine's numbers for their own input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import quartz_like, random_field_model, sio_molecule
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from serving import tiny_server, stub_to, arrays, assert_matches, metric, request_for

from macefield_server.serving.config import BatchingConfig
from macefield_server.engine import predict

FULL = ["energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"]
FIRST = ["forces", "stress", "dipole"]


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=3)


@pytest.fixture(scope="module")
def server(model):
    # a short wait window so that concurrent clients share batches
    with tiny_server(model, batching=BatchingConfig(max_wait_ms=30, max_structures=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with stub_to(server.port) as s:
        yield s


def workload(n: int, seed: int = 0):
    """n different (atoms, field, head, outputs) cases: periodic cells of two sizes and a molecule."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            atoms = quartz_like(rattle=0.05, seed=i)
        elif kind == 1:
            atoms = quartz_like((2, 1, 1), rattle=0.05, seed=i)
        else:
            atoms = sio_molecule()
            atoms.positions += rng.normal(0.0, 0.05, size=atoms.positions.shape)
        field = rng.normal(0.0, 0.05, size=3)
        head = ("sio2", "other")[(i // 3) % 2]
        outputs = FULL if i % 2 == 0 else FIRST
        cases.append((atoms, field, head, outputs))
    return cases


def reference(model, atoms, field, head, outputs):
    return predict(model, [atoms], electric_fields=field, heads=head, outputs=outputs)[0]


def test_concurrent_clients_get_their_own_numbers(model, server, stub):
    cases = workload(24)
    before = metric(server.metrics_port, "macefield_batch_structures_count")
    single = metric(server.metrics_port, "macefield_batch_structures_bucket", le="1.0")

    def call(i):
        atoms, field, head, outputs = cases[i]
        return stub.Predict(request_for(atoms, field, head, outputs, request_id=f"client-{i}"), timeout=120)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        responses = list(pool.map(call, range(len(cases))))

    for i, (response, (atoms, field, head, outputs)) in enumerate(zip(responses, cases)):
        assert response.request_id == f"client-{i}"
        assert response.head == head and response.model == "tiny" and response.n_atoms == len(atoms)
        assert_matches(response, reference(model, atoms, field, head, outputs))

    batches = metric(server.metrics_port, "macefield_batch_structures_count") - before
    multi = batches - (metric(server.metrics_port, "macefield_batch_structures_bucket", le="1.0") - single)
    assert multi >= 1, "no batch held more than one structure under concurrent load"
    assert batches < len(cases)
    assert max(r.timing.batch_structures for r in responses) > 1
    assert metric(server.metrics_port, "macefield_requests_total", method="Predict", code="OK") >= len(cases)


def test_predict_batch_mixed_structures(model, stub):
    cases = workload(7, seed=1)
    request = pb.PredictBatchRequest(
        structures=[request_for(a, f, h, o, request_id=f"b{i}") for i, (a, f, h, o) in enumerate(cases)]
    )
    response = stub.PredictBatch(request, timeout=120)
    assert [r.request_id for r in response.results] == [f"b{i}" for i in range(7)]
    for r, (atoms, field, head, outputs) in zip(response.results, cases):
        assert_matches(r, reference(model, atoms, field, head, outputs))
    # one batch per output tier, each mixing heads, fields, sizes and periodicity
    tiers = [tuple(o) for (_, _, _, o) in cases]
    for r, t in zip(response.results, tiers):
        assert r.timing.batch_structures == tiers.count(t)
    assert {cases[i][2] for i in range(7) if tiers[i] == tuple(FULL)} == {"sio2", "other"}


def test_stream_answers_in_order_with_pipelining(model, stub):
    cases = workload(9, seed=2)
    requests = [request_for(a, f, h, o, request_id=f"s{i}") for i, (a, f, h, o) in enumerate(cases)]
    responses = list(stub.PredictStream(iter(requests), timeout=120))
    assert [r.request_id for r in responses] == [f"s{i}" for i in range(9)]
    for r, (atoms, field, head, outputs) in zip(responses, cases):
        assert_matches(r, reference(model, atoms, field, head, outputs))
    # the stream was pipelined: its requests did not each get a batch of their own
    assert max(r.timing.batch_structures for r in responses) > 1


def test_outputs_are_only_those_requested(stub):
    atoms = quartz_like()
    energy_only = stub.Predict(request_for(atoms, outputs=["energy"]), timeout=60)
    assert sorted(energy_only.outputs) == ["energy", "volume"]  # volume comes with every periodic result
    default = stub.Predict(request_for(atoms), timeout=60)
    assert sorted(default.outputs) == ["dipole", "energy", "forces", "polarization", "polarization_quantum",
                                       "stress", "volume"]  # all first derivatives, as in every client interface
    # every name of the output table can be asked for on its own
    full = arrays(stub.Predict(request_for(atoms, outputs=FULL), timeout=60))
    for name, expected in (("chi", ["chi", "energy", "volume"]), ("eps_inf", ["energy", "eps_inf", "volume"]),
                           ("polarization_quantum", ["energy", "polarization_quantum", "volume"]),
                           ("volume", ["energy", "volume"])):
        alone = stub.Predict(request_for(atoms, outputs=[name]), timeout=60)
        assert sorted(alone.outputs) == expected, name
        np.testing.assert_allclose(arrays(alone)[name], full[name], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(full["eps_inf"], np.eye(3) + full["chi"], rtol=1e-12)
    assert sorted(stub.Predict(request_for(sio_molecule(), outputs=["chi", "eps_inf"]),
                               timeout=60).outputs) == ["energy"]
    molecule = stub.Predict(request_for(sio_molecule(), outputs=FULL), timeout=60)
    # no volume: no stress, polarization, chi, eps_inf for a molecule
    assert sorted(molecule.outputs) == ["born_charges", "dipole", "energy", "forces", "polarizability"]
    polar = stub.Predict(request_for(atoms, outputs=["polarization"]), timeout=60)
    quanta = np.asarray(polar.polarization_quantum).reshape(3, 3)
    np.testing.assert_allclose(quanta, np.asarray(atoms.cell) / atoms.get_volume(), rtol=1e-12)
