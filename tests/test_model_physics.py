"""Physics of the response engine: finite differences, sum rules, symmetries, batching.

All in float64 on small random FieldMACE models with non-zero field weights.
Finite differences are central; each check evaluates all displaced copies in
one batched ``predict`` call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import quartz_like, random_field_model, sio_molecule

from macefield_server.engine import predict

H = 1e-4  # finite-difference step (Angstrom, V/A, strain)
RTOL = 1e-5
FIELD = np.array([0.08, -0.05, 0.11])


def rel_err(fd, ad):
    fd, ad = np.asarray(fd), np.asarray(ad)
    scale = np.abs(ad).max()
    assert scale > 1e-8, "reference derivative is (almost) zero: the check would be vacuous"
    return np.abs(fd - ad).max() / scale


def displaced(atoms, k, j, h):
    a = atoms.copy()
    pos = a.get_positions()
    pos[k, j] += h
    a.set_positions(pos)
    return a


@pytest.fixture(scope="module")
def crystal():
    return quartz_like(seed=1)


@pytest.fixture(scope="module")
def reference(field_model, crystal):
    return predict(field_model, crystal, electric_fields=FIELD, outputs="all")[0]


COORDS = [(0, 0), (1, 2), (4, 1), (8, 0)]  # (atom, direction) pairs probed by finite differences


def position_derivative(model, crystal, name):
    """Central differences (step H, A) of output ``name`` along each coordinate of COORDS, one per coordinate."""
    structures = [displaced(crystal, k, j, s * H) for k, j in COORDS for s in (+1, -1)]
    out = predict(model, structures, electric_fields=FIELD, outputs=[name])
    return [(out[2 * n][name] - out[2 * n + 1][name]) / (2 * H) for n in range(len(COORDS))]


def field_derivative(model, structure, name):
    """Central differences (step H, V/A) of output ``name`` along each field component around FIELD."""
    fields = [FIELD + s * H * np.eye(3)[i] for i in range(3) for s in (+1, -1)]
    out = predict(model, [structure] * 6, electric_fields=fields, outputs=[name])
    return [(out[2 * i][name] - out[2 * i + 1][name]) / (2 * H) for i in range(3)]


def test_forces_are_minus_gradient_of_F(field_model, crystal, reference):
    fd = [-d for d in position_derivative(field_model, crystal, "energy")]
    ad = [reference["forces"][k, j] for k, j in COORDS]
    assert rel_err(fd, ad) < RTOL


def test_dipole_is_minus_field_derivative_of_F(field_model, crystal, reference):
    fd = [-d for d in field_derivative(field_model, crystal, "energy")]
    assert rel_err(fd, reference["dipole"]) < RTOL
    assert np.allclose(reference["polarization"], reference["dipole"] / crystal.get_volume(), rtol=1e-12)


def test_stress_is_strain_derivative_of_F(field_model, crystal, reference):
    structures = []
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]
    for i, j in pairs:
        for s in (+1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += 0.5 * s * H
            eps[j, i] += 0.5 * s * H
            a = crystal.copy()
            a.set_cell(crystal.get_cell() @ (np.eye(3) + eps), scale_atoms=False)
            a.set_positions(crystal.get_positions() @ (np.eye(3) + eps))
            structures.append(a)
    out = predict(field_model, structures, electric_fields=FIELD, outputs=["energy"])
    volume = crystal.get_volume()
    fd = [(out[2 * n]["energy"] - out[2 * n + 1]["energy"]) / (2 * H * volume) for n in range(len(pairs))]
    ad = [reference["stress"][i, j] for i, j in pairs]
    assert rel_err(fd, ad) < RTOL
    assert np.allclose(reference["stress"], reference["stress"].T, atol=1e-14)


def test_born_charges_match_force_field_derivative(field_model, crystal, reference):
    """Z*[k,i,j] = d dipole_i / dR_kj = d f_kj / dE_i (mixed second derivative of F)."""
    fd = np.stack(field_derivative(field_model, crystal, "forces"), axis=1)
    assert fd.shape == reference["born_charges"].shape
    assert rel_err(fd, reference["born_charges"]) < RTOL


def test_born_charges_match_dipole_position_derivative(field_model, crystal, reference):
    fd = position_derivative(field_model, crystal, "dipole")
    ad = [reference["born_charges"][k, :, j] for k, j in COORDS]
    assert rel_err(fd, ad) < RTOL


def test_polarizability_matches_dipole_field_derivative(field_model, crystal, reference):
    fd = np.stack(field_derivative(field_model, crystal, "dipole"), axis=1)
    assert rel_err(fd, reference["polarizability"]) < RTOL


def test_susceptibility_and_quanta(crystal, reference):
    from macefield_client.contract import EPS0

    volume = crystal.get_volume()
    assert abs(EPS0 - 0.0055263494) < 1e-10
    assert np.allclose(reference["chi"], reference["polarizability"] / (volume * EPS0), rtol=1e-12)
    assert np.allclose(reference["eps_inf"], np.eye(3) + reference["chi"], rtol=1e-12)
    assert np.allclose(reference["polarization_quantum"], np.asarray(crystal.get_cell()) / volume)


def test_acoustic_sum_rule_and_symmetric_alpha(reference):
    assert np.abs(reference["born_charges"]).max() > 1e-4
    assert np.abs(reference["born_charges"].sum(axis=0)).max() < 1e-10
    alpha = reference["polarizability"]
    assert np.abs(alpha).max() > 1e-6
    assert np.abs(alpha - alpha.T).max() < 1e-10 * np.abs(alpha).max()


def random_rotation(rng, improper: bool):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if improper else q


@pytest.mark.parametrize("improper", [False, True])
def test_corotating_structure_and_field_rotates_responses(field_model, crystal, reference, improper):
    q = random_rotation(np.random.default_rng(7 + improper), improper)
    rotated = crystal.copy()
    rotated.set_cell(np.asarray(crystal.get_cell()) @ q.T, scale_atoms=False)
    rotated.set_positions(crystal.get_positions() @ q.T)
    r = predict(field_model, rotated, electric_fields=q @ FIELD, outputs="all")[0]
    assert abs(r["energy"] - reference["energy"]) < 1e-10
    assert np.allclose(r["forces"], reference["forces"] @ q.T, atol=1e-10)
    assert np.allclose(r["stress"], q @ reference["stress"] @ q.T, atol=1e-10)
    assert np.allclose(r["dipole"], q @ reference["dipole"], atol=1e-10)
    assert np.allclose(r["polarization"], q @ reference["polarization"], atol=1e-12)
    assert np.allclose(r["born_charges"], q @ reference["born_charges"] @ q.T, atol=1e-10)
    assert np.allclose(r["polarizability"], q @ reference["polarizability"] @ q.T, atol=1e-10)


def test_rotating_only_the_field_changes_the_answer(field_model, crystal, reference):
    """Guards the rotation test against a field that is silently ignored."""
    r = predict(field_model, crystal, electric_fields=-FIELD, outputs="all")[0]
    assert abs(r["energy"] - reference["energy"]) > 1e-8
    assert np.abs(r["dipole"] - reference["dipole"]).max() > 1e-8


def test_translation_invariance(field_model, crystal, reference):
    moved = crystal.copy()
    moved.translate([0.37, -1.21, 2.9])
    r = predict(field_model, moved, electric_fields=FIELD, outputs="all")[0]
    for key in ("energy", "forces", "stress", "dipole", "born_charges", "polarizability"):
        assert np.allclose(r[key], reference[key], atol=1e-10), key


def test_atom_permutation(field_model, crystal, reference):
    perm = np.random.default_rng(3).permutation(len(crystal))
    shuffled = crystal[perm]
    r = predict(field_model, shuffled, electric_fields=FIELD, outputs="all")[0]
    assert abs(r["energy"] - reference["energy"]) < 1e-10
    assert np.allclose(r["forces"], reference["forces"][perm], atol=1e-10)
    assert np.allclose(r["born_charges"], reference["born_charges"][perm], atol=1e-10)
    assert np.allclose(r["dipole"], reference["dipole"], atol=1e-10)
    assert np.allclose(r["polarizability"], reference["polarizability"], atol=1e-10)


def test_structure_alone_equals_structure_in_mixed_batch(two_head_model):
    a = quartz_like(seed=2)
    others = [quartz_like(repeat=(1, 1, 2), seed=4), sio_molecule(), quartz_like(seed=5)[:7]]
    others[2].pbc = False
    alone = predict(two_head_model, a, electric_fields=[0.1, 0.0, -0.2], heads="other", outputs="all")[0]
    mixed = predict(
        two_head_model,
        [others[0], a, others[1], others[2]],
        electric_fields=[[0.0, 0.3, 0.0], [0.1, 0.0, -0.2], [-0.2, 0.1, 0.05], [0.0, 0.0, 0.0]],
        heads=["sio2", "other", "sio2", "other"],
        outputs="all",
    )[1]
    assert alone.keys() == mixed.keys()
    for key in alone:
        assert np.allclose(alone[key], mixed[key], rtol=0, atol=1e-10), key
    # the head really matters, so the batch could have mixed them up
    other_head = predict(two_head_model, a, electric_fields=[0.1, 0.0, -0.2], heads="sio2", outputs="all")[0]
    assert abs(other_head["energy"] - alone["energy"]) > 1e-6


def test_molecule_has_dipole_and_alpha_but_no_volume_quantities(field_model):
    mol = sio_molecule()
    r = predict(field_model, mol, electric_fields=FIELD, outputs="all")[0]
    assert set(r) == {"energy", "forces", "dipole", "born_charges", "polarizability"}
    for value in r.values():
        assert np.all(np.isfinite(value))
    assert np.abs(r["born_charges"].sum(axis=0)).max() < 1e-10
    # dipole of a finite system against finite differences too
    fd = [-d for d in field_derivative(field_model, mol, "energy")]
    assert rel_err(fd, r["dipole"]) < RTOL


def test_slab_is_not_periodic(field_model, crystal):
    slab = crystal.copy()
    slab.pbc = [True, True, False]
    r = predict(field_model, slab, electric_fields=FIELD, outputs="all")[0]
    assert "polarization" not in r and "chi" not in r and "stress" not in r
    assert np.abs(r["born_charges"].sum(axis=0)).max() < 1e-10


def test_only_requested_outputs(field_model, crystal):
    r = predict(field_model, crystal, outputs=["energy"])[0]
    assert set(r) == {"energy", "volume"}
    r = predict(field_model, crystal, outputs=["forces", "dipole"])[0]
    assert set(r) == {"energy", "forces", "dipole", "volume"}
    r = predict(field_model, sio_molecule(), outputs=["energy"])[0]
    assert set(r) == {"energy"}
    with pytest.raises(ValueError, match="outputs"):
        predict(field_model, crystal, outputs=["energy", "magnetism"])


def test_unknown_element_and_head_are_named(field_model, two_head_model, crystal):
    bad = crystal.copy()
    bad.numbers[0] = 26
    with pytest.raises(ValueError, match="atomic_numbers"):
        predict(field_model, bad, outputs="all")
    with pytest.raises(ValueError, match="head"):
        predict(two_head_model, crystal, heads="nope", outputs="all")


def test_float32_agrees_with_float64(crystal):
    m64 = random_field_model(seed=11)
    m32 = random_field_model(seed=11)
    m32 = m32.float()
    r64 = predict(m64, crystal, electric_fields=FIELD, outputs="all")[0]
    r32 = predict(m32, crystal, electric_fields=FIELD, outputs="all")[0]
    assert m32.field_linear[0].weight.dtype.itemsize == 4
    for key in ("forces", "dipole", "born_charges", "polarizability", "stress"):
        scale = np.abs(r64[key]).max()
        assert np.abs(r32[key] - r64[key]).max() < 1e-3 * scale, key


def test_second_order_strategies_agree(two_head_model):
    """The vmapped and the three-pass second-derivative strategies give the same Z* and alpha."""
    from macefield_server.engine import prepare_batch
    from macefield_server.engine.graph import Structure
    from macefield_server.engine.response import respond

    structures = [
        Structure.from_atoms(quartz_like(seed=9), electric_field=[0.1, 0.2, -0.1], head="sio2"),
        Structure.from_atoms(sio_molecule(), electric_field=[0.0, -0.3, 0.1], head="other"),
    ]
    batch = prepare_batch(two_head_model, structures)
    wanted = frozenset({"energy", "born_charges", "polarizability"})
    loop = respond(two_head_model, batch.tensors, None, wanted, second_order="loop")
    vmap = respond(two_head_model, batch.tensors, None, wanted, second_order="vmap")
    for key in ("born_charges", "polarizability"):
        assert torch.allclose(loop[key], vmap[key], rtol=0, atol=1e-12), key
    assert loop["born_charges"].abs().max() > 1e-4
    with pytest.raises(ValueError, match="second_order"):
        respond(two_head_model, batch.tensors, None, wanted, second_order="forward")


def test_predict_splits_large_requests_into_passes_without_changing_numbers(field_model):
    """Edge- and count-limited passes give the same numbers as one pass (order kept)."""
    from macefield_server.engine.predict import _passes
    from macefield_server.engine.graph import neighbour_list, Structure

    atoms = [quartz_like(seed=s, repeat=(1, 1, 1 + s % 2)) for s in range(5)] + [sio_molecule()]
    fields = np.random.default_rng(0).normal(0, 0.1, (len(atoms), 3))
    one = predict(field_model, atoms, electric_fields=fields, max_edges=None, outputs="all")
    graphs = [neighbour_list(Structure.from_atoms(a), float(field_model.r_max)) for a in atoms]
    limit = max(int(g.edge_index.shape[1]) for g in graphs) + 1
    groups = _passes(graphs, None, limit)
    assert len(groups) > 2 and sorted(sum(groups, [])) == list(range(len(atoms)))
    assert all(sum(graphs[i].edge_index.shape[1] for i in grp) <= limit for grp in groups)
    many = predict(field_model, atoms, electric_fields=fields, max_edges=limit, outputs="all")
    counted = predict(field_model, atoms, electric_fields=fields, batch_size=2, max_edges=None, outputs="all")
    for a, b, c in zip(one, many, counted):
        for key in a:
            assert np.allclose(a[key], b[key], rtol=0, atol=1e-10), key
            assert np.allclose(a[key], c[key], rtol=0, atol=1e-10), key


def _slice_backward_nodes(tensor) -> int:
    """Number of SliceBackward0 nodes in the autograd graph behind ``tensor``."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "SliceBackward0"
        stack.extend(f for f, _ in fn.next_functions)
    return count


