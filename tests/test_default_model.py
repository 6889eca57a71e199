"""The shipped default model: loads through the public API, its card is consistent, and
the per-frame validation errors listed in the card are recomputed here, independently of
the training code (public ``predict`` + labels read straight from the extended-XYZ files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from macefield_server.engine import load_model, predict
from macefield_server.engine.architecture import describe_architecture
from macefield_client.contract import EPS0
from macefield_server.weights import DEFAULT_TRAINING_STAGES

MODELS = REPO / "server" / "macefield_server" / "weights"
MODEL = MODELS / "default.pt"
CARD = MODELS / "default.card.json"

#: how the labels of each validation set are read (independent of training/data.py)
LABELS = {
    "sio2-quartz": {
        "file": "sio2-quartz-md.xyz",
        "energy": lambda a: a.info["total_energy"],
        "forces": lambda a: a.calc.results["forces"],
        "born_charges": lambda a: a.arrays["born_charge"].reshape(-1, 3, 3),
        "polarizability": lambda a: np.reshape(a.info["polarizability"], (3, 3)),
        "dipole": lambda a: a.calc.results["polarization"],
    },
    "batio3": {
        "file": "batio3-md.xyz",
        "energy": lambda a: a.info["REF_energy"],
        "forces": lambda a: a.arrays["REF_forces"],
        "born_charges": lambda a: a.arrays["REF_becs"].reshape(-1, 3, 3),
        "polarizability": lambda a: np.reshape(a.info["REF_polarisability"], (3, 3)) * a.get_volume(),
        "dipole": lambda a: np.asarray(a.info["REF_polarisation"]) * a.get_volume(),
    },
}


@pytest.fixture(scope="module")
def card():
    return json.loads(CARD.read_text())


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def test_default_model_files_and_card(model, card):
    assert MODEL.stat().st_size < 20 * 1024 * 1024
    assert list(model.heads) == ["sio2", "batio3"]
    assert sorted(int(z) for z in model.atomic_numbers) == [8, 14, 22, 56]
    # the ZBL pair repulsion is part of F (stage 4 added it)
    assert hasattr(model, "pair_repulsion_fn") and describe_architecture(model)["pair_repulsion"]
    # the JSON card is embedded in the checkpoint
    assert model.metadata["card"] == card
    assert "2508.17870" in " ".join(card["citations"])
    # trained in five stages; the configs are in the repository (and the package) and the card names them in order
    assert card["training"]["command"].startswith(
        "macefield-train --config server/macefield_server/weights/default.stage5.yaml")
    stages = card["previous_stages"]
    assert [s["command"].split()[2] for s in stages] == [
        f"server/macefield_server/weights/default.stage{i}.yaml" for i in (1, 2, 3, 4)
    ]
    assert [p.name for p in DEFAULT_TRAINING_STAGES] == [f"default.stage{i}.yaml" for i in (1, 2, 3, 4, 5)]
    for config in DEFAULT_TRAINING_STAGES:
        assert config.is_file() and (MODELS / config.name).is_file()
    md = (MODELS / "default.card.md").read_text()
    assert all(f"Stage {i}:" in md for i in (1, 2, 3, 4)) and "Stage 5 (this run" in md
    for name, head in (("sio2-quartz", "sio2"), ("batio3", "batio3")):
        v = card["validation"][name]
        assert v["head"] == head
        for key in (
            "energy_mae_meV_per_atom",
            "forces_mae_meV_per_A",
            "stress_mae_meV_per_A3",
            "born_charges_mae_e",
            "born_charges_rmse_e",
            "polarizability_rel_error",
            "eps_inf_pred_diag",
            "eps_inf_dft_diag",
            "polarization_folded_mae_e_per_A2",
        ):
            assert key in v, (name, key)
    # validation frames are the last 20% of each file
    assert card["validation"]["sio2-quartz"]["frames_in_file"] == [129, 160]
    assert card["validation"]["batio3"]["frames_in_file"] == [38, 46]
    assert (MODELS / "default.card.md").read_text().count("|") > 50


@pytest.mark.usefixtures("shared_data")
def test_card_validation_frames_are_recomputed(model, card):
    """Per-frame errors of the card, recomputed with the public API (float tolerance only)."""
    from ase.io import read

    frames = card["validation_frames"]
    assert {f["dataset"] for f in frames} == {"sio2-quartz", "batio3"}
    for entry in frames:
        spec = LABELS[entry["dataset"]]
        head = card["validation"][entry["dataset"]]["head"]
        atoms = read(SHARED_DATA / spec["file"], index=entry["frame"])
        n = len(atoms)
        r = predict(model, atoms, heads=head, outputs="all")[0]

        e_err = 1000.0 * (float(r["energy"]) - spec["energy"](atoms)) / n
        # float32 model: absolute energies of ~1e5 eV carry ~0.01 eV of rounding
        assert e_err == pytest.approx(entry["energy_error_meV_per_atom"], abs=0.05)
        f_mae = 1000.0 * np.abs(r["forces"] - spec["forces"](atoms)).mean()
        assert f_mae == pytest.approx(entry["forces_mae_meV_per_A"], rel=1e-3, abs=0.05)
        z_mae = np.abs(r["born_charges"] - spec["born_charges"](atoms)).mean()
        assert z_mae == pytest.approx(entry["born_charges_mae_e"], rel=1e-3, abs=1e-5)
        alpha_ref = spec["polarizability"](atoms)
        rel = np.linalg.norm(r["polarizability"] - alpha_ref) / np.linalg.norm(alpha_ref)
        assert rel == pytest.approx(entry["polarizability_rel_error"], rel=1e-3, abs=1e-5)
        eps_ref = 1.0 + np.diag(alpha_ref) / (atoms.get_volume() * EPS0)
        assert np.allclose(np.diag(r["eps_inf"]), entry["eps_inf_pred"], rtol=1e-4)
        assert np.allclose(eps_ref, entry["eps_inf_ref"], rtol=1e-6)
        # folded P: the residual, reduced modulo the quanta e*a_k/Omega along each lattice vector
        dP = r["polarization"] - spec["dipole"](atoms) / atoms.get_volume()
        quanta = r["polarization_quantum"]  # rows e*a_k/Omega
        frac = np.linalg.solve(quanta.T, dP)
        folded = (frac - np.floor(frac + 0.5)) @ quanta
        assert np.allclose(folded, entry["polarization_folded_error_e_per_A2"], rtol=1e-3, atol=1e-7)


@pytest.mark.usefixtures("shared_data")
def test_card_numbers_match_a_fresh_subset_evaluation(model, card):
    """Z* MAE on every 4th validation frame of SiO2 agrees with the card's full-split Z* MAE.

    Not identical frames, so the tolerance is statistical: 25% of the MAE.
    """
    from ase.io import read

    frames = read(SHARED_DATA / "sio2-quartz-md.xyz", index="129::8")
    results = predict(model, frames, heads="sio2", outputs=["born_charges"])
    mae = np.mean([np.abs(r["born_charges"] - a.arrays["born_charge"].reshape(-1, 3, 3)).mean()
                   for r, a in zip(results, frames)])
    assert mae == pytest.approx(card["validation"]["sio2-quartz"]["born_charges_mae_e"], rel=0.25)


@pytest.mark.usefixtures("shared_data")
def test_default_model_is_served_by_a_real_server_process(model, card):
    """``macefield-serve`` without a model option serves the shipped model and its card."""
    grpc = pytest.importorskip("grpc")
    from ase.io import read
    from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
    from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
    from serving import ServerProcess, arrays, request_for, wait_for

    proc = ServerProcess([])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}")
        stub = rpc.MaceFieldStub(channel)

        def listed():
            try:
                return stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            except grpc.RpcError:
                return None

        (info,) = wait_for(listed, timeout=180, what="ListModels")
        assert json.loads(info.card_json) == card
        assert info.default_head == "sio2"
        atoms = read(SHARED_DATA / "sio2-quartz-md.xyz", index=150)

        def served():
            try:
                return stub.Predict(request_for(atoms, outputs=["forces", "born_charges", "polarizability"]),
                                    timeout=60)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:  # still warming up
                    return None
                raise

        got = arrays(wait_for(served, timeout=180, interval=0.5, what="Predict"))
        ref = predict(model, atoms, heads="sio2", outputs=["forces", "born_charges", "polarizability"])[0]
        for key in ("forces", "born_charges", "polarizability"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
    finally:
        proc.kill()


def test_card_goals_are_its_validation_numbers(card):
    """Each goal of the card reports the validation number it is about, and 'met' says value <= target."""
    assert {(g["dataset"], g["metric"]) for g in card["goals"]} >= {
        ("sio2-quartz", "forces_mae_meV_per_A"), ("batio3", "forces_mae_meV_per_A"),
        ("sio2-quartz", "born_charges_mae_e"), ("batio3", "born_charges_mae_e")}
    for goal in card["goals"]:
        assert goal["value"] == card["validation"][goal["dataset"]][goal["metric"]]
        assert goal["met"] == (goal["value"] <= goal["target_max"])


def test_card_marks_the_force_goals_met(card):
    forces = {g["dataset"]: g for g in card["goals"] if g["metric"] == "forces_mae_meV_per_A"}
    assert set(forces) == {"sio2-quartz", "batio3"}
    assert all(g["met"] for g in forces.values()), {k: (g["value"], g["target_max"]) for k, g in forces.items()}


@pytest.mark.usefixtures("shared_data")
def test_card_force_errors_match_a_fresh_subset_evaluation(model, card):
    """Force MAE on every 4th validation frame of each set agrees with the card's full-split force MAE (25%:
    a subset of the frames, not the same frames)."""
    from ase.io import read

    for name, first in (("sio2-quartz", 129), ("batio3", 38)):
        spec = LABELS[name]
        frames = read(SHARED_DATA / spec["file"], index=f"{first}::4")
        results = predict(model, frames, heads=card["validation"][name]["head"], outputs=["forces"])
        mae = 1000.0 * np.mean([np.abs(r["forces"] - spec["forces"](a)).mean() for r, a in zip(results, frames)])
        assert mae == pytest.approx(card["validation"][name]["forces_mae_meV_per_A"], rel=0.25), name
