"""The basis of MACE's symmetric contractions: stored data, not a property of the environment.

A MACE product block contracts node features with coupling tensors
``U_matrix_nu`` (one per correlation order nu) and learnable weights whose
second dimension counts the basis vectors of U.  mace-torch 0.3.16 builds U
in one of two bases:

* the **original** MACE basis (``_wigner_nj``; some basis vectors are
  linearly dependent), used when ``cuequivariance`` is not importable, or
  when a model is created with ``use_reduced_cg=False``;
* the **reduced** basis of cuequivariance
  (``cue.reduced_symmetric_tensor_product_basis``), used as soon as
  ``cuequivariance`` is importable and ``use_reduced_cg=True`` (mace-torch's
  default).

The same description therefore builds tensors of different shapes depending
on what happens to be installed, and a checkpoint written in one environment
fails to load in the other (``size mismatch ... U_matrix_3``).  This project
makes the choice explicit:

* a fresh e3nn FieldMACE is always built in the original basis (it needs no
  optional package, so every environment builds the same model);
* when a state dict is loaded, each contraction adopts the basis the file
  holds (:func:`adopt_stored_basis`, installed as a load pre-hook by
  :func:`install_basis_hooks`): U matrices and weights are taken with the
  stored shapes.  The contraction code (opt_einsum graphs) is independent of
  the number of basis vectors, so a reduced-basis checkpoint evaluates the
  same function in every environment, with or without cuequivariance.

A stored basis is adopted only if it is another basis of the *same*
polynomials (:func:`check_stored_basis`, else :class:`.CheckpointError`):
only the basis axis may differ (the last axis of ``U_matrix_nu``, axis 1 of
its weights), every weight tensor must have as many basis vectors as its U,
and the symmetric polynomials of the stored U must span exactly those of the
architecture's own U (a least-squares fit both ways, to the precision the two
tensors were computed in, :func:`basis_precision`).  A checkpoint that
contradicts its architecture fails to load, loudly.

The cuEquivariance conversion (:mod:`.cueq`) maps either basis onto
cuEquivariance's own by fitting the polynomials, so it needs no flag either.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable

import mace  # noqa: F401  (before e3nn)
import torch
from mace.modules.symmetric_contraction import Contraction, EmptyParam

from .errors import CheckpointError

#: round-off allowed in a fitted basis: this many units of the precision the basis was computed in ...
BASIS_ULPS = 16
#: ... plus this many float64 units for the least-squares fit itself (measured: at most ~20)
FIT_ULPS = 1024


def basis_precision(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The precision ``tensors`` were computed in: float32 if every value is a float32 number, else float64.

    The value decides, not the dtype: a float32-trained checkpoint loaded as
    float64 (``load_model(..., dtype="float64")``) holds float32 coupling
    tensors in float64 storage, exact only to float32's precision.
    """
    for t in tensors:
        if t.dtype == torch.float64 and not torch.equal(t, t.to(torch.float32).to(torch.float64)):
            return torch.float64
    return torch.float32


def residual_tolerance(tensors: Iterable[torch.Tensor], scale: float) -> float:
    """Largest residual of a float64 fit of polynomials built from ``tensors`` (values up to ``scale``) that is
    round-off.

    ``BASIS_ULPS`` units of the precision ``tensors`` were computed in
    (:func:`basis_precision`) plus ``FIT_ULPS`` float64 units for the fit;
    relative to ``scale``.  A basis that really differs leaves a residual of
    the order of ``scale`` itself.
    """
    precision = torch.finfo(basis_precision(tensors)).eps
    return (BASIS_ULPS * precision + FIT_ULPS * torch.finfo(torch.float64).eps) * scale


def weight_slots(contraction: Contraction) -> Dict[str, str]:
    """Parameter name in the state dict -> name of its ``*_zeroed`` flag buffer."""
    slots = {"weights_max": "weights_max_zeroed"}
    for j in range(len(contraction.weights)):
        slots[f"weights.{j}"] = f"weights_{j}_zeroed"
    return slots


def order_of(contraction: Contraction, name: str) -> int:
    """Correlation order nu whose ``U_matrix_nu`` the weight ``name`` multiplies (mace-torch's Contraction)."""
    correlation = int(contraction.correlation)
    return correlation if name == "weights_max" else correlation - 1 - int(name.split(".")[1])


