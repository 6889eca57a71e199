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

The cuEquivariance conversion (:mod:`.cueq`) maps either basis onto
cuEquivariance's own by fitting the polynomials, so it needs no flag either.
"""

from __future__ import annotations

from typing import Dict

import mace  # noqa: F401  (before e3nn)
import torch
from mace.modules.symmetric_contraction import Contraction, EmptyParam


def _weight_slots(contraction: Contraction) -> Dict[str, str]:
    """Parameter name in the state dict -> name of its ``*_zeroed`` flag buffer."""
    slots = {"weights_max": "weights_max_zeroed"}
    for j in range(len(contraction.weights)):
        slots[f"weights.{j}"] = f"weights_{j}_zeroed"
    return slots


def adopt_stored_basis(module: Contraction, state_dict, prefix: str, *_args) -> None:
    """Load pre-hook: give ``module`` the shapes of the U matrices and weights in ``state_dict``.

    Only tensors whose stored shape differs are replaced (same dtype, device
    and trainability); everything else is left to ``load_state_dict``.
    """
    for nu in range(1, int(module.correlation) + 1):
        key = f"{prefix}U_matrix_{nu}"
        current = getattr(module, f"U_matrix_{nu}")
        stored = state_dict.get(key)
        if stored is not None and stored.shape != current.shape:
            module.register_buffer(f"U_matrix_{nu}", current.new_empty(stored.shape))
    for name, flag in _weight_slots(module).items():
        stored = state_dict.get(prefix + name)
        current = module.get_parameter(name)
        if stored is None or stored.shape == current.shape:
            continue
        zeroed = state_dict.get(prefix + flag)
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
