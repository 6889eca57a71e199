"""The extrapolation grade and the field range: calibration, what they flag on the shipped default model (at zero
and finite field), invariances, the native format (and refusal of earlier statistics), and how they are served
(gRPC, ListModels, metrics, ASE calculator, command line).

The default model's statistics come from its training frames (SiO2 0:129, BaTiO3 0:38); the flagged structures
are built in tests/extrapolation_cases.py.  Threshold (both): > 1 is extrapolating.
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
from conftest import SHARED_DATA, grade_round_off, quartz_like, random_field_model
from extrapolation_cases import (chain_structure, close_pair_quartz, compressed_quartz, si_coordination,
                                 swapped_batio3, wrong_quartz)
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from macefield_client.structures import alpha_quartz, sio_molecule
from serving import metric, request_for, run_torch_free, torch_free_env

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ServerConfig
from macefield_server.engine import load_model, predict, save_model
from macefield_server.engine.graph import Structure
from macefield_server.engine.extrapolation import (STATISTICS_VERSION, ExtrapolationStatistics, OutdatedStatistics,
                                                   attach, calibrated_heads, latent_features, statistics_of)
from macefield_server.engine.predict import prepare_batch
from macefield_server.training.calibration import calibrate
from macefield_server.weights import DEFAULT_CARD, DEFAULT_MODEL
from macefield_server.serving.registry import ServedModel

THRESHOLD = 1.0
#: the fields (V/A) at which the grade must behave as at zero field: magnitudes along x and z
FIELDS = [np.array(v) for v in ([0.05, 0, 0], [0, 0, 0.05], [0.1, 0, 0], [0, 0, 0.1], [0.36, 0, 0], [0, 0, 0.36])]
#: the flagged structures must stay flagged at these
CASE_FIELDS = [np.array(v) for v in ([0, 0, 0], [0.05, 0, 0], [0, 0, 0.05], [0.36, 0, 0], [0, 0, 0.36])]


@pytest.fixture(scope="module")
def default():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads(DEFAULT_CARD.read_text())


def grades(model, atoms_list, head="sio2", **kwargs):
    """Per-atom grades of each structure (a list of (N,) arrays)."""
    return [r["extrapolation"] for r in predict(model, atoms_list, heads=head, outputs=["energy"], **kwargs)]


def field_ranges(model, atoms_list, head="sio2", **kwargs):
    """field_extrapolation of each structure (an array)."""
    return np.array([float(r["field_extrapolation"])
                     for r in predict(model, atoms_list, heads=head, outputs=["energy"], **kwargs)])


def tiny_calibrated(seed=3):
    """A small random two-head model with statistics for head sio2 (rattled quartz cells) only."""
    model = random_field_model(heads=("sio2", "other"), seed=seed)
    reference = [quartz_like(rattle=0.05, seed=s) for s in range(12)]
    return attach(model, calibrate(model, reference, "sio2", reference={"what": "12 rattled quartz cells"}))


# ------------------------------------------------------------------ the default model
def test_default_model_ships_statistics_for_both_heads(default, card):
    assert calibrated_heads(default) == ["sio2", "batio3"]
    stats = statistics_of(default)
    # the 64 invariants of layer 0 before its field coupling (the only field-free layer of the default model)
    assert stats.threshold == THRESHOLD and stats.n_features == 64 and stats.layout == [(0, 0, 64)]
    assert default.field_free_layers == 1 and stats.method == "maxvol-active-set-field-free"
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
    # the field range's reference field per head, as calibrated (the card's number is the model's)
    for head in ("sio2", "batio3"):
        assert section["heads"][head]["field_reference_V_per_A"] == pytest.approx(stats.field_reference(head),
                                                                                   rel=1e-12)
    assert 0.1 < stats.field_reference("batio3") < stats.field_reference("sio2") < 1.0  # soft BaTiO3, large Ti Z*


@pytest.mark.usefixtures("shared_data")
def test_training_frames_are_inside_and_the_held_out_fraction_is_the_cards(default, card):
    """No training atom above the threshold; the held-out frames' fraction (reported, small) is the card's."""
    for name, head, n_train in (("sio2-quartz-md.xyz", "sio2", 129), ("batio3-md.xyz", "batio3", 38)):
        frames = ase.io.read(SHARED_DATA / name, index=":")
        train = np.concatenate(grades(default, frames[:n_train], head))
        held = np.concatenate(grades(default, frames[n_train:], head))
        # the active set's own atoms sit at 1/1.01 exactly in exact arithmetic; float32 features summed in another
        # neighbour order (vesin vs matscipy lists) move them by up to ~2e-4: still well inside the threshold
        assert train.max() <= 1.0 / 1.01 + 5e-4, (head, train.max())
        fraction = float(np.mean(held > THRESHOLD))
        recorded = card["extrapolation"]["heads"][head]["holdout"]
        print(f"{head}: {100 * fraction:.2f}% of held-out atoms above {THRESHOLD} (max {held.max():.3g})")
        assert fraction == pytest.approx(recorded["fraction_above"], abs=2e-3)
        assert 0.0 < fraction < 0.1 and held.max() < 5.0


@pytest.mark.usefixtures("shared_data")
def test_held_out_fraction_in_a_field_is_the_zero_field_one(default):
    """Validation frames of both heads: the fraction above 1 at 0.05, 0.1 and 0.36 V/A (x and z) is at most the
    zero-field one + 2 percentage points (the grade's features are field-free: the same grades)."""
    for name, head, frames in (("sio2-quartz-md.xyz", "sio2", slice(129, 161)),
                               ("batio3-md.xyz", "batio3", slice(38, 47))):
        held = ase.io.read(SHARED_DATA / name, index=":")[frames]
        zero = np.concatenate(grades(default, held, head))
        for field in FIELDS:
            at = np.concatenate(grades(default, held, head, electric_fields=field))
            assert np.mean(at > THRESHOLD) <= np.mean(zero > THRESHOLD) + 0.02, (head, field)
            np.testing.assert_allclose(at, zero, rtol=1e-6)  # field-independent up to batch rounding


def test_structures_outside_the_training_data_are_flagged(default):
    """The wrong quartz, 15% compression, O 0.6 A from Si and the model's own O=Si=O chains: above 1.

    Real quartz: not.
    """
    chain, below_quartz = chain_structure(load_model(DEFAULT_MODEL, dtype="float64"))
    assert np.all(si_coordination(chain) == 2) and below_quartz < -0.05  # spurious basin, ~-0.1 eV/atom
    flagged = {"wrong quartz": wrong_quartz(), "15% compressed": compressed_quartz(0.85),
               "O 0.6 A from Si": close_pair_quartz(0.6), "O=Si=O chains": chain}
    controls = {"PBE cell": alpha_quartz(cell="pbe", repeat=(2, 2, 2)),
                "experimental cell": alpha_quartz(repeat=(2, 2, 2)),
                "5% compressed": compressed_quartz(0.95)}
    structures = list(flagged.values()) + list(controls.values())
    for field in CASE_FIELDS:  # at zero field and at 0.05 and 0.36 V/A along x and z
        got = dict(zip(list(flagged) + list(controls), grades(default, structures, electric_fields=field)))
        for name in flagged:
            assert got[name].max() > THRESHOLD, (name, field, got[name].max())
        for name in controls:
            assert got[name].max() <= THRESHOLD, (name, field, got[name].max())
    got = dict(zip(list(flagged) + list(controls), grades(default, structures)))
    # the three largest grades: the moved O and the two Si it bridged in the crystal, the one it was pushed onto
    # and the one whose bond it stretched (with a core repulsion the pair's own edge fades out of the features,
    # so either Si may carry the largest grade)
    crystal = alpha_quartz(cell="pbe", repeat=(2, 2, 2))
    oxygen = int(np.flatnonzero(crystal.numbers == 8)[0])
    bridged = np.flatnonzero((crystal.numbers == 14) & (crystal.get_distances(oxygen, range(len(crystal)), mic=True)
                                                        < 2.0))
    assert len(bridged) == 2
    assert set(np.argsort(got["O 0.6 A from Si"])[-3:].tolist()) == {oxygen, *bridged.tolist()}
    # an element without reference atoms in the head: +inf (quartz on head batio3 has Si)
    [on_batio3] = grades(default, [controls["PBE cell"]], head="batio3")
    assert np.all(np.isinf(on_batio3[controls["PBE cell"].numbers == 14]))


@pytest.mark.usefixtures("shared_data")
def test_batio3_with_ba_and_ti_swapped_is_flagged(default):
    frame = ase.io.read(SHARED_DATA / "batio3-md.xyz", index=10)  # a training frame
    for field in CASE_FIELDS:
        original, swapped = grades(default, [frame, swapped_batio3(frame)], head="batio3", electric_fields=field)
        assert original.max() <= THRESHOLD < swapped.max()
        assert np.all(swapped[frame.numbers != 8] > THRESHOLD)  # every cation is in a wrong site


def test_grade_rises_with_rattle_amplitude(default):
    """Geometric mean over atoms and 8 seeds of 72-atom quartz: inside (and not ordered: the grade is no distance
    inside the hull) for displacements within the thermal spread of the training frames (0.02, 0.05 A), then
    strictly increasing from 0.05 to 0.5 A and far outside at 0.5 A."""
    amplitudes = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    atoms = [alpha_quartz(cell="pbe", repeat=(2, 2, 2), rattle=a, seed=s) for a in amplitudes for s in range(8)]
    g = np.array(grades(default, atoms)).reshape(len(amplitudes), -1)
    mean = np.exp(np.log(g).mean(axis=1))
    print(dict(zip(amplitudes, np.round(mean, 3))))
    assert np.all(np.diff(mean[1:]) > 0), mean
    assert max(mean[:2]) < 0.6 and mean[2] < THRESHOLD < mean[3] and mean[-1] > 10


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
    # the grade is as invariant as its features: they turn to the model's round-off (float32 coupling tensors,
    # float64 arithmetic), and the grade moves by at most the statistics' Lipschitz constant times that
    bound, feature_error = grade_round_off(model, model, [Structure.from_atoms(atoms, head="sio2")],
                                           [Structure.from_atoms(turned, head="sio2")])
    assert feature_error <= 1e-9, feature_error
    assert np.all(np.abs(g_turned - ref) <= bound * (1 + 1e-6) + 1e-15), (np.abs(g_turned - ref), bound)
    np.testing.assert_allclose(g_turned, ref, rtol=1e-6)  # and the bound is tight enough to matter

    order = np.random.default_rng(1).permutation(len(atoms))
    [g_perm] = grades(model, [atoms[order]], electric_fields=field)
    np.testing.assert_allclose(g_perm, ref[order], rtol=1e-10)

    others = [quartz_like(seed=9), sio_molecule(), compressed_quartz(0.9)]
    batch = predict(model, others + [atoms], electric_fields=[np.zeros(3)] * 3 + [field],
                    heads=["sio2", "batio3", "sio2", "sio2"], outputs=["energy"], max_edges=None)
    np.testing.assert_allclose(batch[-1]["extrapolation"], ref, rtol=1e-10)
    assert batch[-1]["extrapolation_max"] == pytest.approx(ref.max(), rel=1e-10)
    # and the field does not enter: the same grades at zero field and at -E
    for other in (np.zeros(3), -field):
        np.testing.assert_allclose(grades(model, [atoms], electric_fields=other)[0], ref, rtol=1e-10)


def test_field_range_is_zero_at_zero_field_linear_in_the_field_and_invariant(default):
    """field_extrapolation = |E| / E_ref: 0 at E = 0, linear in |E|, independent of the field's direction, the
    same after rotating structure and field together, translating, permuting, and alone or in a batch."""
    stats = statistics_of(default)
    quartz = alpha_quartz(cell="pbe", rattle=0.05, seed=2)
    e_ref = stats.field_reference("sio2")
    magnitudes = np.array([0.0, 0.01, 0.05, 0.1, 0.36])
    got = field_ranges(default, [quartz] * len(magnitudes), electric_fields=[[0, 0, m] for m in magnitudes])
    assert got[0] == 0.0
    np.testing.assert_allclose(got, magnitudes / e_ref, rtol=1e-12)
    np.testing.assert_allclose(got[1:] / magnitudes[1:], got[1] / magnitudes[1], rtol=1e-12)  # linear
    direction = np.array([0.3, -0.5, 0.81])
    direction /= np.linalg.norm(direction)
    [along] = field_ranges(default, [quartz], electric_fields=0.1 * direction)
    assert along == pytest.approx(got[3], rel=1e-12)

    rot = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.2], [0.3, 0, -0.7], [-0.2, 0.7, 0]],
                                               dtype=torch.float64)).numpy()
    field = np.array([0.02, -0.05, 0.1])
    turned = quartz.copy()
    turned.set_cell(quartz.cell[:] @ rot.T, scale_atoms=False)
    turned.positions = quartz.positions @ rot.T + np.array([3.1, -2.0, 7.5])
    order = np.random.default_rng(1).permutation(len(quartz))
    alone = field_ranges(default, [quartz], electric_fields=field)[0]
    assert alone > 0
    assert field_ranges(default, [turned], electric_fields=rot @ field)[0] == pytest.approx(alone, rel=1e-12)
    assert field_ranges(default, [quartz[order]], electric_fields=field)[0] == pytest.approx(alone, rel=1e-12)
    batch = predict(default, [sio_molecule(), quartz, compressed_quartz(0.9)], heads=["sio2", "sio2", "batio3"],
                    electric_fields=[[0.2, 0, 0], field, [0, 0, 0]], outputs=["energy"], max_edges=None)
    assert float(batch[1]["field_extrapolation"]) == pytest.approx(alone, rel=1e-12)
    assert float(batch[2]["field_extrapolation"]) == 0.0  # Si has no reference atoms on batio3, but E = 0

    # per head: the most susceptible element present sets it; BaTiO3 reaches 1 below 0.36 V/A, quartz does not
    frame = compressed_quartz(1.0)
    assert field_ranges(default, [frame], electric_fields=[0, 0, 0.36])[0] < THRESHOLD
    bto = ase.Atoms("BaTiO3", cell=[4.0] * 3, pbc=True,  # cubic perovskite; only its elements matter here
                    scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    [r] = predict(default, [bto], heads="batio3", electric_fields=[0.36, 0, 0], outputs=["energy"])
    assert float(r["field_extrapolation"]) == pytest.approx(0.36 / stats.field_reference("batio3"), rel=1e-12)
    assert float(r["field_extrapolation"]) > THRESHOLD
    # an element without reference atoms in the head: +inf at any finite field
    [si_on_bto] = field_ranges(default, [alpha_quartz(cell="pbe")], head="batio3", electric_fields=[0, 0, 0.01])
    assert np.isinf(si_on_bto)


# -------------------------------------------------------------------- native format
def test_lipschitz_bounds_how_far_a_change_of_the_features_moves_the_grade():
    """|grade(x + dx) - grade(x)| <= L ||dx|| for random and adversarial dx, and some dx comes close to it."""
    model = tiny_calibrated()
    stats = statistics_of(model)
    batch = prepare_batch(model, [Structure.from_atoms(quartz_like(rattle=0.2, seed=40), head="sio2")])
    graph = batch.tensors
    x = latent_features(model, graph).double()
    heads = graph["head"][graph["batch"]]
    steepest = stats.lipschitz(model, graph["node_attrs"], heads)
    assert torch.all(torch.isfinite(steepest)) and torch.all(steepest > 0)
    base = stats.grade(model, x, graph["node_attrs"], heads)
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-3, 1e-1):
        for _ in range(20):
            dx = torch.randn(x.shape, generator=generator, dtype=torch.float64) * scale
            moved = stats.grade(model, x + dx, graph["node_attrs"], heads)
            ratio = (moved - base).abs() / (steepest * torch.linalg.vector_norm(dx, dim=1))
            assert float(ratio.max()) <= 1 + 1e-9
    # along the steepest column of an atom's table the bound is reached (the grade's slope there is 1 x L)
    tables, n_elements = stats._tables(model, x.device)  # pylint: disable=protected-access
    species = int(torch.argmax(graph["node_attrs"][0]))
    coefficients = tables[(0, species)][0]
    j = int(torch.linalg.vector_norm(coefficients, dim=0).argmax())
    direction = coefficients[:, j] / torch.linalg.vector_norm(coefficients[:, j])
    sign = torch.sign(x[0] @ coefficients[:, j])
    big = x[0] + 50.0 * sign * direction  # far out along it: that term is the largest
    slope = (stats.grade(model, (big + 1e-3 * sign * direction)[None], graph["node_attrs"][:1], heads[:1])
             - stats.grade(model, big[None], graph["node_attrs"][:1], heads[:1])) / 1e-3
    column = float(torch.linalg.vector_norm(coefficients[:, j])) / (1 + stats.margin)
    assert float(slope) == pytest.approx(column, rel=1e-6)
    assert column <= float(steepest[0]) * (1 + 1e-12)


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


