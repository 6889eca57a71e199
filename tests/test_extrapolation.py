"""The extrapolation grade (issue 13): calibration, what it flags on the shipped default model, invariances,
the native format, and how it is served (gRPC, ListModels, metrics, ASE calculator, command line).

The default model's statistics come from its training frames (SiO2 0:129, BaTiO3 0:38); the flagged structures
are built in tests/extrapolation_cases.py.  Threshold: grade > 1 is extrapolating.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import ase.io
import grpc
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, quartz_like, random_field_model
from extrapolation_cases import (chain_structure, close_pair_quartz, compressed_quartz, si_coordination,
                                 swapped_batio3, wrong_quartz)
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from macefield_client.structures import alpha_quartz, sio_molecule
from serving import metric, request_for, run_torch_free, torch_free_env

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ServerConfig
from macefield_server.engine import load_model, predict, save_model
from macefield_server.engine.extrapolation import attach, calibrated_heads, statistics_of
from macefield_server.training.calibration import calibrate
from macefield_server.weights import DEFAULT_CARD, DEFAULT_MODEL
from macefield_server.serving.registry import ServedModel

THRESHOLD = 1.0


@pytest.fixture(scope="module")
def default():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads(DEFAULT_CARD.read_text())


def grades(model, atoms_list, head="sio2", **kwargs):
    """Per-atom grades of each structure (a list of (N,) arrays)."""
    return [r["extrapolation"] for r in predict(model, atoms_list, heads=head, outputs=["energy"], **kwargs)]


def tiny_calibrated(seed=3):
    """A small random two-head model with statistics for head sio2 (rattled quartz cells) only."""
    model = random_field_model(heads=("sio2", "other"), seed=seed)
    reference = [quartz_like(rattle=0.05, seed=s) for s in range(12)]
    return attach(model, calibrate(model, reference, "sio2", reference={"what": "12 rattled quartz cells"}))


# ------------------------------------------------------------------ the default model
def test_default_model_ships_statistics_for_both_heads(default, card):
    assert calibrated_heads(default) == ["sio2", "batio3"]
    stats = statistics_of(default)
    assert stats.threshold == THRESHOLD and stats.n_features == 128  # 64 invariants of each of the 2 layers
    counts = {h: {z: s.n_reference for z, s in e.items()} for h, e in stats.heads.items()}
    assert counts == {"sio2": {8: 129 * 48, 14: 129 * 24}, "batio3": {8: 38 * 81, 22: 38 * 27, 56: 38 * 27}}
    section = card["extrapolation"]
    assert default.metadata["card"] == card and section["threshold"] == THRESHOLD
    assert section["heads"]["sio2"]["reference"]["files"] == [
        {"file": "sio2-quartz-md.xyz", "frames": [0, 129, 1], "structures": 129}]
    assert section["heads"]["batio3"]["reference"]["files"] == [
        {"file": "batio3-md.xyz", "frames": [0, 38, 1], "structures": 38}]
    md = DEFAULT_CARD.with_name("default.card.md").read_text()
    assert "## Extrapolation grade" in md and "threshold 1 (grade > 1: extrapolating)" in md


@pytest.mark.usefixtures("shared_data")
def test_training_frames_are_inside_and_the_held_out_fraction_is_the_cards(default, card):
    """No training atom above the threshold; the held-out frames' fraction (reported, small) is the card's."""
    for name, head, n_train in (("sio2-quartz-md.xyz", "sio2", 129), ("batio3-md.xyz", "batio3", 38)):
        frames = ase.io.read(SHARED_DATA / name, index=":")
        train = np.concatenate(grades(default, frames[:n_train], head))
        held = np.concatenate(grades(default, frames[n_train:], head))
        assert train.max() <= 1.0 / 1.01 + 1e-4, (head, train.max())  # the margin keeps rounding inside
        fraction = float(np.mean(held > THRESHOLD))
        recorded = card["extrapolation"]["heads"][head]["holdout"]
        print(f"{head}: {100 * fraction:.2f}% of held-out atoms above {THRESHOLD} (max {held.max():.3g})")
        assert fraction == pytest.approx(recorded["fraction_above"], abs=2e-3)
        assert 0.0 < fraction < 0.1 and held.max() < 5.0


def test_structures_outside_the_training_data_are_flagged(default):
    """The wrong quartz, 15% compression, O 0.6 A from Si and the model's own O=Si=O chains: above 1; real quartz: not."""
    chain, below_quartz = chain_structure(load_model(DEFAULT_MODEL, dtype="float64"))
    assert np.all(si_coordination(chain) == 2) and below_quartz < -0.05  # the spurious basin (issue 13: -0.1 eV/atom)
    flagged = {"wrong quartz": wrong_quartz(), "15% compressed": compressed_quartz(0.85),
               "O 0.6 A from Si": close_pair_quartz(0.6), "O=Si=O chains": chain}
    controls = {"PBE cell": alpha_quartz(cell="pbe", repeat=(2, 2, 2)),
                "experimental cell": alpha_quartz(repeat=(2, 2, 2)),
                "5% compressed": compressed_quartz(0.95)}
    got = dict(zip(list(flagged) + list(controls), grades(default, list(flagged.values()) + list(controls.values()))))
    for name in flagged:
        assert got[name].max() > THRESHOLD, (name, got[name].max())
    for name in controls:
        assert got[name].max() <= THRESHOLD, (name, got[name].max())
    # the close pair: its two atoms carry the largest grades
    pair = np.argsort(got["O 0.6 A from Si"])[-2:]
    assert sorted(close_pair_quartz(0.6).numbers[pair]) == [8, 14]
    # an element without reference atoms in the head: +inf (quartz on head batio3 has Si)
    [on_batio3] = grades(default, [controls["PBE cell"]], head="batio3")
    assert np.all(np.isinf(on_batio3[controls["PBE cell"].numbers == 14]))


