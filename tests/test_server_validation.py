"""Bad input answers INVALID_ARGUMENT naming the field, and the server keeps serving; ListModels."""

from __future__ import annotations

import json

import grpc
import pytest
from conftest import quartz_like, random_field_model, sio_molecule
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from serving import stub_to, assign_field, replace_field, assert_matches, metric, request_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BatchingConfig, LimitsConfig, ServerConfig
from macefield_server.engine import predict
from macefield_server.serving.registry import ServedModel

MAX_ATOMS = 40
MAX_FIELD = 0.5


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=5)


@pytest.fixture(scope="module")
def server(model):
    config = ServerConfig(
        port=0,
        metrics_port=0,
        batching=BatchingConfig(max_wait_ms=2),
        limits=LimitsConfig(max_atoms_per_structure=MAX_ATOMS, max_field=MAX_FIELD, max_structures_per_request=8),
    )
    served = ServedModel("tiny", model, "sio2", description="test model", card_json=json.dumps({"name": "tiny"}))
    with BackgroundServer(config, [served]) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with stub_to(server.port) as s:
        yield s


def valid():
    return request_for(quartz_like(), field=(0.01, 0.0, 0.02), outputs=["forces", "stress", "born_charges"],
                       request_id="ok")


def _positions_nan(r):
    r.positions[4] = float("nan")


def _cell_inf(r):
    r.cell[0] = float("inf")


def _field_nan(r):
    r.electric_field[1] = float("nan")


def _too_many_atoms(r):
    big = quartz_like((3, 2, 1))  # 54 atoms > MAX_ATOMS
    r.CopyFrom(request_for(big))


def _singular_cell(r):
    del r.cell[:]
    r.cell.extend([4.9, 0, 0, 2.45, 0, 0, 0, 0, 5.4])  # a2 parallel to a1


def _pbc_without_cell(r):
    del r.cell[:]


def _zero_atoms(r):
    del r.atomic_numbers[:]
    del r.positions[:]


BAD = {
    "positions length": (replace_field("positions", [0.0] * 10), "positions"),
    "positions NaN": (_positions_nan, "positions"),
    "cell length": (replace_field("cell", [1.0] * 6), "cell"),
    "cell inf": (_cell_inf, "cell"),
    "pbc length": (replace_field("pbc", [True, True]), "pbc"),
    "field length": (replace_field("electric_field", [0.1, 0.2]), "electric_field"),
    "field NaN": (_field_nan, "electric_field"),
    "field too strong": (replace_field("electric_field", [0.0, 0.0, 2 * MAX_FIELD]), "electric_field"),
    "element not in model": (replace_field("atomic_numbers", [8] * 8 + [26]), "atomic_numbers"),
    "negative element": (replace_field("atomic_numbers", [8] * 8 + [-1]), "atomic_numbers"),
    "unknown model": (assign_field("model", "nope"), "model"),
    "unknown head": (assign_field("head", "nope"), "head"),
    "singular cell with pbc": (_singular_cell, "cell"),
    "pbc without cell": (_pbc_without_cell, "cell"),
    "zero atoms": (_zero_atoms, "atomic_numbers"),
    "too many atoms": (_too_many_atoms, "atomic_numbers"),
    "unknown output": (replace_field("outputs", ["forces", "magnetization"]), "outputs"),
    "request id too long": (assign_field("request_id", "x" * 300), "request_id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_argument_naming_the_field(case, model, stub):
    mutate, field = BAD[case]
    request = valid()
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    # the server keeps serving
    good = stub.Predict(valid(), timeout=60)
    atoms = quartz_like()
    assert_matches(good, predict(model, [atoms], electric_fields=[0.01, 0.0, 0.02], heads="sio2",
                                 outputs=["forces", "stress", "born_charges"])[0])


def test_slab_with_two_periodic_directions_is_accepted(stub):
    atoms = quartz_like()
    atoms.pbc = [True, True, False]
    response = stub.Predict(request_for(atoms, outputs=["forces", "dipole"]), timeout=60)
    assert "stress" not in response.outputs and len(response.forces) == 3 * len(atoms)


def test_molecule_without_cell_is_accepted(stub):
    request = request_for(sio_molecule(), outputs=["dipole"])
    del request.cell[:]
    del request.pbc[:]
    response = stub.Predict(request, timeout=60)
    assert len(response.dipole) == 3


def test_batch_names_the_bad_structure(stub):
    bad = valid()
    bad.positions[0] = float("inf")
    request = pb.PredictBatchRequest(structures=[valid(), bad, valid()])
    with pytest.raises(grpc.RpcError) as info:
        stub.PredictBatch(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("structures[1].positions:"), info.value.details()
    for request in (pb.PredictBatchRequest(), pb.PredictBatchRequest(structures=[valid()] * 9)):
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictBatch(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("structures:")
    assert len(stub.PredictBatch(pb.PredictBatchRequest(structures=[valid()] * 2), timeout=60).results) == 2


def test_stream_ends_with_invalid_argument_naming_field_and_request(stub):
    bad = valid()
    bad.request_id = "step-2"
    bad.electric_field[0] = 10.0
    first = valid()
    first.request_id = "step-1"
    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for r in stub.PredictStream(iter([first, bad, valid()]), timeout=60):
            responses.append(r)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("electric_field:") and "step-2" in info.value.details()
    assert [r.request_id for r in responses] == ["step-1"]
    assert len(list(stub.PredictStream(iter([valid(), valid()]), timeout=60))) == 2


def test_invalid_requests_are_counted(server, stub):
    before = metric(server.metrics_port, "macefield_requests_total", method="Predict", code="INVALID_ARGUMENT")
    request = valid()
    request.head = "nope"
    with pytest.raises(grpc.RpcError):
        stub.Predict(request, timeout=30)
    after = metric(server.metrics_port, "macefield_requests_total", method="Predict", code="INVALID_ARGUMENT")
    assert after == before + 1


def test_list_models(model, server, stub):
    response = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert response.max_atoms_per_structure == MAX_ATOMS
    assert response.max_field_magnitude == MAX_FIELD
    (info,) = response.models
    assert info.name == "tiny" and info.is_default and info.trained
    assert [h.name for h in info.heads] == ["sio2", "other"] and info.default_head == "sio2"
    assert [h.is_default for h in info.heads] == [True, False]
    assert list(info.atomic_numbers) == [8, 14]
    assert info.cutoff == pytest.approx(float(model.r_max))
    assert info.dtype == "float64" and info.device == "cpu" and info.backend == "e3nn"
    assert set(info.outputs) == {"energy", "forces", "stress", "dipole", "polarization", "polarization_quantum",
                                 "born_charges", "polarizability", "chi", "eps_inf", "volume"}
    assert info.units["forces"] == "eV/A" and info.units["electric_field"] == "V/A"
    assert info.units["polarizability"] == "e*A^2/V" and info.units["chi"] == "dimensionless"
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert json.loads(info.card_json) == {"name": "tiny"}
    assert metric(server.metrics_port, "macefield_model_info", name="tiny", trained="true", backend="e3nn") == 1


def test_unknown_elements_are_named_by_symbol_and_number(stub):
    request = valid()
    replace_field("atomic_numbers", [8] * 8 + [26])(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.details() == ("atomic_numbers: element(s) Fe (26) not in model 'tiny' "
                                    "(it has O (8), Si (14))")
