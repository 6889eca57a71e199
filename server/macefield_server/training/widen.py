"""Raise a trained model's angular resolution (``max_ell``) without changing the function it computes.

A MACE interaction couples node features with the spherical harmonics of the
edge directions up to ``max_ell``.  A model trained at ``max_ell = 1`` cannot
resolve bond-angle dependence beyond l = 1 in a single message; training a
``max_ell = 2`` model from scratch repeats everything the small one learned.
:func:`widen_max_ell` builds the wider model and fills it so that it computes
the same F(R, E) (hence the same forces, stress, dipole, Z* and alpha) as the
model it came from, to the precision its coupling tensors carry (measured on the
shipped float32 model: 5e-10 relative evaluated in float64, 6e-7 in float32),
and training continues from there with the new couplings free to grow:

* every tensor whose shape does not depend on ``max_ell`` (embeddings, skip
  tensor products, field coupling, readouts, ZBL, E0s, scale/shift) is copied;
* the edge tensor product gains paths (for example 0e x 2e -> 2e and
  1o x 1o -> 2e).  The radial weights of the old paths are copied (rescaled by
  the ratio of e3nn's path normalisations), those of the new paths keep their
  random initialisation;
* the linear layer after the tensor product copies the old (path -> output)
  blocks, rescaled by the ratio of the normalisations (the fan-in of an output
  grows with the number of paths that reach it), and starts the blocks of the
  new paths at zero: at the start the messages have no components of the new
  irreps (l >= 2) and the new paths contribute nothing;
* each symmetric contraction of the product blocks is a polynomial of the
  message components (now with the new ones).  Its weights in the new basis
  start from the wider model's random initialisation and are corrected (float64
  least squares, least norm) so that the polynomial restricted to the old
  components is the old polynomial; the residual of that fit is checked to be
  at round-off.  The terms that involve the new components keep their random
  weights.

The new paths learn only if some contraction has a term *linear* in a new
message component (its gradient at zero messages); with zero weights there, or
no such term (correlation order 1, or hidden irreps that cannot couple with the
new l), the new paths would sit at a stationary point forever.  The wider model
is checked for such terms (:func:`stationary_paths`): :func:`widen_max_ell`
refuses when no new message irrep of any interaction can ever learn, and warns
naming those that never will or start late (raising 1 -> 3: the l = 3 messages
of the last interaction, whose product block keeps only scalars, start learning
once its l = 2 ones have grown; hidden irreps up to l = 2 at correlation 2: the
last interaction's l = 2 messages never learn).

Only ``max_ell`` changes: hidden irreps, channels, correlation order and the
radial basis stay as they are.  Supported: mace-torch's
``RealAgnosticResidualInteractionBlock`` with e3nn's radial MLP (what
:func:`macefield_server.engine.default_architecture` builds), on any device.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Set, Tuple

import mace  # noqa: F401  (before e3nn)
import torch
from e3nn import o3
from mace.modules.symmetric_contraction import Contraction

from ..engine.architecture import build_field_mace, describe_architecture
from ..engine.contraction_basis import order_of, residual_tolerance, symmetric_polynomials, weight_slots
from ..engine.extrapolation import attach
from ..engine.field_mace import FieldMACE

#: the interaction blocks whose weights are carried over (others raise ValueError)
SUPPORTED_INTERACTIONS = ("RealAgnosticResidualInteractionBlock",)


def _tp_paths(tp: Any) -> Dict[Tuple[int, o3.Irrep, o3.Irrep], Tuple[int, slice, float]]:
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


def _linear_blocks(linear: Any) -> Dict[Tuple[int, int], Tuple[slice, Tuple[int, int], float]]:
    """(input block, output block) -> (slice of the flat weight, block shape, path weight) of an e3nn Linear."""
    blocks = {}
    start = 0
    for ins in linear.instructions:
        shape = (int(ins.path_shape[0]), int(ins.path_shape[1]))
        blocks[(int(ins.i_in), int(ins.i_out))] = (slice(start, start + shape[0] * shape[1]), shape,
                                                   float(ins.path_weight))
        start += shape[0] * shape[1]
    return blocks


def _widen_interaction(old: Any, new: Any) -> List[str]:
    """Copy an interaction block's ``max_ell``-dependent weights into its wider twin; returns the names done."""
    old_paths, new_paths = _tp_paths(old.conv_tp), _tp_paths(new.conv_tp)
    missing = set(old_paths) - set(new_paths)
    if missing:
        raise ValueError(f"the wider tensor product lacks the paths {sorted(map(str, missing))}")
    last = [name for name, _ in new.conv_tp_weights.named_children()][-1]  # the radial MLP's output layer
    old_radial = getattr(old.conv_tp_weights, last).weight
    new_radial = getattr(new.conv_tp_weights, last).weight
    old_lin, new_lin = _linear_blocks(old.linear), _linear_blocks(new.linear)
    new_out = {ir: i for i, (_, ir) in enumerate(new.linear.irreps_out)}
    old_w = old.linear.weight.detach().double()
    w = torch.zeros_like(new.linear.weight, dtype=torch.float64)
    radial = new_radial.detach().clone().double()
    for (node, edge, out), (old_block, old_cols, old_pw) in old_paths.items():
        new_block, new_cols, new_pw = new_paths[(node, edge, out)]
        radial[:, new_cols] = old_radial.detach().double()[:, old_cols] * (old_pw / new_pw)
        for (i_in, i_out), (src, shape, src_pw) in old_lin.items():
            if i_in != old_block:
                continue
            dst, dst_shape, dst_pw = new_lin[(new_block, new_out[old.linear.irreps_out[i_out].ir])]
            if shape != dst_shape:
                raise ValueError(f"linear block {shape} -> {dst_shape}: the channels changed")
            w[dst] = old_w[src] * (src_pw / dst_pw)
    with torch.no_grad():
        new_radial.copy_(radial.to(new_radial.dtype))
        new.linear.weight.copy_(w.to(new.linear.weight.dtype))
    return [f"conv_tp_weights.{last}.weight", "linear.weight"]


