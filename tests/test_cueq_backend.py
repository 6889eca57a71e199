"""The cuEquivariance backend equals the e3nn one: F and every derivative up to Z* and alpha.

Runs on CPU through cuequivariance-torch's pure-PyTorch fallback (double
backward included), whenever ``cuequivariance_torch`` is installed (CI
installs it: server[cueq]).  The CUDA kernels are checked by
bench/gpu_suite.py on a GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import grade_round_off, quartz_like, random_field_model, sio_molecule

from macefield_server.engine import (build_field_mace, default_architecture, load_model, predict, prepare_batch,
                                    upgrade_to_field)
from macefield_server.engine.cueq import _transfer, cueq_import_error, model_backend, resolve_backend, to_cueq
from macefield_server.engine.extrapolation import calibrated_heads, statistics_of
from macefield_server.engine.graph import Structure
from macefield_server.engine.response import respond
from macefield_server.serving.registry import load_default_model
from macefield_server.weights import DEFAULT_MODEL as DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(
    cueq_import_error() is not None, reason=f"cuequivariance-torch not usable: {cueq_import_error()}"
)

OUTPUTS = ("energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability")


def mixed_batch():
    """Two heads, three different fields, a crystal, a doubled cell and a molecule."""
    atoms = [quartz_like(seed=1), sio_molecule(), quartz_like(repeat=(1, 1, 2), seed=2)]
    fields = [[0.1, -0.2, 0.3], [0.0, 0.25, -0.1], [0.3, 0.0, 0.05]]
    return atoms, fields


def max_relative_errors(model_a, model_b, heads, outputs=OUTPUTS):
    """Per output: max |a - b| over the batch / max |a| over the batch."""
    atoms, fields = mixed_batch()
    ra = predict(model_a, atoms, electric_fields=fields, heads=heads, outputs=list(outputs))
    rb = predict(model_b, atoms, electric_fields=fields, heads=heads, outputs=list(outputs))
    errors = {}
    for key in outputs:
        a = [np.asarray(r[key]) for r in ra if key in r]
        b = [np.asarray(r[key]) for r in rb if key in r]
        for x, y in zip(a, b):  # a grade is +inf where its head has no statistics for the element: on both
            assert np.array_equal(np.isfinite(x), np.isfinite(y)), key
        a = [x[np.isfinite(x)] for x in a]
        b = [y[np.isfinite(y)] for y in b]
        scale = max(np.abs(x).max() for x in a if x.size)
        assert scale > 1e-6, f"{key} is (almost) zero: the comparison would be vacuous"
        errors[key] = max(np.abs(x - y).max() for x, y in zip(a, b) if x.size) / scale
    return errors


def with_random_field_weights(model, seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.field_linear.parameters()) + list(model.field_feats.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return model


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cueq_equals_e3nn_on_every_output(dtype, tolerance):
    e3nn = random_field_model(heads=("sio2", "other"), seed=3, dtype=dtype)
    cueq = to_cueq(e3nn)
    assert model_backend(cueq) == "cueq" and model_backend(e3nn) == "e3nn"
    assert next(cueq.parameters()).dtype == dtype
    assert cueq.heads == e3nn.heads
    # the field coupling is converted too, not left on e3nn
    assert type(cueq.field_feats[0]).__module__.startswith("cuequivariance_torch")
    errors = max_relative_errors(e3nn, cueq, heads=["sio2", "other", "other"])
    assert max(errors.values()) <= tolerance, errors


def test_cueq_equals_e3nn_for_a_foundation_shaped_model():
    """MACEField-MH-0's layout at small width (L=1 hidden irreps, correlation 3, r_max 6, three
    heads; max_ell 2 instead of 3: cuEquivariance's pure-PyTorch fallback takes a minute to build
    the l=3 contraction) from a checkpoint in cuequivariance's reduced contraction basis, as
    mace-torch writes it when cuequivariance is installed."""
    from mace.modules.models import ScaleShiftMACE

    from macefield_server.engine.architecture import mace_kwargs

    arch = default_architecture([8, 14], heads=["pt_head", "mp-dielectric", "mp-ferroelectric"], channels=4,
                                max_L=1, max_ell=2, correlation=3, r_max=6.0, radial_MLP=(8, 8), mlp_channels=4)
    torch.manual_seed(4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        base = ScaleShiftMACE(**mace_kwargs(arch))  # use_reduced_cg=True: reduced basis (cuequivariance importable)
    finally:
        torch.set_default_dtype(previous)
    u3 = base.products[0].symmetric_contractions.contractions[0].U_matrix_3
    reference_shape = build_field_mace(arch).products[0].symmetric_contractions.contractions[0].U_matrix_3.shape
    assert u3.shape != reference_shape  # really the other basis
    e3nn = with_random_field_weights(upgrade_to_field(base.double().eval()), seed=1)
    cueq = to_cueq(e3nn)
    errors = max_relative_errors(e3nn, cueq, heads=["pt_head", "mp-dielectric", "mp-ferroelectric"])
    assert max(errors.values()) <= 1e-10, errors


def test_float64_conversion_after_a_float32_one_is_exact():
    """cuEquivariance memoises descriptors built from Clebsch-Gordan coefficients at torch's default dtype: a
    float64 model converted after a float32 one must not inherit float32-rounded entries (it did: 3e-9)."""
    to_cueq(random_field_model(heads=("sio2", "other"), seed=3, dtype=torch.float32))
    e3nn = random_field_model(heads=("sio2", "other"), seed=3, dtype=torch.float64)
    errors = max_relative_errors(e3nn, to_cueq(e3nn), heads=["sio2", "other", "other"],
                                 outputs=("energy", "forces", "dipole"))
    assert max(errors.values()) <= 1e-10, errors


def test_cueq_model_keeps_the_extrapolation_grade():
    """The calibrated default model (float32) on cueq: statistics carried over, the same grade as on e3nn."""
    e3nn = load_model(DEFAULT_CHECKPOINT)
    assert next(e3nn.parameters()).dtype == torch.float32 and statistics_of(e3nn) is not None
    cueq = to_cueq(e3nn)
    assert calibrated_heads(cueq) == calibrated_heads(e3nn) == ["sio2", "batio3"]
    assert cueq.metadata == e3nn.metadata
    assert statistics_of(cueq) is not statistics_of(e3nn)  # a copy: the two models never share state
    errors = max_relative_errors(e3nn, cueq, heads=["sio2", "sio2", "sio2"],
                                 outputs=("energy", "extrapolation", "field_extrapolation"))
    assert errors["extrapolation"] <= 1e-4, errors  # float32 features: round-off
    assert errors["field_extrapolation"] <= 1e-12, errors  # |E| times calibrated numbers: no model arithmetic


def test_default_model_served_as_float64_on_cueq():
    """A float32-trained checkpoint loaded as float64 converts (its coupling tensors are float32 numbers:
    the fit allows their round-off) and equals e3nn to that precision on every output and the grade."""
    served = load_default_model(dtype="float64", backend="cueq")
    assert served.backend == "cueq" and served.dtype == torch.float64
    assert served.extrapolation_heads == ["sio2", "batio3"]
    e3nn = load_model(DEFAULT_CHECKPOINT, dtype="float64")
    heads = ["sio2", "sio2", "batio3"]
    errors = max_relative_errors(e3nn, served.model, heads=heads, outputs=OUTPUTS + ("extrapolation",))
    grade_error = errors.pop("extrapolation")
    assert max(errors.values()) <= 1e-8, errors  # measured <= 4e-9: float32 coupling tensors, float64 arithmetic
    # the grade: its features agree to the same round-off, and it moves by at most the statistics' Lipschitz
    # constant times their difference (a grade reads its features through an inverse, which can amplify)
    structures = [Structure.from_atoms(a, head=h) for a, h in zip(mixed_batch()[0], heads)]
    bound, feature_error = grade_round_off(e3nn, served.model, structures, structures)
    # float32 coupling tensors in float64 arithmetic: measured 4e-9 at max_ell 1 and 1.2e-8 at max_ell 2 (more
    # coupling paths); bound: a quarter of float32's epsilon, far below any float32 evaluation's own round-off
    assert feature_error <= 3e-8, feature_error
    a, b = (np.concatenate([r["extrapolation"] for r in predict(m, structures, outputs=["energy"])])
            for m in (e3nn, served.model))
    known = np.isfinite(a)  # +inf on both where the head has no statistics for the element (checked above)
    assert known.sum() > 10 and np.array_equal(known, np.isfinite(bound))
    difference = np.abs(b[known] - a[known])
    assert np.all(difference <= bound[known] * (1 + 1e-6) + 1e-15), (difference.max(), grade_error)


def test_conversion_refuses_a_basis_off_by_more_than_round_off():
    """float32: a contraction whose polynomials are 2e-5 (relative) outside the equivariant space is refused
    (the old tolerance, 1e3 float32 units of the scale, let it through)."""
    model = random_field_model(dtype=torch.float32)
    u = model.products[0].symmetric_contractions.contractions[0].U_matrix_2
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        u.add_(torch.randn(u.shape, generator=generator) * 2e-5 * u.abs().max())
    with pytest.raises(ValueError, match="not representable in cuEquivariance's"):
        to_cueq(model)


@pytest.fixture(scope="module")
def cueq_field_model(field_model):
    return to_cueq(field_model)


def test_conversion_accounts_for_every_buffer(field_model, cueq_field_model):
    """A persistent buffer of the e3nn model that has no place in the cuEquivariance one (data, not an e3nn
    constant) is an error, and so is a buffer of the cuEquivariance model that nothing fills."""
    source = copy.deepcopy(field_model)
    source.interactions[0].register_buffer("extra_scale", torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"e3nn tensors not carried over: \['interactions.0.extra_scale \(buffer\)'\]"):
        _transfer(source, copy.deepcopy(cueq_field_model))
    source = copy.deepcopy(field_model)
    del source.radial_embedding.bessel_fn._buffers["prefactor"]  # a buffer the cuEquivariance model holds
    with pytest.raises(ValueError, match=r"no e3nn counterpart: \['radial_embedding.bessel_fn.prefactor \(buffer\)'\]"):
        _transfer(source, copy.deepcopy(cueq_field_model))


def test_cueq_refuses_vmap_and_keeps_three_pass_default(two_head_model):
    cueq = to_cueq(two_head_model)
    batch = prepare_batch(cueq, [Structure.from_atoms(sio_molecule(), electric_field=[0.1, 0.0, 0.0], head="sio2")])
    wanted = frozenset({"energy", "born_charges", "polarizability"})
    with pytest.raises(ValueError, match="second_order: 'vmap' is not available on the cueq backend"):
        respond(cueq, batch.tensors, None, wanted, second_order="vmap")
    out = respond(cueq, batch.tensors, None, wanted)  # default: loop
    assert torch.isfinite(out["born_charges"]).all() and out["born_charges"].abs().max() > 0


def test_cueq_model_is_not_saved_as_e3nn(tmp_path, cueq_field_model):
    from macefield_server.engine import save_model

    with pytest.raises(ValueError, match="e3nn model"):
        save_model(cueq_field_model, tmp_path / "m.pt")


def test_backend_resolution():
    assert resolve_backend("e3nn", "cpu")[0] == "e3nn"
    assert resolve_backend("auto", "cpu") == ("e3nn", "auto: not on CUDA")
    assert resolve_backend(None, "cpu")[0] == "e3nn"
    backend, reason = resolve_backend("cueq", "cpu")
    assert backend == "cueq" and "fallback" in reason
    with pytest.raises(ValueError, match="backend: expected one of"):
        resolve_backend("jax", "cpu")
