"""JSON description of a MACE / FieldMACE architecture and the builder that inverts it.

The native checkpoint stores this description next to the tensors, so a model
can be rebuilt without unpickling any code.  ``describe_architecture`` reads it
off a live module (also one that came out of a trusted pickle, whose
``__init__`` never ran); ``build_field_mace`` constructs a fresh FieldMACE
from it.  Per-element and per-head buffers (atomic energies, scale, shift)
are described too, but the state dict is what finally fills them.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, cast

import mace  # noqa: F401
import numpy as np
import torch
from e3nn import o3
from mace.modules import blocks as mace_blocks

from .field_mace import FieldMACE
from .tp_rewrite import rewrite_tensor_products

ARCH_VERSION = 1

_GATES = {
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "abs": torch.abs,
}

_RADIAL_NAMES = {
    "BesselBasis": "bessel",
    "GaussianBasis": "gaussian",
    "ChebychevBasis": "chebyshev",
}

_TRANSFORM_NAMES = {"AgnesiTransform": "Agnesi", "SoftTransform": "Soft"}


def _gate_name(fn) -> str | None:
    if fn is None:
        return None
    for name, candidate in _GATES.items():
        if fn is candidate:
            return name
    name = getattr(fn, "__name__", str(fn))
    if name in _GATES:
        return name
    raise ValueError(f"unsupported gate non-linearity {name!r}")


def _list(t: torch.Tensor) -> Any:
    return t.detach().cpu().double().numpy().tolist()


def _radial_mlp(model) -> list[int]:
    weights = model.interactions[0].conv_tp_weights
    if hasattr(weights, "hs"):
        return [int(h) for h in weights.hs[1:-1]]
    # RadialMLP (newer mace): Linear / LayerNorm / act triples
    return [int(layer.normalized_shape[0]) for layer in weights.net if isinstance(layer, torch.nn.LayerNorm)]


def _buffer_values(model) -> Dict[str, Any]:
    """Per-element / per-head buffers: reference energies (eV), scale and shift."""
    n_heads = len(getattr(model, "heads", None) or ["Default"])
    scale_shift = getattr(model, "scale_shift", None)
    return {
        "atomic_energies": _list(torch.atleast_2d(model.atomic_energies_fn.atomic_energies)),
        "atomic_inter_scale": (
            _list(torch.atleast_1d(scale_shift.scale)) if scale_shift is not None else [1.0] * n_heads
        ),
        "atomic_inter_shift": (
            _list(torch.atleast_1d(scale_shift.shift)) if scale_shift is not None else [0.0] * n_heads
        ),
    }


def describe_architecture(model: torch.nn.Module) -> Dict[str, Any]:
    """Return the JSON-able constructor description of a (Field)MACE module."""
    net: Any = model  # torch types every submodule and buffer as Tensor | Module; mace's are read duck-typed
    if getattr(model, "backend", "e3nn") != "e3nn":  # a model converted by .cueq.to_cueq
        raise ValueError("describe (and save) the e3nn model a cuEquivariance model was converted from")
    if getattr(model, "arch_config", None) is not None:
        arch = copy.deepcopy(net.arch_config)
        arch.update(_buffer_values(model))
        return arch
    if not hasattr(model, "interactions") or not hasattr(model, "products"):
        raise TypeError(f"{type(model).__name__} is not a MACE model")
    if hasattr(model, "joint_embedding") or getattr(model, "lammps_mliap", False):
        raise ValueError("MACE models with joint embeddings or LAMMPS-MLIAP mode are not supported")
    if getattr(model, "cueq_config", None) is not None and getattr(net.cueq_config, "enabled", False):
        raise ValueError("convert cuEquivariance models back to e3nn before loading them here")
    heads = list(getattr(model, "heads", None) or ["Default"])
    num_interactions = int(net.num_interactions)
    last_readout = net.readouts[-1]
    mlp_irreps = o3.Irreps(str(getattr(last_readout, "hidden_irreps", "1x0e")))
    mlp_scalars = max(1, mlp_irreps.count((0, 1)) // len(heads))
    gate = None
    acts = getattr(getattr(last_readout, "non_linearity", None), "acts", None)
    if acts is not None and len(acts) > 0:
        gate = _gate_name(getattr(acts[0], "f", None))
    correlation = [int(p.symmetric_contractions.contractions[0].correlation) for p in net.products]
    radial = net.radial_embedding
    transform = getattr(radial, "distance_transform", None)
    hidden = net.products[0].linear.irreps_out
    last_irreps = o3.Irreps(str(net.products[-1].linear.irreps_out))
    edge_irreps = getattr(model, "edge_irreps", None)
    return {
        "arch_version": ARCH_VERSION,
        "r_max": float(net.r_max),
        "num_bessel": int(radial.out_dim),
        "num_polynomial_cutoff": int(radial.cutoff_fn.p),
        "max_ell": int(net.spherical_harmonics._lmax),  # pylint: disable=protected-access
        "interaction_cls": type(net.interactions[-1]).__name__,
        "interaction_cls_first": type(net.interactions[0]).__name__,
        "num_interactions": num_interactions,
        "hidden_irreps": str(o3.Irreps(str(hidden))),
        "keep_last_layer_irreps": num_interactions > 1 and last_irreps.lmax > 0,
        "MLP_irreps": f"{mlp_scalars}x0e",
        "gate": gate,
        "readout_cls": type(last_readout).__name__,
        "avg_num_neighbors": float(net.interactions[0].avg_num_neighbors),
        "atomic_numbers": [int(z) for z in net.atomic_numbers],
        "correlation": correlation,
        "heads": heads,
        "radial_type": _RADIAL_NAMES.get(type(radial.bessel_fn).__name__, "bessel"),
        "distance_transform": (
            _TRANSFORM_NAMES.get(type(transform).__name__, "None") if transform is not None else "None"
        ),
        "radial_MLP": _radial_mlp(model),
        "pair_repulsion": hasattr(model, "pair_repulsion_fn"),
        "core_repulsion": net.core_repulsion.spec() if hasattr(model, "core_repulsion") else None,
        "apply_cutoff": bool(getattr(model, "apply_cutoff", True)),
        "use_reduced_cg": bool(getattr(model, "use_reduced_cg", False)),
        "use_so3": bool(getattr(model, "use_so3", False)),
        "use_agnostic_product": bool(getattr(model, "use_agnostic_product", False)),
        "use_last_readout_only": bool(getattr(model, "use_last_readout_only", False)),
        "use_edge_irreps_first": bool(getattr(model, "use_edge_irreps_first", False)),
        "edge_irreps": str(edge_irreps) if edge_irreps is not None else None,
        **_buffer_values(model),
    }


def default_architecture(
    atomic_numbers,
    *,
    heads=("Default",),
    channels: int = 32,
    max_L: int = 1,
    num_interactions: int = 2,
    r_max: float = 5.0,
    max_ell: int = 3,
    correlation: int = 3,
    num_bessel: int = 8,
    num_polynomial_cutoff: int = 5,
    mlp_channels: int = 16,
    radial_MLP=(64, 64, 64),
    avg_num_neighbors: float = 20.0,
    atomic_energies=None,
) -> Dict[str, Any]:
    """A standard MACE-Field architecture description (mace-torch defaults otherwise)."""
    zs = sorted(int(z) for z in atomic_numbers)
    heads = list(heads)
    hidden = "+".join(f"{channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(max_L + 1))
    if atomic_energies is None:
        atomic_energies = [[0.0] * len(zs) for _ in heads]
    return {
        "arch_version": ARCH_VERSION,
        "r_max": float(r_max),
        "num_bessel": num_bessel,
        "num_polynomial_cutoff": num_polynomial_cutoff,
        "max_ell": max_ell,
        "interaction_cls": "RealAgnosticResidualInteractionBlock",
        "interaction_cls_first": "RealAgnosticResidualInteractionBlock",
        "num_interactions": num_interactions,
        "hidden_irreps": hidden,
        "keep_last_layer_irreps": False,
        "MLP_irreps": f"{mlp_channels}x0e",
        "gate": "silu",
        "readout_cls": "NonLinearReadoutBlock",
        "avg_num_neighbors": float(avg_num_neighbors),
        "atomic_numbers": zs,
        "atomic_energies": [list(map(float, row)) for row in atomic_energies],
        "correlation": [correlation] * num_interactions,
        "heads": heads,
        "radial_type": "bessel",
        "distance_transform": "None",
        "radial_MLP": list(radial_MLP),
        "pair_repulsion": False,
        "core_repulsion": None,
        "apply_cutoff": True,
        "use_reduced_cg": True,
        "use_so3": False,
        "use_agnostic_product": False,
        "use_last_readout_only": False,
        "use_edge_irreps_first": False,
        "edge_irreps": None,
        "atomic_inter_scale": [1.0] * len(heads),
        "atomic_inter_shift": [0.0] * len(heads),
    }


def mace_kwargs(arch: Dict[str, Any]) -> Dict[str, Any]:
    """Translate a description into ScaleShiftMACE constructor keyword arguments.

    FieldMACE's own ``core_repulsion`` is not among them: see :func:`field_kwargs`.
    """
    if int(arch.get("arch_version", 0)) != ARCH_VERSION:
        raise ValueError(f"unsupported architecture description version {arch.get('arch_version')!r}")
    for key in ("interaction_cls", "interaction_cls_first", "readout_cls"):
        if not hasattr(mace_blocks, arch[key]):
            raise ValueError(f"unknown mace block {arch[key]!r} in '{key}'")
    gate = arch.get("gate")
    if gate is not None and gate not in _GATES:
        raise ValueError(f"unknown gate {gate!r}")
    heads = list(arch["heads"])
    energies = np.asarray(arch["atomic_energies"], dtype=float)
    if energies.shape[0] == 1 and len(heads) == 1:
        energies = energies[0]
    scale = np.asarray(arch["atomic_inter_scale"], dtype=float)
    shift = np.asarray(arch["atomic_inter_shift"], dtype=float)
    return {
        "r_max": float(arch["r_max"]),
        "num_bessel": int(arch["num_bessel"]),
        "num_polynomial_cutoff": int(arch["num_polynomial_cutoff"]),
        "max_ell": int(arch["max_ell"]),
        "interaction_cls": getattr(mace_blocks, arch["interaction_cls"]),
        "interaction_cls_first": getattr(mace_blocks, arch["interaction_cls_first"]),
        "num_interactions": int(arch["num_interactions"]),
        "num_elements": len(arch["atomic_numbers"]),
        "hidden_irreps": o3.Irreps(arch["hidden_irreps"]),
        "keep_last_layer_irreps": bool(arch.get("keep_last_layer_irreps", False)),
        "MLP_irreps": o3.Irreps(arch["MLP_irreps"]),
        "gate": _GATES[gate] if gate is not None else None,
        "readout_cls": getattr(mace_blocks, arch["readout_cls"]),
        "atomic_energies": energies,
        "avg_num_neighbors": float(arch["avg_num_neighbors"]),
        "atomic_numbers": [int(z) for z in arch["atomic_numbers"]],
        "correlation": [int(c) for c in arch["correlation"]],
        "heads": heads,
        "radial_type": arch["radial_type"],
        "distance_transform": arch["distance_transform"],
        "radial_MLP": [int(h) for h in arch["radial_MLP"]],
        "pair_repulsion": bool(arch["pair_repulsion"]),
        "apply_cutoff": bool(arch["apply_cutoff"]),
        "use_reduced_cg": bool(arch["use_reduced_cg"]),
        "use_so3": bool(arch["use_so3"]),
        "use_agnostic_product": bool(arch["use_agnostic_product"]),
        "use_last_readout_only": bool(arch["use_last_readout_only"]),
        "use_edge_irreps_first": bool(arch["use_edge_irreps_first"]),
        "edge_irreps": o3.Irreps(arch["edge_irreps"]) if arch.get("edge_irreps") else None,
        "atomic_inter_scale": scale if scale.size > 1 else float(scale.reshape(-1)[0]),
        "atomic_inter_shift": shift if shift.size > 1 else float(shift.reshape(-1)[0]),
    }


def field_kwargs(arch: Dict[str, Any]) -> Dict[str, Any]:
    """FieldMACE constructor keyword arguments: :func:`mace_kwargs` and the ``core_repulsion`` description.

    Descriptions written before the core repulsion existed have no
    ``core_repulsion`` key: they mean none.
    """
    return {**mace_kwargs(arch), "core_repulsion": copy.deepcopy(arch.get("core_repulsion"))}


def build_field_mace(
    arch: Dict[str, Any], *, dtype: torch.dtype = torch.float64, rewrite_products: bool = True
) -> FieldMACE:
    """Construct a FieldMACE (random weights, zero-initialised field coupling off) in ``dtype``.

    ``rewrite_products`` (default) rewrites the e3nn tensor products so that
    their backward and double-backward passes take inputs apart with one
    split instead of one zero-filled copy per slice
    (:mod:`macefield_server.engine.tp_rewrite`): same numbers, ~20 % less
    time for the full response on CPU.  ``False`` keeps e3nn's TorchScript
    modules as mace-torch builds them (used by the benchmark's reference).
    """
    kwargs = field_kwargs(arch)
    # MACE's original contraction basis in every environment (mace-torch would switch to
    # cuequivariance's reduced basis whenever that package is importable); a checkpoint in
    # the reduced basis still loads: see .contraction_basis
    kwargs["use_reduced_cg"] = False
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = FieldMACE(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    if rewrite_products:
        rewrite_tensor_products(model)
    cast(Any, model).arch_config = copy.deepcopy(arch)  # mypy reads undeclared Module attributes as Tensor | Module
    return model.to(dtype)


def add_pair_repulsion(model: FieldMACE) -> FieldMACE:
    """Give ``model`` mace-torch's ZBL pair repulsion (in place; returned), unless it has one.

    The term is ``mace.modules.radial.ZBLBasis`` with the model's polynomial
    cutoff exponent, exactly what ScaleShiftMACE builds with
    ``pair_repulsion=True``: per pair of atoms at distance r (A) the screened
    nuclear repulsion 14.3996 Z_u Z_v / r * phi(r / a) eV (universal ZBL
    screening length a), times a polynomial envelope that reaches zero at
    the sum of the two covalent radii, so F changes only for pairs closer
    than that.  Like the readouts it passes through the per-head scale and
    shift (``atomic_inter_scale``), as in ScaleShiftMACE.  The architecture
    description then says ``pair_repulsion: true``, so saved checkpoints
    rebuild it.
    """
    from mace.modules.radial import ZBLBasis

    if hasattr(model, "pair_repulsion_fn"):
        return model
    dtype = next(model.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        zbl = ZBLBasis(p=int(cast(Any, model).radial_embedding.cutoff_fn.p))
    finally:
        torch.set_default_dtype(previous)
    device = next(model.parameters()).device
    model.pair_repulsion_fn = zbl.to(device)
    cast(Any, model).pair_repulsion = True
    arch = getattr(model, "arch_config", None)
    if isinstance(arch, dict):
        arch["pair_repulsion"] = True
    return model
