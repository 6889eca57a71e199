"""Training losses and label conversion: folded polarization, Huber, unit mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import alpha_quartz
from macefield_client.labels import EPS0
from macefield_server.training import fold_dipole, folded_polarization_residual, huber
from macefield_server.training.config import KeySpec
from macefield_server.training.data import convert_label, split_indices
from macefield_server.training.losses import total_loss


def random_cell(rng):
    # skewed, non-orthogonal but well-conditioned cell (rows are lattice vectors)
    return np.diag(rng.uniform(4.0, 12.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.lists(st.integers(-3, 3), min_size=3, max_size=3))
def test_folded_polarization_loss_is_zero_for_whole_quanta(seed, n):
    rng = np.random.default_rng(seed)
    cell = torch.as_tensor(random_cell(rng))[None]
    volume = torch.linalg.det(cell).abs()
    ref = torch.as_tensor(rng.normal(0.0, 3.0, (1, 3)))
    pred = ref + torch.as_tensor(np.asarray(n, float))[None] @ cell[0]  # whole quanta e*a_k apart
    res = folded_polarization_residual(pred, ref, cell, volume)
    assert torch.allclose(res, torch.zeros_like(res), atol=1e-12)
    assert float(huber(res / 1e-3, 0.1)) < 1e-15


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.lists(st.integers(-3, 3), min_size=3, max_size=3),
    frac=st.lists(st.floats(-0.45, 0.45), min_size=3, max_size=3).filter(lambda f: max(abs(x) for x in f) > 0.01),
)
def test_folded_polarization_loss_is_nonzero_otherwise(seed, n, frac):
    rng = np.random.default_rng(seed)
    cell = torch.as_tensor(random_cell(rng))[None]
    volume = torch.linalg.det(cell).abs()
    ref = torch.as_tensor(rng.normal(0.0, 3.0, (1, 3)))
    offset = torch.as_tensor(np.asarray(frac))[None] @ cell[0]  # a fraction of a quantum
    pred = ref + offset + torch.as_tensor(np.asarray(n, float))[None] @ cell[0]
    res = folded_polarization_residual(pred, ref, cell, volume)
    # the folded residual is exactly the sub-quantum part, in e/A^2
    assert torch.allclose(res, offset / volume, atol=1e-10)
    assert float(huber(res / 1e-3, 0.1)) > 0.0


def test_fold_gradient_is_that_of_the_nearest_branch():
    cell = torch.diag(torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64))[None]
    pred = torch.tensor([[5.0 * 2 + 0.3, -6.0 + 0.1, 0.2]], dtype=torch.float64, requires_grad=True)
    folded = fold_dipole(pred - torch.zeros(1, 3, dtype=torch.float64), cell)
    assert torch.allclose(folded, torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64))
    (folded**2).sum().backward()
    assert torch.allclose(pred.grad, 2 * folded.detach())


def test_total_loss_weights_and_scales():
    res = {"forces": torch.full((4, 3), 0.2), "energy": torch.zeros(2)}
    loss, terms = total_loss(res, {"forces": 2.0, "energy": 1.0}, {"forces": 0.1, "energy": 1.0}, delta=1.0)
    # residual/scale = 2 > delta: Huber = delta * (|r| - delta/2) = 1.5
    assert terms["forces"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        total_loss(res, {"forces": 0.0, "energy": 0.0}, {"forces": 1.0, "energy": 1.0}, delta=1.0)


def test_label_conversions():
    atoms = alpha_quartz()
    volume = atoms.get_volume()
    voigt = [1, 2, 3, 4, 5, 6]  # xx yy zz yz xz xy
    s = convert_label("stress", KeySpec("s"), voigt, atoms)
    assert np.allclose(s, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    assert np.allclose(convert_label("stress", KeySpec("s", "pressure_positive"), voigt, atoms), -s)
    p = convert_label("polarization", KeySpec("P", "P"), "0.1 0.2 0.3", atoms)
    assert np.allclose(p, np.array([0.1, 0.2, 0.3]) * volume)
    a = convert_label("polarizability", KeySpec("a", "per_volume"), np.eye(3).reshape(-1), atoms)
    assert np.allclose(a, np.eye(3) * volume)
    chi = convert_label("polarizability", KeySpec("a", "chi"), np.eye(3).reshape(-1), atoms)
    eps = convert_label("polarizability", KeySpec("a", "eps_inf"), 2 * np.eye(3).reshape(-1), atoms)
    assert np.allclose(chi, np.eye(3) * volume * EPS0) and np.allclose(eps, chi)  # eps_inf = 1 + chi
    z = convert_label("born_charges", KeySpec("z"), np.arange(81.0).reshape(9, 9), atoms)
    assert z.shape == (9, 3, 3) and z[1, 0, 2] == 11.0  # row-major Z*[i][j]
    with pytest.raises(ValueError):
        convert_label("polarizability", KeySpec("a", "per_atom"), np.eye(3), atoms)


def test_contiguous_splits():
    assert split_indices(10, (0.0, 0.8)) == list(range(8))
    assert split_indices(10, (0.8, 1.0)) == [8, 9]
    assert split_indices(161, (0.0, 0.8))[-1] + 1 == split_indices(161, (0.8, 1.0))[0]
    assert split_indices(100, (0.0, 1.0), max_frames=3) == [0, 50, 99]
