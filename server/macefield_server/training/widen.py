"""Raise a trained model's angular resolution (``max_ell``) without changing the function it computes.

A MACE interaction couples node features with the spherical harmonics of the
edge directions up to ``max_ell``.  A model trained at ``max_ell = 1`` cannot
resolve bond-angle dependence beyond l = 1 in a single message; training a
``max_ell = 2`` model from scratch repeats everything the small one learned.
:func:`widen_max_ell` builds the wider model and fills it so that it computes
exactly the same F(R, E) (hence the same forces, stress, dipole, Z* and alpha)
as the model it came from, to float round-off, and then training continues
from there with the new couplings free to grow:

* every tensor whose shape does not depend on ``max_ell`` (embeddings, skip
  tensor products, field coupling, readouts, ZBL, E0s, scale/shift) is copied;
* the edge tensor product gains paths (for example 0e x 2e -> 2e and
  1o x 1o -> 2e).  The radial weights of the old paths are copied (rescaled by
  the ratio of e3nn's path normalisations), those of the new paths keep their
  random initialisation;
* the linear layer after the tensor product copies the old (path -> output)
  blocks, rescaled by the ratio of the normalisations (the fan-in of an output
  grows with the number of paths that reach it), and starts the blocks of the
  new paths at zero: at the start the messages have no l = 2 components and the
  new paths contribute nothing, while their gradients are not zero (the new
  radial weights are random), so they start learning at the first step;
* each symmetric contraction of the product blocks is a polynomial of the
  message components (now with the l = 2 ones).  Its weights in the new basis
  start from the wider model's random initialisation and are corrected (float64
  least squares, least norm) so that the polynomial restricted to the old
  components is the old polynomial; the residual of that fit is checked to be
  at round-off.  The terms that involve the new components keep their random
  weights: with zero weights there and zero l = 2 messages neither would ever
  receive a gradient.

Only ``max_ell`` changes: hidden irreps, channels, correlation order and the
radial basis stay as they are.
"""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

import mace  # noqa: F401  (before e3nn)
import torch
from e3nn import o3

from ..engine.architecture import build_field_mace, describe_architecture
from ..engine.contraction_basis import order_of, residual_tolerance, symmetric_polynomials, weight_slots
from ..engine.field_mace import FieldMACE

def _tp_paths(tp) -> Dict[Tuple[int, o3.Irrep, o3.Irrep], Tuple[int, slice, float]]:
    """(node irrep index, edge irrep, output irrep) -> (output block, slice of the weights, path weight)."""
    paths = {}
    start = 0
    for ins in tp.instructions:
        size = 1
        for n in ins.path_shape:
            size *= int(n)
        key = (int(ins.i_in1), tp.irreps_in2[ins.i_in2].ir, tp.irreps_out[ins.i_out].ir)
        if key in paths:
            raise ValueError(f"two tensor-product paths {key} in {tp}")
        paths[key] = (int(ins.i_out), slice(start, start + size), float(ins.path_weight))
        start += size
    return paths


def _linear_blocks(linear) -> Dict[Tuple[int, int], Tuple[slice, Tuple[int, int], float]]:
    """(input block, output block) -> (slice of the flat weight, block shape, path weight) of an e3nn Linear."""
    blocks = {}
    start = 0
    for ins in linear.instructions:
        shape = (int(ins.path_shape[0]), int(ins.path_shape[1]))
        blocks[(int(ins.i_in), int(ins.i_out))] = (slice(start, start + shape[0] * shape[1]), shape,
                                                   float(ins.path_weight))
        start += shape[0] * shape[1]
    return blocks


def _widen_interaction(old, new) -> List[str]:
    """Copy an interaction block's ``max_ell``-dependent weights into its wider twin; returns the names done."""
    old_paths, new_paths = _tp_paths(old.conv_tp), _tp_paths(new.conv_tp)
    missing = set(old_paths) - set(new_paths)
    if missing:
        raise ValueError(f"the wider tensor product lacks the paths {sorted(map(str, missing))}")
    last = [name for name, _ in new.conv_tp_weights.named_children()][-1]  # the radial MLP's output layer
    old_radial = getattr(old.conv_tp_weights, last).weight
    new_radial = getattr(new.conv_tp_weights, last).weight
    old_lin, new_lin = _linear_blocks(old.linear), _linear_blocks(new.linear)
    old_out = {ir: i for i, (_, ir) in enumerate(old.linear.irreps_out)}
    new_out = {ir: i for i, (_, ir) in enumerate(new.linear.irreps_out)}
    old_w = old.linear.weight.detach().double()
    w = torch.zeros_like(new.linear.weight, dtype=torch.float64)
    with torch.no_grad():
        radial = new_radial.detach().clone().double()
        for key, (old_block, old_cols, old_pw) in old_paths.items():
            new_block, new_cols, new_pw = new_paths[key]
            radial[:, new_cols] = old_radial.detach().double()[:, old_cols] * (old_pw / new_pw)
            for ir, i_out in old_out.items():
                if (old_block, i_out) not in old_lin:
                    continue
                src, shape, src_pw = old_lin[(old_block, i_out)]
                dst, dst_shape, dst_pw = new_lin[(new_block, new_out[ir])]
                assert shape == dst_shape
                w[dst] = old_w[src] * (src_pw / dst_pw)
        new_radial.copy_(radial.to(new_radial.dtype))
        new.linear.weight.copy_(w.to(new.linear.weight.dtype))
    return [f"conv_tp_weights.{last}.weight", "linear.weight"]