def test_rewritten_tensor_products_match_e3nn_modules(two_head_model):
    """build_field_mace rewrites e3nn's tensor products (split/concat instead of per-slice
    copies): every output equals the stock TorchScript modules', the state dict is unchanged,
    and the model still deep-copies and pickles."""
    import copy
    import pickle

    from macefield_server.engine import build_field_mace, prepare_batch
    from macefield_server.engine.architecture import describe_architecture
    from macefield_server.engine.graph import Structure
    from macefield_server.engine.response import respond
    from macefield_server.engine.tp_rewrite import rewrite_tensor_products

    stock = build_field_mace(describe_architecture(two_head_model), rewrite_products=False)
    stock.load_state_dict(two_head_model.state_dict(), strict=True)
    assert stock.state_dict().keys() == two_head_model.state_dict().keys()
    assert "_compiled_main_left_right" in stock.interactions[1].conv_tp.__codegen__
    assert "_compiled_main_left_right" not in two_head_model.interactions[1].conv_tp.__codegen__
    assert rewrite_tensor_products(two_head_model) == []  # idempotent

    structures = [
        Structure.from_atoms(quartz_like(seed=4), electric_field=[0.1, -0.2, 0.05], head="sio2"),
        Structure.from_atoms(sio_molecule(), electric_field=[0.3, 0.0, -0.1], head="other"),
    ]
    batch = prepare_batch(two_head_model, structures)
    wanted = frozenset({"energy", "forces", "stress", "dipole", "born_charges", "polarizability"})
    ref = respond(stock, batch.tensors, None, wanted)
    copied = copy.deepcopy(two_head_model)
    unpickled = pickle.loads(pickle.dumps(two_head_model))
    assert unpickled.state_dict().keys() == stock.state_dict().keys()
    for model in (two_head_model, copied, unpickled):
        for strategy in ("loop", "vmap"):
            got = respond(model, batch.tensors, None, wanted, second_order=strategy)
            for key in wanted:
                err = float((got[key] - ref[key]).nan_to_num().abs().max())
                assert torch.allclose(got[key], ref[key], rtol=0, atol=1e-12, equal_nan=True), (key, strategy, err)
    assert ref["born_charges"].abs().max() > 1e-4

    # what the rewrite is for: no per-slice copies left in the edge tensor products
    g = batch.tensors
    def graph_slices(model):
        positions = g["positions"].detach().clone().requires_grad_(True)
        field = g["electric_field"].detach().clone().requires_grad_(True)
        energy, _ = model.enthalpy(g, positions, field)
        return _slice_backward_nodes(energy)
    assert graph_slices(two_head_model) < graph_slices(stock)