def test_statistics_of_the_earlier_version_are_refused_with_a_recalibrate_message(tmp_path, default):
    """Version-1 statistics (field-coupled features of every layer) are not used: from_payload raises, a checkpoint
    carrying them loads without a grade and says why; macefield-calibrate gives it version-2 statistics again."""
    payload = torch.load(DEFAULT_MODEL, weights_only=True)
    meta = json.loads(payload["extrapolation"]["statistics"])
    assert meta["version"] == STATISTICS_VERSION == 2
    meta["version"] = 1
    payload["extrapolation"]["statistics"] = json.dumps(meta, sort_keys=True)
    with pytest.raises(OutdatedStatistics, match="rerun macefield-calibrate"):
        ExtrapolationStatistics.from_payload(payload["extrapolation"])
    old = tmp_path / "version1.pt"
    torch.save(payload, old)
    model = load_model(old)
    assert statistics_of(model) is None
    assert "version 1" in model.metadata["extrapolation_dropped"]
    assert "macefield-calibrate" in model.metadata["extrapolation_dropped"]
    with pytest.raises(ValueError, match="macefield-calibrate"):
        predict(model, [alpha_quartz(cell="pbe")], heads="sio2", outputs=["field_extrapolation"])
    attach(model, calibrate(model, [alpha_quartz(cell="pbe", rattle=0.05, seed=s) for s in range(4)], "sio2"))
    assert "extrapolation_dropped" not in model.metadata  # recalibrated: the reason is gone
    loaded = load_model(save_model(model, tmp_path / "recalibrated.pt"))
    assert calibrated_heads(loaded) == ["sio2"]


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
    summary = json.loads(first.stdout[first.stdout.index("\n{") + 1:] if not first.stdout.startswith("{")
                         else first.stdout)
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
        assert {"extrapolation", "extrapolation_max", "field_extrapolation"} <= set(info["default"].outputs)
        assert info["default"].units["extrapolation"] == info["default"].units["field_extrapolation"] == "dimensionless"
        stats = statistics_of(default)
        assert [h.field_reference for h in info["default"].heads] == [stats.field_reference(h)
                                                                      for h in ("sio2", "batio3")]
        assert all(h.field_reference == 0 for h in info["plain"].heads)
        assert not any(h.extrapolation for h in info["plain"].heads) and info["plain"].extrapolation_threshold == 0
        assert "extrapolation" not in info["plain"].outputs

        before = metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default", head="sio2")
        inside_before = metric(server.metrics_port, "macefield_extrapolation_grade_bucket", model="default",
                               head="sio2", le="1.0")
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
        assert batch[0].extrapolation_max <= THRESHOLD and list(batch[0].outputs) == [
            "energy", "extrapolation", "extrapolation_max", "field_extrapolation", "volume"]
        assert batch[0].field_extrapolation == 0.0  # zero field
        assert np.isinf(batch[1].extrapolation_max)  # Si has no reference atoms in head batio3
        assert metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default",
                      head="sio2") == before + 2
        assert metric(server.metrics_port, "macefield_extrapolation_grade_bucket", model="default", head="sio2",
                      le="1.0") == inside_before + 1
        assert metric(server.metrics_port, "macefield_extrapolation_grade_count", model="default", head="batio3") >= 1
        fields_before = metric(server.metrics_port, "macefield_field_extrapolation_count", model="default", head="sio2")
        in_field = stub.Predict(request_for(quartz, field=(0, 0, 0.1)), timeout=60)
        assert in_field.field_extrapolation == pytest.approx(0.1 / stats.field_reference("sio2"), rel=1e-9)
        assert metric(server.metrics_port, "macefield_field_extrapolation_count", model="default",
                      head="sio2") == fields_before + 1

        plain = stub.Predict(request_for(quartz, model="plain"), timeout=60)
        assert "extrapolation" not in plain.outputs
        for asked in ("extrapolation", "field_extrapolation"):
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request_for(quartz, model="plain", outputs=["forces", asked]), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details().startswith("outputs: extrapolation")
                    and "macefield-calibrate" in err.value.details())


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