def _feature_index(old_irreps: o3.Irreps, new_irreps: o3.Irreps) -> torch.Tensor:
    """Positions, within one channel of the wider message, of the components of the narrower one."""
    offsets = {}
    start = 0
    for mul, ir in new_irreps:
        offsets[ir] = start
        start += mul * ir.dim
    index: List[int] = []
    for mul, ir in old_irreps:
        if ir not in offsets:
            raise ValueError(f"irrep {ir} of the narrower message is not in the wider one {new_irreps}")
        index.extend(range(offsets[ir], offsets[ir] + mul * ir.dim))
    return torch.as_tensor(index)


def _restrict(u: torch.Tensor, nu: int, index: torch.Tensor) -> torch.Tensor:
    """``u`` with each of its ``nu`` feature axes (just before the basis axis) restricted to ``index``."""
    for axis in range(u.dim() - 1 - nu, u.dim() - 1):
        u = u.index_select(axis, index)
    return u


def _widen_contraction(old, new, index: torch.Tensor, where: str) -> List[str]:
    """Fit the wider contraction's weights to reproduce the old polynomials on the old components."""
    done = []
    for name in weight_slots(new):
        nu = order_of(new, name)
        u_old = getattr(old, f"U_matrix_{nu}")
        u_new = _restrict(getattr(new, f"U_matrix_{nu}"), nu, index.to(u_old.device))
        if u_new.shape[:-1] != u_old.shape[:-1]:
            raise ValueError(f"{where}.{name}: restricted U {tuple(u_new.shape)} does not match {tuple(u_old.shape)}")
        p_old = symmetric_polynomials(u_old, nu)  # (D, n_old)
        p_new = symmetric_polynomials(u_new, nu)  # (D, n_new)
        w_old = old.get_parameter(name).detach().double()  # (elements, n_old, channels)
        param = new.get_parameter(name)
        # start from the wider model's own random weights and correct them (least norm) on the old components:
        # polynomials that involve the new components keep random weights, so that the new message components
        # receive gradients (all-zero weights there and zero l = 2 messages would be a stationary point)
        w_rand = param.detach().double().permute(1, 0, 2).reshape(p_new.shape[1], -1)
        target = torch.einsum("db,ebc->dec", p_old, w_old).reshape(p_old.shape[0], -1)
        fit = w_rand + torch.linalg.lstsq(p_new, target - p_new @ w_rand, driver="gelsd").solution
        residual = float((p_new @ fit - target).abs().max())
        # round-off of the coupling tensors (float32 ones in a float32 checkpoint) times the weights they carry
        scale = float(torch.einsum("db,ebc->dec", p_old.abs(), w_old.abs()).max())
        if residual > residual_tolerance([u_old], max(scale, 1e-30)):  # the fresh U is exact in float64
            raise ValueError(f"{where}.{name}: the wider basis does not reproduce the old polynomials "
                             f"(residual {residual:.1e} of {scale:.1e})")
        with torch.no_grad():
            param.copy_(fit.reshape(p_new.shape[1], w_old.shape[0], w_old.shape[2]).permute(1, 0, 2).to(param.dtype))
        done.append(name)
    return done


def widen_max_ell(model: FieldMACE, max_ell: int, *, seed: int = 0) -> FieldMACE:
    """A copy of ``model`` with edge spherical harmonics up to ``max_ell``, computing the same F(R, E).

    ``seed`` draws the random radial weights of the new tensor-product paths.
    Raises ValueError if ``max_ell`` is below the model's, or if the weights
    cannot be carried over exactly.  Returns ``model`` itself (unchanged) when
    ``max_ell`` equals the model's.
    """
    arch = describe_architecture(model)
    if max_ell < int(arch["max_ell"]):
        raise ValueError(f"max_ell {max_ell} is below the model's {arch['max_ell']}: only raising is exact")
    if max_ell == int(arch["max_ell"]):
        return model
    dtype = next(model.parameters()).dtype
    wide_arch = dict(arch, max_ell=int(max_ell))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    try:
        wide = build_field_mace(wide_arch, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    if hasattr(model, "pair_repulsion_fn") and not hasattr(wide, "pair_repulsion_fn"):
        raise ValueError("the wider model lost the pair repulsion")
    wide = wide.to(next(model.parameters()).device)

    narrow: Any = model  # torch types Module attributes as Tensor | Module
    wider: Any = wide
    handled: Set[str] = set()
    for i, (old, new) in enumerate(zip(narrow.interactions, wider.interactions)):
        handled.update(f"interactions.{i}.{name}" for name in _widen_interaction(old, new))
    for i, (old, new) in enumerate(zip(narrow.products, wider.products)):
        index = _feature_index(
            o3.Irreps([(1, ir) for _, ir in narrow.interactions[i].target_irreps]),
            o3.Irreps([(1, ir) for _, ir in wider.interactions[i].target_irreps]))
        olds = old.symmetric_contractions.contractions
        news = new.symmetric_contractions.contractions
        for c, (old_c, new_c) in enumerate(zip(olds, news)):
            where = f"products.{i}.symmetric_contractions.contractions.{c}"
            handled.update(f"{where}.{name}" for name in _widen_contraction(old_c, new_c, index, where))
            handled.update(f"{where}.U_matrix_{nu}" for nu in range(1, int(new_c.correlation) + 1))

    old_state = model.state_dict()
    wide_state = wide.state_dict()
    copied = {}
    for key, value in wide_state.items():
        if key in handled:
            continue
        if key not in old_state:
            continue  # buffers of the new paths (e3nn's compiled Wigner blocks, masks): the wider model's own
        if old_state[key].shape != value.shape:
            if key.endswith("output_mask"):
                continue
            raise ValueError(f"{key}: shape {tuple(old_state[key].shape)} -> {tuple(value.shape)} not handled")
        copied[key] = old_state[key]
    wide.load_state_dict(copied, strict=False)
    return wide
