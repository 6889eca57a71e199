"""The core repulsion: below each pair's inner distance the learned part fades out and universal ZBL fades in.

Small random models in float64: nothing changes where every pair is at or
above its inner distance; a pair far inside it is invisible to the learned
part and repels with exactly the universal ZBL energy; forces are the exact
gradient through the fade; the description survives the native checkpoint
and the cuEquivariance conversion; a checkpoint without it loads as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.data import atomic_numbers as Z

from conftest import quartz_like, random_field_model
from macefield_server.engine.architecture import describe_architecture
from macefield_server.engine.checkpoint import load_model, save_model
from macefield_server.engine.core_repulsion import (COULOMB_EV_A, ZBL_COEFFICIENTS, CoreRepulsion, smooth_switch,
                                                    zbl_energy)
from macefield_server.engine.graph import Structure
from macefield_server.engine.predict import predict

SPEC = {"width": 0.5, "inner": {"Default": {"Si-O": 1.5, "O-O": 2.3, "Si-Si": 2.8}}}


def dimer(distance: float, a: str = "Si", b: str = "O", field=(0.0, 0.0, 0.0)) -> Structure:
    """Two atoms in vacuum ``distance`` A apart along a skew direction (no periodicity)."""
    direction = np.array([0.3, -0.5, 0.81])
    direction /= np.linalg.norm(direction)
    positions = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3] + distance * direction])
    return Structure(numbers=np.array([Z[a], Z[b]]), positions=positions, cell=np.zeros((3, 3)),
                     pbc=np.zeros(3, dtype=bool), electric_field=np.asarray(field, dtype=float))


def with_core(spec=SPEC, **kw):
    model = random_field_model(**kw)
    model.set_core_repulsion(spec)
    return model


def energy(model, structures, outputs=("energy",)):
    return predict(model, structures, outputs=list(outputs))


# ------------------------------------------------------------------------------- the switch and ZBL alone
def test_switch_is_one_above_inner_zero_below_the_width_and_smooth_between():
    inner = torch.tensor([[1.5]], dtype=torch.float64)
    r = torch.linspace(0.5, 2.5, 2001, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
    s = smooth_switch(r, inner.expand_as(r), 0.5)
    (slope,) = torch.autograd.grad(s.sum(), r, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), r)
    r, s, slope, curvature = (t.detach().reshape(-1).numpy() for t in (r, s, slope, curvature))
    assert np.all(s[r >= 1.5] == 1.0) and np.all(s[r <= 1.0] == 0.0)
    assert np.all(np.diff(s) >= 0)  # rises monotonically through the fade
    # value, slope and curvature continuous: autograd's slope and curvature are those of the smoothstep
    # 10x^3 - 15x^4 + 6x^5, which vanish at both ends of the fade (x = 0 and 1), and 0 outside it
    x = np.clip((r - 1.0) / 0.5, 0.0, 1.0)
    np.testing.assert_allclose(slope, 30 * x**2 * (1 - x) ** 2 / 0.5, atol=1e-12)
    np.testing.assert_allclose(curvature, 60 * x * (1 - x) * (1 - 2 * x) / 0.25, atol=1e-9)
    # pairs without an inner distance keep the learned part everywhere
    assert torch.all(smooth_switch(torch.tensor([[0.3]]), torch.tensor([[0.0]]), 0.5) == 1.0)


def test_zbl_is_the_bare_coulomb_repulsion_at_contact_and_screened_beyond():
    assert sum(ZBL_COEFFICIENTS) == pytest.approx(1.0, abs=1e-12)  # phi(0) = 1
    z1, z2 = torch.tensor(14), torch.tensor(8)
    r = torch.tensor([1e-5, 1e-4], dtype=torch.float64)
    bare = COULOMB_EV_A * 14 * 8 / r
    np.testing.assert_allclose((zbl_energy(r, z1, z2) / bare).numpy(), 1.0, atol=2e-3)
    r = torch.linspace(0.2, 3.0, 200, dtype=torch.float64)
    e = zbl_energy(r, z1, z2).numpy()
    assert np.all(np.diff(e) < 0) and np.all(e > 0)
    # screening: far below the bare Coulomb energy at bonding distances (Si-O at 1.6 A: a few eV, not 1000)
    assert 1.0 < float(zbl_energy(torch.tensor(1.6, dtype=torch.float64), z1, z2)) < 20.0
    # symmetric in the two nuclei
    assert float(zbl_energy(r[:1], z1, z2)) == float(zbl_energy(r[:1], z2, z1))


def test_description_is_checked_and_canonical():
    core = CoreRepulsion([8, 14], ["Default"], {"Default": {"O-Si": 1.5, "O-O": 0.0}}, 0.4)
    assert core.spec() == {"width": 0.4, "inner": {"Default": {"Si-O": 1.5}}}
    with pytest.raises(ValueError, match="width"):
        CoreRepulsion([8, 14], ["Default"], {}, 0.0)
    with pytest.raises(ValueError, match="head 'sio2'"):
        CoreRepulsion([8, 14], ["Default"], {"sio2": {"Si-O": 1.5}}, 0.4)
    with pytest.raises(ValueError, match="'Ba-O' has an element"):
        CoreRepulsion([8, 14], ["Default"], {"Default": {"Ba-O": 2.0}}, 0.4)
    with pytest.raises(ValueError, match="'SiO'"):
        CoreRepulsion([8, 14], ["Default"], {"Default": {"SiO": 2.0}}, 0.4)


# ----------------------------------------------------------------------------------------- in the model
def test_nothing_changes_where_every_pair_is_at_or_above_its_inner_distance():
    plain = random_field_model()
    core = with_core({"width": 0.5, "inner": {"Default": {"Si-O": 1.3, "O-O": 2.0, "Si-Si": 2.5}}})
    frames = [Structure.from_atoms(quartz_like(seed=k), electric_field=np.array([0.0, 0.05 * k, 0.1]))
              for k in range(3)]
    outputs = ("energy", "forces", "stress", "dipole", "born_charges", "polarizability")
    for a, b in zip(energy(plain, frames, outputs), energy(core, frames, outputs)):
        for key in outputs:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)  # round-off only


@pytest.mark.parametrize("a, b", [("Si", "O"), ("O", "O"), ("Si", "Si")])
def test_a_pair_inside_the_core_repels_with_exactly_the_universal_zbl_energy(a, b):
    """Two atoms closer than inner - width: the learned part sees no edge, F - F(apart) is the ZBL energy."""
    model = with_core()
    far = float(energy(model, [dimer(6.5, a, b)])[0]["energy"])  # beyond r_max: two free atoms
    inner = SPEC["inner"]["Default"][f"{a}-{b}" if Z[a] >= Z[b] else f"{b}-{a}"]
    for r in (0.3, 0.6, inner - SPEC["width"] - 0.01):
        got = float(energy(model, [dimer(r, a, b)])[0]["energy"]) - far
        zbl = float(zbl_energy(torch.tensor(r, dtype=torch.float64), torch.tensor(Z[a]), torch.tensor(Z[b])))
        assert got == pytest.approx(zbl, rel=1e-10)
    # without the core the learned part gives something else there
    plain = random_field_model()
    free = float(energy(plain, [dimer(6.5, a, b)])[0]["energy"])
    assert float(energy(plain, [dimer(0.6, a, b)])[0]["energy"]) - free != pytest.approx(
        float(energy(model, [dimer(0.6, a, b)])[0]["energy"]) - far, rel=1e-3)


def test_forces_and_born_charges_are_the_exact_gradients_through_the_fade():
    """Finite differences of F and of the dipole across the fade (Si-O from 1.6 to 0.9 A), float64."""
    model = with_core()
    field = np.array([0.03, -0.02, 0.05])
    direction = np.array([0.3, -0.5, 0.81]) / np.linalg.norm([0.3, -0.5, 0.81])
    h = 1e-5
    for r in (1.45, 1.3, 1.2, 1.05):
        s = dimer(r, field=field)
        res = energy(model, [s], ("energy", "forces", "dipole", "born_charges"))[0]
        up, down = dimer(r + h, field=field), dimer(r - h, field=field)
        e_up, e_down = (energy(model, [x], ("energy", "dipole"))[0] for x in (up, down))
        # moving atom 1 along the bond by +-h: dF/dr = -F_1 . direction
        d_f = (float(e_up["energy"]) - float(e_down["energy"])) / (2 * h)
        assert -float(res["forces"][1] @ direction) == pytest.approx(d_f, rel=1e-6, abs=1e-8)
        d_mu = (np.asarray(e_up["dipole"]) - np.asarray(e_down["dipole"])) / (2 * h)
        np.testing.assert_allclose(np.asarray(res["born_charges"])[1] @ direction, d_mu, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.asarray(res["forces"]).sum(axis=0), 0.0, atol=1e-10)


def test_rotation_translation_and_batch_with_a_pair_in_the_fade():
    model = with_core()
    quartz = quartz_like(seed=3)
    quartz.positions[1] = quartz.positions[0] + 1.2 * (quartz.positions[1] - quartz.positions[0]) / np.linalg.norm(
        quartz.positions[1] - quartz.positions[0])  # an Si-O pair (or whatever pair 0-1 is) pulled into the fade
    field = np.array([0.02, 0.05, -0.03])
    s = Structure.from_atoms(quartz, electric_field=field)
    rot = torch.linalg.matrix_exp(torch.tensor([[0, -0.4, 0.3], [0.4, 0, -0.7], [-0.3, 0.7, 0]],
                                               dtype=torch.float64)).numpy()
    rotated = Structure(numbers=s.numbers, positions=s.positions @ rot.T + np.array([0.7, -1.1, 2.3]),
                        cell=s.cell @ rot.T, pbc=s.pbc, electric_field=rot @ field)
    outputs = ("energy", "forces", "dipole", "born_charges")
    alone, turned = energy(model, [s], outputs)[0], energy(model, [rotated], outputs)[0]
    assert float(turned["energy"]) == pytest.approx(float(alone["energy"]), rel=1e-12)
    np.testing.assert_allclose(turned["forces"], alone["forces"] @ rot.T, atol=1e-9)
    np.testing.assert_allclose(turned["born_charges"], np.einsum("ij,njk,lk->nil", rot, alone["born_charges"], rot),
                               atol=1e-9)
    batch = energy(model, [Structure.from_atoms(quartz_like(seed=1)), s], outputs)[1]
    for key in outputs:
        np.testing.assert_allclose(batch[key], alone[key], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ saved, loaded, converted
def test_native_checkpoint_keeps_the_core_and_old_checkpoints_load_without_it(tmp_path):
    model = with_core()
    path = tmp_path / "core.pt"
    save_model(model, path)
    loaded = load_model(path, dtype="float64")
    assert describe_architecture(loaded)["core_repulsion"] == model.core_repulsion.spec()
    probe = [dimer(1.1), dimer(0.5, "O", "O")]
    for a, b in zip(energy(model, probe), energy(loaded, probe)):
        assert float(a["energy"]) == float(b["energy"])
    # a description written before the core existed (no key) means none
    plain = random_field_model()
    arch = describe_architecture(plain)
    assert arch["core_repulsion"] is None
    save_model(plain, tmp_path / "plain.pt")
    assert not hasattr(load_model(tmp_path / "plain.pt"), "core_repulsion")
    # removed again: the description says so
    model.set_core_repulsion(None)
    assert not hasattr(model, "core_repulsion") and describe_architecture(model)["core_repulsion"] is None


def test_cuequivariance_model_keeps_the_core():
    pytest.importorskip("cuequivariance_torch")
    from macefield_server.engine.cueq import to_cueq

    model = with_core()
    converted = to_cueq(model)
    assert converted.core_repulsion.spec() == model.core_repulsion.spec()
    probe = [dimer(1.2), dimer(0.5, "O", "O"), Structure.from_atoms(quartz_like(seed=2))]
    for a, b in zip(energy(model, probe, ("energy", "forces")), energy(converted, probe, ("energy", "forces"))):
        assert float(b["energy"]) == pytest.approx(float(a["energy"]), rel=1e-10)
        np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-9)


def test_a_models_own_pair_repulsion_stays_and_the_core_adds_universal_zbl_to_it():
    """With mace-torch's ZBL term (through the head's scale), a pair inside the core repels with universal ZBL plus
    that term, which the core leaves as trained."""
    from macefield_server.engine.architecture import add_pair_repulsion

    bare, own = with_core(), add_pair_repulsion(with_core())
    for r in (0.5, 0.8):
        zbl = float(zbl_energy(torch.tensor(r, dtype=torch.float64), torch.tensor(14), torch.tensor(8)))
        term = float(energy(own, [dimer(r)])[0]["energy"]) - float(energy(bare, [dimer(r)])[0]["energy"])
        assert term > 1.0  # mace-torch's ZBL (its own screening length, envelope-cut), times the head's scale
        got = float(energy(own, [dimer(r)])[0]["energy"]) - float(energy(own, [dimer(6.5)])[0]["energy"])
        assert got == pytest.approx(zbl + term, rel=1e-10)


def test_each_head_uses_its_own_inner_distances():
    spec = {"width": 0.3, "inner": {"sio2": {"Si-O": 1.6}, "other": {"Si-O": 1.0}}}
    model = random_field_model(heads=("sio2", "other"))
    plain = random_field_model(heads=("sio2", "other"))
    model.set_core_repulsion(spec)
    for head, changed in (("sio2", True), ("other", False)):  # 1.2 A: inside sio2's fade, above other's inner
        s = dimer(1.2)
        s.head = head
        a, b = (float(energy(m, [s])[0]["energy"]) for m in (model, plain))
        assert (a != pytest.approx(b, rel=1e-9)) == changed, head


def test_blocks_whose_messages_the_switch_cannot_silence_are_refused():
    """mace-torch's non-linear block feeds the radial features through an MLP with biases: refused by name."""
    model = random_field_model()
    block = model.interactions[0]
    block.__class__ = type("RealAgnosticResidualNonLinearInteractionBlock", (type(block),), {})
    with pytest.raises(ValueError, match="RealAgnosticResidualNonLinearInteractionBlock"):
        model.set_core_repulsion(SPEC)
    assert not hasattr(model, "core_repulsion")