def _component_ranges(irreps: o3.Irreps) -> List[Tuple[o3.Irrep, range]]:
    """(irrep, positions of its components) for each entry of ``irreps``, within one channel."""
    out, start = [], 0
    for mul, ir in irreps:
        out.append((ir, range(start, start + mul * ir.dim)))
        start += mul * ir.dim
    return out


def _feature_index(old_irreps: o3.Irreps, new_irreps: o3.Irreps) -> torch.Tensor:
    """Positions, within one channel of the wider message, of the components of the narrower one."""
    ranges = dict(_component_ranges(new_irreps))
    index: List[int] = []
    for mul, ir in old_irreps:
        if ir not in ranges:
            raise ValueError(f"irrep {ir} of the narrower message is not in the wider one {new_irreps}")
        index.extend(range(ranges[ir].start, ranges[ir].start + mul * ir.dim))
    return torch.as_tensor(index)


def _restrict(u: torch.Tensor, nu: int, index: torch.Tensor) -> torch.Tensor:
    """``u`` with each of its ``nu`` feature axes (just before the basis axis) restricted to ``index``."""
    for axis in range(u.dim() - 1 - nu, u.dim() - 1):
        u = u.index_select(axis, index.to(u.device))
    return u


def _largest(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _widen_contraction(old: Contraction, new: Contraction, index: torch.Tensor, where: str) -> List[str]:
    """Fit the wider contraction's weights to reproduce the old polynomials on the old components."""
    done = []
    for name in weight_slots(new):
        nu = order_of(new, name)
        u_old = getattr(old, f"U_matrix_{nu}")
        u_new = _restrict(getattr(new, f"U_matrix_{nu}"), nu, index)
        if u_new.shape[:-1] != u_old.shape[:-1]:
            raise ValueError(f"{where}.{name}: restricted U {tuple(u_new.shape)} does not match {tuple(u_old.shape)}")
        p_old = symmetric_polynomials(u_old, nu)  # (D, n_old), float64 on the CPU
        p_new = symmetric_polynomials(u_new, nu)  # (D, n_new)
        w_old = old.get_parameter(name).detach().to("cpu", torch.float64)  # (elements, n_old, channels)
        param = new.get_parameter(name)
        # start from the wider model's own random weights and correct them (least norm) on the old components:
        # the terms that involve the new components keep their random weights
        w_rand = param.detach().to("cpu", torch.float64).permute(1, 0, 2).reshape(p_new.shape[1], -1)
        target = torch.einsum("db,ebc->dec", p_old, w_old).reshape(p_old.shape[0], -1)
        fit = w_rand + torch.linalg.lstsq(p_new, target - p_new @ w_rand, driver="gelsd").solution
        residual = float((p_new @ fit - target).abs().max()) if target.numel() else 0.0
        # round-off of the coupling tensors times the largest weights they carry, old and new
        scale = max(_largest(p_old.abs() @ w_old.abs().permute(1, 0, 2).reshape(p_old.shape[1], -1)),
                    _largest(p_new.abs() @ w_rand.abs()), _largest(p_new.abs() @ fit.abs()),
                    torch.finfo(torch.float64).tiny)
        # the coarser of the two precisions (a float32 checkpoint's U holds float32 numbers, a fresh one float64)
        if residual > max(residual_tolerance([u_old], scale), residual_tolerance([u_new], scale)):
            raise ValueError(f"{where}.{name}: the wider basis does not reproduce the old polynomials "
                             f"(residual {residual:.1e} of {scale:.1e})")
        with torch.no_grad():
            shaped = fit.reshape(p_new.shape[1], w_old.shape[0], w_old.shape[2]).permute(1, 0, 2)
            param.copy_(shaped.to(param.device, param.dtype))
        done.append(name)
    return done


def _linear_terms(contraction: Contraction, coupling: o3.Irreps, ir: o3.Irrep, old: Set[o3.Irrep]) -> float:
    """Largest weighted coefficient of the contraction's terms linear in the ``ir`` components, ``old`` otherwise."""
    dims = _component_ranges(coupling)
    new = torch.as_tensor([i for irrep, r in dims if irrep == ir for i in r], dtype=torch.long)
    others = torch.as_tensor([i for irrep, r in dims if irrep in old for i in r], dtype=torch.long)
    largest = 0.0
    for name in weight_slots(contraction):
        nu = order_of(contraction, name)
        u = getattr(contraction, f"U_matrix_{nu}").detach().to("cpu", torch.float64)
        axes = list(range(u.dim() - 1 - nu, u.dim() - 1))
        # symmetric in its feature axes: one of them on the new components, the rest on the old ones
        part = u.index_select(axes[0], new)
        for axis in axes[1:]:
            part = part.index_select(axis, others)
        w = contraction.get_parameter(name).detach().to("cpu", torch.float64)  # (elements, basis, channels)
        if part.numel():
            largest = max(largest, float(torch.einsum("...b,ebc->...ec", part, w).abs().max()))
    return largest


def stationary_paths(wide: Any, narrow: Any) -> Tuple[List[str], List[str], List[str]]:
    """New message irreps of the widened model, as ``interactions.i: irrep``: (all, late, never).

    The messages of interaction i feed product block i only, and at the start
    their new components are zero.  A new irrep gets a gradient when a term of
    that block is linear in it with its other factors nonzero: at the start if
    they are old components (otherwise it is *late*: it starts once the new
    irreps it couples with have grown), *never* if no such term exists.
    """
    new_all, late, never = [], [], []
    for i, (product, old_interaction) in enumerate(zip(wide.products, narrow.interactions)):
        contractions = product.symmetric_contractions.contractions
        coupling = o3.Irreps(contractions[0].coupling_irreps)
        old = {ir for _, ir in old_interaction.target_irreps}
        new = sorted({ir for _, ir in coupling} - old, key=lambda ir: (ir.l, ir.p))
        # in rounds: the first round's irreps learn at once, the later rounds' once those they couple with grew
        live, first = set(old), None
        while True:
            grown = {ir for ir in new
                     if ir not in live and max(_linear_terms(c, coupling, ir, live) for c in contractions) > 0.0}
            first = grown if first is None else first
            if not grown:
                break
            live |= grown
        for ir in new:
            name = f"interactions.{i}: {ir}"
            new_all.append(name)
            if ir not in live:
                never.append(name)
            elif ir not in first:
                late.append(name)
    return new_all, late, never


def widen_max_ell(model: FieldMACE, max_ell: int, *, seed: int = 0) -> FieldMACE:
    """A copy of ``model`` (eval mode) with edge spherical harmonics up to ``max_ell``, computing the same F(R, E).

    ``seed`` draws the random radial and contraction weights of the new terms
    (the global random state is left as it was).  The copy keeps ``metadata``
    (with a ``widened_from_max_ell`` entry) but no extrapolation statistics:
    calibrate the trained result.  Raises ValueError if ``max_ell`` is below
    the model's, for an unsupported interaction block, if the weights cannot
    be carried over exactly, or if none of the new paths could ever learn;
    warns (UserWarning) naming new irreps that start without a gradient.
    Returns ``model`` itself (unchanged) when ``max_ell`` equals the model's.
    """
    arch = describe_architecture(model)
    if max_ell < int(arch["max_ell"]):
        raise ValueError(f"max_ell {max_ell} is below the model's {arch['max_ell']}: only raising is exact")
    if max_ell == int(arch["max_ell"]):
        return model
    for key in ("interaction_cls", "interaction_cls_first"):
        if arch[key] not in SUPPORTED_INTERACTIONS:
            raise ValueError(f"{key} {arch[key]}: widening supports {list(SUPPORTED_INTERACTIONS)} only")
    parameter = next(model.parameters())
    wide_arch = dict(arch, max_ell=int(max_ell))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        wide = build_field_mace(wide_arch, dtype=parameter.dtype).to(parameter.device)
    narrow: Any = model  # torch types Module attributes as Tensor | Module
    wider: Any = wide
    handled: Set[str] = set()
    for i, (old, new) in enumerate(zip(narrow.interactions, wider.interactions)):
        handled.update(f"interactions.{i}.{name}" for name in _widen_interaction(old, new))
    for i, (old, new) in enumerate(zip(narrow.products, wider.products)):
        index = _feature_index(o3.Irreps(old.symmetric_contractions.contractions[0].coupling_irreps),
                               o3.Irreps(new.symmetric_contractions.contractions[0].coupling_irreps))
        olds = old.symmetric_contractions.contractions
        news = new.symmetric_contractions.contractions
        for c, (old_c, new_c) in enumerate(zip(olds, news)):
            where = f"products.{i}.symmetric_contractions.contractions.{c}"
            handled.update(f"{where}.{name}" for name in _widen_contraction(old_c, new_c, index, where))
            handled.update(f"{where}.U_matrix_{nu}" for nu in range(1, int(new_c.correlation) + 1))
            handled.update(f"{where}.{flag}" for flag in weight_slots(new_c).values())  # the wider model's own

    old_state = model.state_dict()
    wide_state = wide.state_dict()
    copied = {}
    for key, value in wide_state.items():
        if key in handled:
            continue
        if key not in old_state or old_state[key].shape != value.shape:
            # only e3nn's structural buffers of the new paths (Wigner blocks, output masks) may be new
            if key.rsplit(".", 1)[-1].startswith("_w3j_") or key.endswith("output_mask"):
                continue
            was = tuple(old_state[key].shape) if key in old_state else "absent"
            raise ValueError(f"{key}: {was} -> {tuple(value.shape)} in the wider model, not handled")
        copied[key] = old_state[key]
    dropped = sorted(set(old_state) - set(wide_state))
    if dropped:
        raise ValueError(f"tensors of the model have no place in the wider one: {dropped[:6]}")
    wide.load_state_dict(copied, strict=False)
    attach(wide, None)

    new_paths, late, never = stationary_paths(wider, narrow)
    if new_paths and never == new_paths:
        raise ValueError(f"no product block reads the new message irreps ({', '.join(new_paths)}) linearly: "
                         "their paths would never receive a gradient (raise the correlation order)")
    if never:
        warnings.warn(f"the new message irreps {never} never receive a gradient (no term of their product "
                      "block is linear in them): their paths stay silent", stacklevel=2)
    if late:
        warnings.warn(f"the new message irreps {late} start without a gradient; they learn once the new "
                      "irreps they couple with have grown", stacklevel=2)
    wider.metadata = dict(getattr(model, "metadata", None) or {}, widened_from_max_ell=int(arch["max_ell"]))
    return wide.eval()
