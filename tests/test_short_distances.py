"""Overlapping atoms: refused by name and distance, and a non-finite result is never answered OK.

* ``limits.min_distance`` (default 0.5 A): INVALID_ARGUMENT naming the two atoms
  (or the atom and its own periodic image) and their distance, for Predict,
  PredictBatch (``structures[i].positions``) and PredictStream.
* With the check off (``min_distance: 0``) two atoms at one point make the
  model produce NaN: that structure alone fails with INTERNAL saying so, the
  other structures of the same batch are answered and correct, and the
  non-finite counter moves.  The in-process ``predict`` raises instead.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ase import Atoms
from conftest import quartz_like, random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import assert_matches, metric, request_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BatchingConfig, ConfigError, LimitsConfig, ServerConfig, load_config
from macefield_server.engine import predict
from macefield_server.engine.predict import NonFiniteResult
from macefield_server.serving.registry import ServedModel

OUTPUTS = ["forces", "stress", "born_charges", "polarizability"]


def model():
    return random_field_model(heads=("sio2", "other"), seed=13)


def overlapping(distance: float = 0.0, seed: int = 0):
    """Quartz with O number 4 moved onto (or ``distance`` A from) Si number 0."""
    atoms = quartz_like(seed=seed)
    direction = np.array([0.6, 0.0, 0.8])
    atoms.positions[4] = atoms.positions[0] + distance * direction
    return atoms


def serve(min_distance: float, max_structures: int = 8, max_wait_ms: float = 5.0):
    config = ServerConfig(port=0, metrics_port=0,
                          batching=BatchingConfig(max_wait_ms=max_wait_ms, max_structures=max_structures),
                          limits=LimitsConfig(min_distance=min_distance))
    return BackgroundServer(config, [ServedModel("tiny", model(), "sio2")])


def test_close_atoms_are_refused_naming_them():
    with serve(0.5) as srv:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        assert stub.ListModels(pb.ListModelsRequest(), timeout=30).min_distance == 0.5
        for distance in (0.0, 0.3):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request_for(overlapping(distance), outputs=OUTPUTS), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            message = info.value.details()
            assert message.startswith("positions: atoms ")
            assert "(Si)" in message and "(O)" in message and f"{distance:.4g} A apart" in message
            assert "limits.min_distance = 0.5 A" in message
        # inside a batch: the structure is named by its index
        batch = pb.PredictBatchRequest(structures=[request_for(quartz_like(seed=1)), request_for(overlapping(0.2))])
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictBatch(batch, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("structures[1].positions: atoms 0 (Si) and 4 (O)")
        # a periodic image: a one-atom cell 0.4 A long along x
        tiny = Atoms("Si", positions=[[0.0, 0.0, 0.0]], cell=[0.4, 5.0, 5.0], pbc=True)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request_for(tiny), timeout=30)
        assert "atom 0 (Si) and its own periodic image" in info.value.details()
        # 0.6 A apart is allowed (the extrapolation grade, not the limit, is the judge of such structures)
        answer = stub.Predict(request_for(overlapping(0.6), outputs=["forces"]), timeout=60)
        assert np.all(np.isfinite(np.asarray(answer.forces)))


def test_non_finite_result_fails_that_structure_alone():
    # a batch closes when it holds 3 structures (or after 30 s): the three calls below share one engine pass
    with serve(0.0, max_structures=3, max_wait_ms=30_000) as srv:
        stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        good = [quartz_like(seed=s) for s in (2, 3)]
        calls = [stub.Predict.future(request_for(a, outputs=OUTPUTS, request_id=f"good{i}"), timeout=60)
                 for i, a in enumerate(good)]
        bad = stub.Predict.future(request_for(overlapping(0.0, seed=4), outputs=OUTPUTS, request_id="bad"), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            bad.result()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "non-finite" in info.value.details() and "0 A apart" in info.value.details()
        reference = model()
        batched = []
        for call, atoms in zip(calls, good):
            response = call.result()
            batched.append(response.timing.batch_structures)
            assert_matches(response, predict(reference, [atoms], outputs=OUTPUTS)[0])
        assert max(batched) == 3  # the bad structure was computed in the same pass as the good ones
        assert metric(srv.metrics_port, "macefield_non_finite_total", model="tiny") == 1
        # in a PredictBatch the whole call fails (all-or-nothing), saying which structure
        batch = pb.PredictBatchRequest(structures=[request_for(good[0]), request_for(overlapping(0.0, seed=5)),
                                                   request_for(good[1])])
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictBatch(batch, timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "non-finite" in info.value.details()


def test_in_process_predict_raises_for_non_finite_results():
    with pytest.raises(NonFiniteResult, match=r"structure 1: .*non-finite .*energy.*0 A apart"):
        predict(model(), [quartz_like(seed=6), overlapping(0.0)], outputs=["forces"])


def test_min_distance_config(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("limits:\n  min_distance: -1\n")
    with pytest.raises(ConfigError, match="limits.min_distance"):
        load_config(path)
    path.write_text("limits:\n  min_distance: 0.8\n")
    assert load_config(path).limits.min_distance == 0.8
    assert LimitsConfig().min_distance == 0.5