@pytest.mark.usefixtures("shared_data")
def test_batio3_with_ba_and_ti_swapped_is_flagged(default):
    frame = ase.io.read(SHARED_DATA / "batio3-md.xyz", index=10)  # a training frame
    original, swapped = grades(default, [frame, swapped_batio3(frame)], head="batio3")
    assert original.max() <= THRESHOLD < swapped.max()
    assert np.all(swapped[frame.numbers != 8] > THRESHOLD)  # every cation is in a wrong site


def test_grade_rises_with_rattle_amplitude(default):
    """Geometric mean over atoms and 8 seeds of 72-atom quartz: strictly increasing from 0.02 to 0.5 A."""
    amplitudes = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    atoms = [alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=a, seed=s) for a in amplitudes for s in range(8)]
    g = np.array(grades(default, atoms)).reshape(len(amplitudes), -1)
    mean = np.exp(np.log(g).mean(axis=1))
    print(dict(zip(amplitudes, np.round(mean, 3))))
    assert np.all(np.diff(mean) > 0), mean
    assert mean[0] < THRESHOLD < mean[-1] and mean[-1] > 10


def test_grade_is_invariant_and_the_same_alone_or_in_a_batch(default):
    """Rotation (with the field), translation, permutation; alone = inside a batch of other structures and heads."""
    model = load_model(DEFAULT_MODEL, dtype="float64")
    atoms = alpha_quartz(cell="pbe", rattle=0.1, seed=4)
    field = np.array([0.0, 0.02, 0.01])
    [ref] = grades(model, [atoms], electric_fields=field)
    assert ref.max() > 0.5  # not trivially zero

    rot = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.2], [0.3, 0, -0.7], [-0.2, 0.7, 0]],
                                               dtype=torch.float64)).numpy()
    turned = atoms.copy()
    turned.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
    turned.positions = atoms.positions @ rot.T + np.array([3.1, -2.0, 7.5])
    [g_turned] = grades(model, [turned], electric_fields=rot @ field)
    np.testing.assert_allclose(g_turned, ref, rtol=1e-8)

    order = np.random.default_rng(1).permutation(len(atoms))
    [g_perm] = grades(model, [atoms[order]], electric_fields=field)
    np.testing.assert_allclose(g_perm, ref[order], rtol=1e-10)

    others = [quartz_like(seed=9), sio_molecule(), compressed_quartz(0.9)]
    batch = predict(model, others + [atoms], electric_fields=[np.zeros(3)] * 3 + [field],
                    heads=["sio2", "batio3", "sio2", "sio2"], outputs=["energy"], max_edges=None)
    np.testing.assert_allclose(batch[-1]["extrapolation"], ref, rtol=1e-10)
    assert batch[-1]["extrapolation_max"] == pytest.approx(ref.max(), rel=1e-10)


