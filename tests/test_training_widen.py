"""Raising max_ell of a trained model keeps its function exactly, and the new paths can learn."""

from __future__ import annotations

import warnings

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch

from macefield_client.data.structures import alpha_quartz, perovskite_batio3, sio_molecule
from macefield_server.engine.architecture import build_field_mace, default_architecture, describe_architecture
from macefield_server.engine.checkpoint import load_model, save_model
from macefield_server.engine.predict import predict, prepare_batch
from macefield_server.engine.response import respond
from macefield_server.engine.graph import Structure
from macefield_server.training.config import ConfigError, config_from_dict
from macefield_server.training.widen import stationary_paths, widen_max_ell
from macefield_server.weights import DEFAULT_MODEL

OUTPUTS = ("energy", "forces", "stress", "dipole", "born_charges", "polarizability")


def parity(degree: int) -> str:
    """The parity letter of the edge spherical harmonics of degree ``degree``."""
    return "e" if degree % 2 == 0 else "o"


@pytest.fixture(scope="module")
def shipped():
    """The embedded default model in float64, its max_ell, and its widening by one degree."""
    narrow = load_model(DEFAULT_MODEL, dtype=torch.float64).eval()
    ell = int(describe_architecture(narrow)["max_ell"])
    return narrow, widen_max_ell(narrow, ell + 1, seed=3).eval(), ell


def cases():
    quartz = alpha_quartz(rattle=0.05, seed=2)
    batio3 = perovskite_batio3()
    batio3.positions[1] += (0.03, -0.02, 0.08)  # Ti off centre: nonzero forces and dipole
    return [(quartz, "sio2"), (batio3, "batio3"), (sio_molecule(), "sio2")]


