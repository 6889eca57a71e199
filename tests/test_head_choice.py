"""Which head a structure is computed with: chosen by its elements when the request names none, refused when the
head was never trained on one of its elements (unless the caller opts in), and each head's elements listed.

A real server over loopback with the embedded default model (heads sio2: O Si, batio3: O Ti Ba, both with
extrapolation statistics) and a model whose heads cover every element (a foundation-like model).
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from ase import Atoms
from conftest import random_field_model
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import request_for, run_torch_free, torch_free_env

from macefield_client import Client, InvalidRequest
from macefield_client.structures import alpha_quartz, perovskite_batio3
from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ServerConfig
from macefield_server.serving.registry import ServedModel, load_default_model, trained_elements



@pytest.fixture(scope="module")
def server():
    foundation = random_field_model(atomic_numbers=(8, 14, 22, 56), heads=("one", "two"), seed=5)
    models = [load_default_model(), ServedModel("foundation", foundation, "two")]
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1), models) as srv:
        yield srv


def test_heads_list_their_elements(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = {m.name: m for m in rpc.MaceFieldStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert {h.name: list(h.elements) for h in info["macefield-default"].heads} == {"sio2": [8, 14],
                                                                                   "batio3": [8, 22, 56]}
    assert {h.name: list(h.elements) for h in info["foundation"].heads} == {"one": [8, 14, 22, 56],
                                                                            "two": [8, 14, 22, 56]}
    with Client(f"127.0.0.1:{server.port}") as client:
        default = client.list_models().default_model
    assert default.head_elements == {"sio2": [8, 14], "batio3": [8, 22, 56]}
    assert default.heads_knowing([56, 22, 8]) == ["batio3"] and default.heads_knowing([8]) == ["sio2", "batio3"]


def test_trained_elements_rules():
    """Statistics first, else non-zero E0 per head, else every element of the model."""
    served = load_default_model()
    assert trained_elements(served.model, served.heads) == {"sio2": {8, 14}, "batio3": {8, 22, 56}}
    model = random_field_model(atomic_numbers=(8, 14, 22), heads=("a", "b"), seed=1)
    energies = model.atomic_energies_fn.atomic_energies
    energies[1, 1] = 0.0  # head b never saw Si
    assert trained_elements(model, ["a", "b"]) == {"a": {8, 14, 22}, "b": {8, 22}}
    energies.zero_()  # no E0 at all: every element
    assert trained_elements(model, ["a", "b"]) == {"a": {8, 14, 22}, "b": {8, 14, 22}}


def test_no_head_named_chooses_the_head_that_knows_the_elements(server):
    quartz, bto = alpha_quartz(cell="pbe"), perovskite_batio3(repeat=(2, 2, 2))
    oxygen = Atoms("O2", positions=[(0, 0, 0), (0, 0, 1.21)])
    with Client(f"127.0.0.1:{server.port}") as client:
        assert client.predict(bto).head == "batio3"
        assert client.predict(quartz).head == "sio2"
        assert client.predict(oxygen).head == "sio2"  # both heads know O: the default head
        # per structure within one batch
        assert [r.head for r in client.predict_many([quartz, bto, quartz])] == ["sio2", "batio3", "sio2"]
        # the same result as naming the head
        np.testing.assert_allclose(client.predict(bto).forces, client.predict(bto, head="batio3").forces, rtol=1e-12)
        # a foundation-like model (every head knows every element): the default head as before
        assert client.predict(bto, model="foundation").head == "two"
        assert client.predict(bto, model="foundation", head="one").head == "one"


def test_a_head_that_never_saw_an_element_is_refused_unless_allowed(server):
    bto = perovskite_batio3(repeat=(2, 2, 2))
    quartz_with_ba = alpha_quartz(cell="pbe") + Atoms("Ba", positions=[(0.0, 0.0, 2.7)])
    with Client(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(InvalidRequest) as named:
            client.predict(bto, head="sio2")
        message = str(named.value)
        assert message.startswith("atomic_numbers: element(s) Ti (22), Ba (56) never seen in training by head 'sio2'")
        assert "Ti: batio3; Ba: batio3" in message and "heads trained on all of them: batio3" in message
        assert "allow_unseen_elements" in message
        with pytest.raises(InvalidRequest) as mixed:  # no head knows Si and Ba together
            client.predict(quartz_with_ba)
        assert "Ba (56)" in str(mixed.value) and "Ba: batio3" in str(mixed.value)
        assert "no head of this model was trained on all of them" in str(mixed.value)
        # an explicit opt-in evaluates (the grade says what it is worth)
        r = client.predict(bto, head="sio2", allow_unseen_elements=True)
        assert r.head == "sio2" and np.isinf(r.extrapolation_max)
        assert client.predict(quartz_with_ba, allow_unseen_elements=True).head == "sio2"
        with client.session(head="sio2", allow_unseen_elements=True) as session:
            assert session.predict(bto).head == "sio2"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = rpc.MaceFieldStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PredictBatch(pb.PredictBatchRequest(structures=[request_for(alpha_quartz()),
                                                                 request_for(bto, head="sio2")]), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("structures[1].atomic_numbers: element(s) Ti (22), Ba (56)")
        assert stub.Predict(request_for(bto, head="sio2", allow_unseen_elements=True), timeout=60).head == "sio2"


def test_cli_reports_the_chosen_head_and_lists_head_elements(server, tmp_path):
    import ase.io

    target = f"127.0.0.1:{server.port}"
    src, out = tmp_path / "bto.xyz", tmp_path / "out.xyz"
    frame = perovskite_batio3(repeat=(2, 2, 2))
    frame.info["REF_energy"] = -100930.0 / 135 * len(frame)
    ase.io.write(src, [frame], format="extxyz")
    env = torch_free_env(tmp_path)
    cli = [sys.executable, "-m", "macefield_client.cli"]
    info = run_torch_free([*cli, "info", "--server", target], env).stdout
    assert "head sio2: trained on O Si" in info and "head batio3: trained on O Ti Ba" in info
    text = run_torch_free([*cli, "eval", str(src), "--server", target], env).stdout
    assert "head batio3 (chosen by the server from the elements; --head to choose)" in text
    proc = run_torch_free([*cli, "predict", str(src), "--server", target, "-o", str(out)], env)
    assert ase.io.read(out).info["MACE_energy"] == pytest.approx(-100930.0 / 135 * len(frame), rel=2e-3)
    assert "head batio3 (chosen by the server" in proc.stderr
    refused = subprocess.run([*cli, "predict", str(src), "--server", target, "-o", str(out), "--head", "sio2"],
                             env=env[0], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "never seen in training by head 'sio2'" in refused.stderr
    run_torch_free([*cli, "predict", str(src), "--server", target, "-o", str(out), "--head", "sio2",
                    "--allow-unseen-elements"], env)
    # head sio2's meaningless number (a third of the energy), asked for explicitly
    assert ase.io.read(out).info["MACE_energy"] > 0.5 * frame.info["REF_energy"]