# -------------------------------------------------------------------- native format
def test_calibration_round_trips_bit_exactly(tmp_path):
    model = tiny_calibrated()
    path = save_model(model, tmp_path / "calibrated.pt")
    payload = torch.load(path, weights_only=True)
    tensors = payload["extrapolation"]["tensors"]["sio2"]["8"]
    assert {k: v.dtype for k, v in tensors.items()} == dict.fromkeys(("basis", "coefficients", "residual_radius"),
                                                                    torch.float64)
    loaded = load_model(path)
    a, b = statistics_of(model), statistics_of(loaded)
    assert a.to_payload()["statistics"] == b.to_payload()["statistics"]
    for z in (8, 14):
        for name in ("basis", "coefficients", "residual_radius"):
            assert torch.equal(getattr(a.heads["sio2"][z], name), getattr(b.heads["sio2"][z], name))
    atoms = [quartz_like(rattle=0.2, seed=30), sio_molecule()]
    for x, y in zip(grades(model, atoms), grades(loaded, atoms)):
        assert np.array_equal(x, y)
    again = torch.load(save_model(loaded, tmp_path / "again.pt"), weights_only=True)["extrapolation"]
    assert again["statistics"] == payload["extrapolation"]["statistics"]


def test_old_checkpoints_without_statistics_load_and_refuse_the_grade(tmp_path, default):
    """The previous default.pt is the current one without its 'extrapolation' entry: it loads and works."""
    payload = torch.load(DEFAULT_MODEL, weights_only=True)
    del payload["extrapolation"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    model = load_model(old)
    assert statistics_of(model) is None and calibrated_heads(model) == []
    atoms = alpha_quartz(cell="pbe")
    [plain] = predict(model, [atoms], heads="sio2", outputs="all")
    [graded] = predict(default, [atoms], heads="sio2", outputs="all")
    assert "extrapolation" not in plain and "extrapolation" in graded
    for key in plain:
        assert np.array_equal(plain[key], graded[key]), key  # the same weights, the same numbers
    with pytest.raises(ValueError, match="macefield-calibrate"):
        predict(model, [atoms], outputs=["extrapolation"])


def test_macefield_calibrate_cli_on_pickles_and_a_second_head(tmp_path, monkeypatch):
    """Plain mace-torch pickle (--trust-pickle), head x then head y into the same file, with a model card."""
    from test_model_checkpoints import plain_mace

    from macefield_server.cli import calibrate as calibrate_cli

    source = tmp_path / "foundation.model"
    torch.save(plain_mace(heads=("x", "y")), source)
    frames = tmp_path / "frames.xyz"
    ase.io.write(frames, [quartz_like(rattle=0.05, seed=s) for s in range(10)], format="extxyz")
    card = tmp_path / "m.card.json"
    card.write_text(json.dumps({"name": "m"}))
    out = tmp_path / "m.pt"
    cli = [sys.executable, "-m", "macefield_server.cli.calibrate"]
    first = subprocess.run(cli + [str(source), str(frames), "--head", "x", "--frames", "0:8", "-o", str(out),
                                  "--trust-pickle"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout[first.stdout.index("\n{") + 1:] if not first.stdout.startswith("{") else first.stdout)
    assert summary["head"] == "x" and summary["elements"]["14"]["n_reference"] == 8 * 3
    assert summary["max_reference_grade"] <= 1.0 / 1.01 + 1e-9
    second = subprocess.run(cli + [str(out), str(frames), "--head", "y", "--frames", "0:8", "--holdout-frames", "8:",
                                   "-o", str(out), "--card", str(card)], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    model = load_model(out)
    assert calibrated_heads(model) == ["x", "y"]
    written = json.loads(card.read_text())
    assert model.metadata["card"] == written and written["name"] == "m"
    held = written["extrapolation"]["heads"]["y"]["holdout"]
    assert held["structures"] == 2 and held["atoms"] == 18
    assert written["extrapolation"]["heads"]["y"]["command"].startswith("macefield-calibrate ")
    # bad input: exit 2 with a message naming it
    assert calibrate_cli.main([str(out), str(frames), "--head", "nope", "-o", str(tmp_path / "x.pt")]) == 2
    assert calibrate_cli.main([str(source), str(frames), "-o", str(tmp_path / "x.pt")]) == 2  # pickle, no trust


def test_reference_macefield_pickle_is_calibrated_like_any_model(tmp_path, monkeypatch):
    import mace.modules.extensions as mace_extensions
    from test_model_checkpoints import _pickle_under

    path = _pickle_under(random_field_model(seed=21), mace_extensions, "MACEField", tmp_path / "ref.model", monkeypatch)
    model = load_model(path, trust_pickle=True)
    attach(model, calibrate(model, [quartz_like(seed=s) for s in range(6)]))
    loaded = load_model(save_model(model, tmp_path / "native.pt"))
    assert calibrated_heads(loaded) == ["Default"]
    far = quartz_like(rattle=0.4, seed=1)
    assert np.array_equal(grades(model, [far], head=None)[0], grades(loaded, [far], head=None)[0])


# ------------------------------------------------------------------------ serving
@pytest.fixture(scope="module")
def server(default):
    models = [ServedModel("default", default, "sio2", is_default=True),
              ServedModel("plain", random_field_model(heads=("sio2", "other"), seed=3), "sio2")]
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, metrics_port=0), models) as srv:
        yield srv


def test_served_grade_list_models_and_refusal(server, default):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = rpc.MaceFieldStub(channel)
        info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert [(h.name, h.extrapolation) for h in info["default"].heads] == [("sio2", True), ("batio3", True)]
        assert info["default"].extrapolation_threshold == THRESHOLD
        assert {"extrapolation", "extrapolation_max"} <= set(info["default"].outputs)
        assert info["default"].units["extrapolation"] == "dimensionless"
        assert not any(h.extrapolation for h in info["plain"].heads) and info["plain"].extrapolation_threshold == 0
        assert "extrapolation" not in info["plain"].outputs

        before = metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default", head="sio2")
        inside_before = metric(server.metrics_port, "macefield_extrapolation_grade_bucket", model="default", head="sio2",
                               le="1.0")
        wrong, quartz = wrong_quartz(), alpha_quartz(cell="pbe")
        # no outputs named: the grade comes anyway (a head with statistics)
        response = stub.Predict(request_for(wrong), timeout=60)
        assert "extrapolation" in response.outputs and "extrapolation_max" in response.outputs
        [ref] = predict(default, [wrong], heads="sio2", outputs="all")
        np.testing.assert_allclose(response.extrapolation, ref["extrapolation"], rtol=1e-5)
        assert response.extrapolation_max == pytest.approx(float(ref["extrapolation_max"]), rel=1e-5)
        assert response.extrapolation_max > THRESHOLD

        batch = stub.PredictBatch(pb.PredictBatchRequest(structures=[
            request_for(quartz, outputs=["extrapolation"]), request_for(quartz, head="batio3", outputs=["forces"],
                                                           allow_unseen_elements=True)]),
            timeout=60).results
        assert batch[0].extrapolation_max <= THRESHOLD and list(batch[0].outputs) == ["energy", "extrapolation",
                                                                                     "extrapolation_max", "volume"]
        assert np.isinf(batch[1].extrapolation_max)  # Si has no reference atoms in head batio3
        assert metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default", head="sio2") == before + 2
        assert metric(server.metrics_port, "macefield_extrapolation_grade_bucket", model="default", head="sio2",
                      le="1.0") == inside_before + 1
        assert metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default", head="batio3") >= 1

        plain = stub.Predict(request_for(quartz, model="plain"), timeout=60)
        assert "extrapolation" not in plain.outputs
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request_for(quartz, model="plain", outputs=["forces", "extrapolation"]), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("outputs: extrapolation") and "macefield-calibrate" in err.value.details()


def test_ase_calculator_warns_once_per_run_raises_or_ignores(server, default):
    from macefield_client import Client, ExtrapolationError, ExtrapolationWarning
    from macefield_client.ase import MACEFieldCalculator

    client = Client(f"127.0.0.1:{server.port}")
    atoms = wrong_quartz()
    calc = MACEFieldCalculator(client=client)
    atoms.calc = calc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.get_forces()
        atoms.rattle(0.01, seed=1)
        atoms.get_forces()
    flagged = [w for w in caught if issubclass(w.category, ExtrapolationWarning)]
    assert len(flagged) == 1 and "extrapolation grade" in str(flagged[0].message)
    assert calc.extrapolation_flagged == 2
    [ref] = predict(default, [atoms], heads="sio2", outputs="all")
    np.testing.assert_allclose(calc.get_property("extrapolation", atoms), ref["extrapolation"], rtol=1e-5)

    quartz = alpha_quartz(cell="pbe")
    quartz.calc = MACEFieldCalculator(client=client, extrapolation="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quartz.get_potential_energy() and quartz.calc.get_property("extrapolation_max", quartz) <= THRESHOLD
    wrong = wrong_quartz()
    wrong.calc = MACEFieldCalculator(client=client, extrapolation="raise")
    with pytest.raises(ExtrapolationError) as err:
        wrong.get_potential_energy()
    assert err.value.grade > THRESHOLD and wrong.numbers[err.value.atom] == 14

    wrong.calc = MACEFieldCalculator(client=client, extrapolation="ignore")
    plain = quartz.copy()
    plain.calc = MACEFieldCalculator(client=client, model="plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong.get_potential_energy()
        plain.get_potential_energy()
        plain.rattle(0.01)
        plain.get_potential_energy()
    messages = [str(w.message) for w in caught if issubclass(w.category, ExtrapolationWarning)]
    assert len(messages) == 1 and "no extrapolation statistics" in messages[0]
    client.close()


@pytest.mark.usefixtures("shared_data")
def test_cli_writes_the_grade_per_atom_when_asked(server, tmp_path, default):
    frames = ase.io.read(SHARED_DATA / "sio2-quartz-md.xyz", index="159:161") + [wrong_quartz()]
    for a in frames[2:]:
        a.info["REF_energy"] = 0.0
    src = tmp_path / "in.xyz"
    ase.io.write(src, frames, format="extxyz")
    env = torch_free_env(tmp_path)
    target = f"127.0.0.1:{server.port}"
    cli = [sys.executable, "-m", "macefield_client.cli"]
    run_torch_free(cli + ["predict", str(src), "--server", target, "--outputs", "energy", "extrapolation",
                          "-o", str(tmp_path / "p.xyz")], env)
    report = json.loads(run_torch_free(cli + ["eval", str(src), "--server", target, "--extrapolation", "--json",
                                              "--energy-key", "REF_energy", "--polarizability-unit", "extensive",
                                              "-o", str(tmp_path / "e.xyz")], env).stdout)
    ref = grades(default, frames)
    for name in ("p.xyz", "e.xyz"):
        written = ase.io.read(tmp_path / name, index=":")
        for a, g in zip(written, ref):  # float32 model, other batches: rounding moves the grade by ~1e-4 at most
            np.testing.assert_allclose(a.arrays["MACE_extrapolation"], g, rtol=2e-4, atol=1e-4)
            assert a.info["MACE_extrapolation_max"] == pytest.approx(g.max(), rel=2e-4)
    summary = report["extrapolation"]
    assert summary["frames"] == 3 and summary["frames_above"] >= 1 and summary["max_frame"] == 2
    assert summary["atoms_above"] == int(sum(np.sum(g > THRESHOLD) for g in ref))
    plain = run_torch_free(cli + ["predict", str(src), "--server", target, "-o", str(tmp_path / "q.xyz")], env)
    assert plain.returncode == 0 and "MACE_extrapolation" not in ase.io.read(tmp_path / "q.xyz").arrays


def test_statistics_of_other_weights_are_not_served(tmp_path, default):
    """A checkpoint whose weights changed after calibration (fine-tuning) loads without its statistics, says why,
    and serves no grade; the trainer drops them when it fine-tunes a calibrated model."""
    import torch

    from macefield_server.engine import load_model, save_model
    from macefield_server.engine.extrapolation import statistics_of, weights_fingerprint

    assert statistics_of(default).weights == weights_fingerprint(default)
    tuned = load_model(DEFAULT_MODEL)
    with torch.no_grad():
        next(tuned.parameters()).add_(1e-3)  # one training step, as it were
    path = save_model(tuned, tmp_path / "tuned.pt")  # still carries the old statistics
    loaded = load_model(path)
    assert statistics_of(loaded) is None
    assert "computed for other weights" in loaded.metadata["extrapolation_dropped"]
    with pytest.raises(ValueError, match="extrapolation"):
        predict(loaded, [quartz_like()], heads="sio2", outputs=["energy", "extrapolation"])
    same = load_model(save_model(load_model(DEFAULT_MODEL), tmp_path / "same.pt"))
    assert statistics_of(same) is not None  # unchanged weights keep them