def symmetric_polynomials(u: torch.Tensor, nu: int) -> torch.Tensor:
    """(values, basis vectors) float64: ``u`` symmetrised over its ``nu`` feature axes, one column per basis vector.

    ``u`` is (output component, feature^nu, basis) -- the output axis is absent
    for a scalar output.  A contraction only ever sees ``u`` applied to nu
    copies of the same features, i.e. its symmetric part: two U tensors define
    the same polynomials exactly when their symmetric parts span the same space.
    """
    u = u.detach().to(device="cpu", dtype=torch.float64)
    axes = list(range(u.dim() - 1 - nu, u.dim() - 1))
    total = torch.zeros_like(u)
    perms = list(itertools.permutations(axes))
    for perm in perms:
        order = list(range(u.dim()))
        for source, target in zip(axes, perm):
            order[source] = target
        total += u.permute(order)
    return (total / len(perms)).reshape(-1, u.shape[-1])


def _spans_within(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest residual of writing every column of ``b`` as a combination of ``a``'s columns (least squares)."""
    fit = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return float((a @ fit - b).abs().max()) if b.numel() else 0.0


def check_stored_basis(key: str, stored: torch.Tensor, own: torch.Tensor, nu: int) -> None:
    """CheckpointError unless ``stored`` (a checkpoint's ``U_matrix_nu``) is a basis of the polynomials of ``own``.

    Only the last (basis) axis may differ, and the symmetric polynomials of
    the two must span the same space: each fitted by the other with a
    residual at round-off level for the precision they were computed in.
    """
    if stored.dim() != own.dim() or stored.shape[:-1] != own.shape[:-1]:
        raise CheckpointError(
            f"{key}: shape {tuple(stored.shape)} does not fit the architecture's {tuple(own.shape)} "
            "(only the number of basis vectors, the last axis, may differ)"
        )
    a, b = symmetric_polynomials(own, nu), symmetric_polynomials(stored, nu)
    scale = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0)
    residual = max(_spans_within(a, b), _spans_within(b, a))
    if residual > residual_tolerance([own, stored], max(scale, torch.finfo(torch.float64).tiny)):
        raise CheckpointError(
            f"{key}: the stored coupling tensor spans other polynomials than the architecture's symmetric "
            f"contraction (residual {residual:.1e} of {scale:.1e}): the checkpoint contradicts its architecture"
        )


def adopt_stored_basis(module: Contraction, state_dict, prefix: str, *_args) -> None:
    """Load pre-hook: give ``module`` the U matrices and weight shapes in ``state_dict``, after checking them.

    Every stored U is checked against the module's own (:func:`check_stored_basis`)
    and every stored weight against its U's basis count; tensors whose stored
    shape differs are then replaced (same dtype, device and trainability) and
    everything else is left to ``load_state_dict``.  Raises CheckpointError.
    """
    basis_count = {}
    for nu in range(1, int(module.correlation) + 1):
        key = f"{prefix}U_matrix_{nu}"
        current = getattr(module, f"U_matrix_{nu}")
        stored = state_dict.get(key)
        basis_count[nu] = current.shape[-1]
        if stored is None:
            continue
        check_stored_basis(key, stored, current, nu)
        basis_count[nu] = stored.shape[-1]
        if stored.shape != current.shape:
            module.register_buffer(f"U_matrix_{nu}", current.new_empty(stored.shape))
    for name, flag in weight_slots(module).items():
        stored = state_dict.get(prefix + name)
        current = module.get_parameter(name)
        if stored is None:
            continue
        nu = order_of(module, name)
        expected = (current.shape[0], basis_count[nu], current.shape[2])
        if tuple(stored.shape) != expected:
            raise CheckpointError(
                f"{prefix}{name}: shape {tuple(stored.shape)} does not fit the architecture and U_matrix_{nu} "
                f"(expected {expected}: elements, basis vectors of U_matrix_{nu}, channels)"
            )
        if stored.shape == current.shape:
            continue
        zeroed = state_dict.get(prefix + flag)
        new: torch.nn.Parameter
        if zeroed is not None and bool(zeroed):
            new = EmptyParam(current.new_empty(stored.shape))
        else:
            new = torch.nn.Parameter(current.new_empty(stored.shape), requires_grad=current.requires_grad)
        if name == "weights_max":
            module.weights_max = new
        else:
            module.weights[int(name.split(".")[1])] = new


def install_basis_hooks(model: torch.nn.Module) -> int:
    """Register :func:`adopt_stored_basis` on every e3nn contraction of ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Contraction):
            module.register_load_state_dict_pre_hook(adopt_stored_basis)
            count += 1
    return count