def relative(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.mark.parametrize("field", [(0.0, 0.0, 0.0), (0.05, -0.1, 0.2)])
def test_the_wider_default_model_computes_the_same_function(shipped, field):
    narrow, wide, ell = shipped
    assert describe_architecture(wide)["max_ell"] == ell + 1
    for atoms, head in cases():
        outputs = OUTPUTS if atoms.pbc.any() else ("energy", "forces", "dipole", "polarizability")
        a = predict(narrow, atoms, heads=head, electric_fields=np.array(field), outputs=outputs)[0]
        b = predict(wide, atoms, heads=head, electric_fields=np.array(field), outputs=outputs)[0]
        for key in outputs:
            # float64 evaluation; the shipped coupling tensors are float32 numbers, fitted exactly to 1e-9
            assert relative(a[key], b[key]) < 1e-8, (head, key, relative(a[key], b[key]))
        assert np.abs(b["forces"]).max() > 1e-3  # a real test: the structures are not at rest


def test_the_new_paths_start_silent_and_receive_gradients(shipped):
    narrow, wide, ell = shipped
    new = f"{ell + 1}{parity(ell + 1)}"
    assert stationary_paths(wide, narrow) == ([f"interactions.0: {new}", f"interactions.1: {new}"], [], [])
    atoms, head = cases()[0]
    # in each interaction, the blocks of the linear layer fed by the new (l = ell + 1) tensor-product paths are
    # zero ...
    new_slices = {}
    for i, interaction in enumerate(wide.interactions):
        tp, linear = interaction.conv_tp, interaction.linear
        new_blocks = [ins.i_out for ins in tp.instructions
                      if tp.irreps_in2[ins.i_in2].ir.l == ell + 1 or tp.irreps_out[ins.i_out].ir.l == ell + 1]
        start = 0
        for ins in linear.instructions:
            size = ins.path_shape[0] * ins.path_shape[1]
            if ins.i_in in new_blocks:
                new_slices[(i, ins.i_in)] = slice(start, start + size)
            start += size
        assert new_blocks
    # from max_ell 2 to 3: interaction 0: 0e x 3o -> 3o; interaction 1: 0e x 3o -> 3o, 1o x 2e -> 3o, 1o x 3o -> 2e
    assert {i for i, _ in new_slices} == {0, 1}
    for (i, _), s in new_slices.items():
        assert float(wide.interactions[i].linear.weight.detach()[s].abs().max()) == 0.0
    # ... and a force loss pulls on every one of them from the first step (also on the new messages, which
    # only the new polynomial terms of the product blocks read)
    batch = prepare_batch(wide, [Structure.from_atoms(atoms, head=head)])
    out = respond(wide, batch.tensors, None, frozenset({"energy", "forces"}), keep_graph=True)
    (out["forces"] ** 2).sum().backward()
    grads = {key: float(wide.interactions[key[0]].linear.weight.grad[s].abs().max()) for key, s in new_slices.items()}
    wide.zero_grad()
    assert min(grads.values()) > 0.0, grads


def test_round_trip_and_refusals(shipped, tmp_path):
    narrow, wide, ell = shipped
    path = save_model(wide, tmp_path / "wide.pt")
    again = load_model(path, dtype=torch.float64).eval()
    atoms, head = cases()[1]
    a = predict(wide, atoms, heads=head, electric_fields=np.array([0.0, 0.0, 0.1]), outputs=OUTPUTS)[0]
    b = predict(again, atoms, heads=head, electric_fields=np.array([0.0, 0.0, 0.1]), outputs=OUTPUTS)[0]
    for key in OUTPUTS:
        assert np.array_equal(a[key], b[key]), key
    assert widen_max_ell(wide, ell + 1) is wide
    with pytest.raises(ValueError, match="below the model's"):
        widen_max_ell(wide, ell)


def random_model(max_L: int = 1, correlation: int = 3, dtype=torch.float64):
    """A small random two-head model with every weight nonzero (the field coupling starts at zero otherwise)."""
    arch = default_architecture([8, 14], heads=["a", "b"], channels=8, max_L=max_L, max_ell=1,
                                correlation=correlation, radial_MLP=[16], mlp_channels=4, avg_num_neighbors=10.0)
    torch.manual_seed(0)
    model = build_field_mace(arch, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("max_L, correlation, max_ell, late, never", [
    (1, 3, 3, ["interactions.1: 3o"], []),  # the last block reads 3o only with 2e (3o x 2e x 1o -> 0e)
    (2, 2, 2, [], ["interactions.1: 2e"]),  # the last block, quadratic and scalar: 2e x 2e only
    (2, 3, 2, [], []),
])
def test_widening_random_models_is_exact(max_L, correlation, max_ell, late, never):
    """Other hidden irreps, correlation orders and a jump by two (1 -> 3); both heads, at a finite field."""
    narrow = random_model(max_L, correlation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wide = widen_max_ell(narrow, max_ell, seed=1)
    _, late_found, never_found = stationary_paths(wide, narrow)
    assert (late_found, never_found) == (late, never)
    messages = " ".join(str(w.message) for w in caught)
    assert all(name in messages for name in late + never)
    atoms = alpha_quartz(rattle=0.1, seed=4)
    field = np.array([0.1, 0.0, -0.05])
    for head in ("a", "b"):
        a = predict(narrow, atoms, heads=head, electric_fields=field, outputs=OUTPUTS)[0]
        b = predict(wide, atoms, heads=head, electric_fields=field, outputs=OUTPUTS)[0]
        assert np.abs(a["dipole"]).max() > 1e-4
        for key in OUTPUTS:
            assert relative(a[key], b[key]) < 1e-10, (key, relative(a[key], b[key]))


def test_float32_models_keep_their_function_to_float32_round_off():
    narrow = load_model(DEFAULT_MODEL, dtype=torch.float32).eval()
    wide = widen_max_ell(narrow, int(describe_architecture(narrow)["max_ell"]) + 1, seed=3)
    assert next(wide.parameters()).dtype == torch.float32
    for atoms, head in cases()[:2]:
        a = predict(narrow, atoms, heads=head, electric_fields=np.array([0.0, 0.05, 0.1]), outputs=OUTPUTS)[0]
        b = predict(wide, atoms, heads=head, electric_fields=np.array([0.0, 0.05, 0.1]), outputs=OUTPUTS)[0]
        for key in OUTPUTS:
            assert relative(a[key], b[key]) < 5e-6, (head, key, relative(a[key], b[key]))


def test_widening_that_could_never_learn_is_refused():
    """Invariant hidden features and correlation 2: no term of a product block is linear in an l = 2 message."""
    with pytest.raises(ValueError, match="never receive a gradient"):
        widen_max_ell(random_model(max_L=0, correlation=2), 2)


def test_the_config_asks_for_a_model_to_widen():
    data = {"model": {"widen_max_ell": 2}, "datasets": [{"name": "d", "path": "d.xyz", "head": "h"}]}
    with pytest.raises(ConfigError, match="widen_max_ell: needs model.init_from"):
        config_from_dict(data)
    data["model"].update(init_from="model.pt", widen_max_ell=-1)
    with pytest.raises(ConfigError, match="widen_max_ell"):
        config_from_dict(data)
    data["model"]["widen_max_ell"] = 2
    assert config_from_dict(data).model.widen_max_ell == 2
