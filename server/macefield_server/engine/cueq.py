"""cuEquivariance backend: a FieldMACE rebuilt on NVIDIA cuEquivariance, carrying every weight.

Backends (``backend`` per served model, ``--backend`` on ``macefield-serve``):

* ``e3nn``: the model as built by mace-torch on e3nn (every device; the reference);
* ``cueq``: the same function evaluated by ``cuequivariance-torch``: its CUDA
  kernels on a GPU (``cuequivariance-ops-torch-cu12`` / ``-cu13``), its
  pure-PyTorch fallback elsewhere (slow; used to prove equality on CPU);
* ``auto``: ``cueq`` when the model is on CUDA and cuequivariance-torch
  imports with its CUDA kernels, else ``e3nn``.

mace-torch's converter (``mace.cli.convert_e3nn_cueq``) only takes MACE and
ScaleShiftMACE and reads the contraction basis from ``use_reduced_cg``, which
does not say which basis a model actually holds (see
:mod:`.contraction_basis`).  :func:`to_cueq` converts a FieldMACE:

1. it rebuilds the model from its description with a cuEquivariance
   configuration (``ir_mul`` layout; every linear, tensor product and
   symmetric contraction, the field coupling included, becomes a cuEquivariance
   module; on CUDA the convolution tensor product is fused with its gather and
   scatter);
2. it copies every tensor that has the same meaning in both models (linear,
   skip and field-coupling weights differ only by a leading axis of one);
3. it maps the symmetric-contraction weights of each product block onto
   cuEquivariance's own linearly independent basis by an exact least-squares
   fit of the two bases' polynomials, both evaluated in float64 arithmetic
   (:func:`_projection`): the same code for MACE's original basis and
   cuequivariance's reduced one (see :mod:`.contraction_basis`), with a
   residual check at the precision the e3nn coupling tensors were computed
   in; a float64 model is built from float64 descriptors even after a float32
   one (:func:`_prepare_descriptor_caches`);
4. it checks that every parameter and persistent buffer of the new model was
   filled (cuEquivariance's own descriptor constants aside) and every
   non-empty parameter and buffer of the old one was used (e3nn's
   architecture-derived masks and Wigner constants aside): a missed tensor is
   an error, never a silent random value;
5. it carries what was attached to the model after building: metadata and
   the extrapolation statistics (the grade is served on cueq too).

The converted model is evaluated by the same response engine: F and every
derivative up to Z* and alpha.  cuEquivariance's operations have no vmap
batching rule, so its second-order pass is always three batch-wide backward
passes (``second_order="loop"``).
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .architecture import describe_architecture, field_kwargs
from .contraction_basis import residual_tolerance
from .extrapolation import attach, statistics_of
from .field_mace import FieldMACE

BACKENDS = ("e3nn", "cueq", "auto")
#: irreps layout of the converted model (mace-torch's choice: cuEquivariance kernels want ir_mul)
LAYOUT = "ir_mul"


def cueq_import_error() -> Optional[str]:
    """None when ``cuequivariance`` and ``cuequivariance_torch`` import, else why not."""
    try:
        import cuequivariance  # noqa: F401
        import cuequivariance_torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"{type(exc).__name__}: {exc}"
    from mace.modules import wrapper_ops

    if not wrapper_ops.CUET_AVAILABLE:  # imported after mace: mace built its wrappers without it
        return "cuequivariance_torch was not importable when mace was first imported"
    return None


def cueq_kernels_available() -> bool:
    """Whether cuEquivariance's CUDA kernels (``cuequivariance_ops_torch``) import."""
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def model_backend(model: torch.nn.Module) -> str:
    """``"cueq"`` for a model made by :func:`to_cueq`, else ``"e3nn"``."""
    return getattr(model, "backend", "e3nn")


def resolve_backend(requested: Optional[str], device) -> Tuple[str, str]:
    """(backend to use, reason) for ``requested`` in {e3nn, cueq, auto, None (= auto)} on ``device``.

    Raises ValueError naming ``backend`` when ``cueq`` is asked for and cannot be had.
    """
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    if requested == "e3nn":
        return "e3nn", "asked for"
    if requested == "auto" and device.type != "cuda":  # decided by the device alone: nothing is imported
        return "e3nn", "auto: not on CUDA"
    missing = cueq_import_error()
    if requested == "cueq":
        if missing is not None:
            raise ValueError(
                "backend: cueq needs cuequivariance and cuequivariance-torch "
                f"(pip install 'macefield-server[cueq]'): {missing}"
            )
        if device.type != "cuda":
            return "cueq", "asked for; not on CUDA: cuEquivariance's pure-PyTorch fallback (slow)"
        if not cueq_kernels_available():
            return "cueq", "asked for; cuequivariance_ops_torch missing: pure-PyTorch fallback on the GPU (slow)"
        return "cueq", "asked for"
    if missing is not None:
        return "e3nn", f"auto: cuequivariance-torch not importable ({missing})"
    if not cueq_kernels_available():
        return "e3nn", "auto: cuequivariance_ops_torch (CUDA kernels) not importable"
    return "cueq", "auto: CUDA with cuEquivariance kernels"


# --------------------------------------------------------------- conversion
def _cueq_config(conv_fusion: bool):
    from mace.modules.wrapper_ops import CuEquivarianceConfig

    return CuEquivarianceConfig(
        enabled=True, layout=LAYOUT, group="O3_e3nn", optimize_all=True, conv_fusion=conv_fusion
    )


def _contraction_weights(symmetric_contractions) -> torch.Tensor:
    """e3nn contraction weights (elements, basis vectors, channels), concatenated in :func:`_e3nn_basis` order."""
    blocks = []
    for contraction in symmetric_contractions.contractions:
        blocks += [contraction.weights_max.detach()] + [w.detach() for w in contraction.weights]
    return torch.cat(blocks, dim=1).to(device="cpu", dtype=torch.float64)


def _coupling_tensors(symmetric_contractions) -> List[torch.Tensor]:
    """Every ``U_matrix_nu`` of the e3nn contractions (what the e3nn basis polynomials are built from)."""
    return [
        getattr(c, f"U_matrix_{nu}")
        for c in symmetric_contractions.contractions
        for nu in range(1, int(c.correlation) + 1)
    ]


def _e3nn_basis(symmetric_contractions, x: torch.Tensor) -> torch.Tensor:
    """Each e3nn basis polynomial at ``x`` (CPU, float64): (samples, channels, output dim, basis vectors).

    e3nn's contraction is ``sum_nu sum_k w_nu[element, k, c] U_nu[..., k] . x_c^nu``
    (mace.modules.symmetric_contraction); basis vector k of order nu is
    ``U_nu[..., k]`` contracted nu times with the channel's features ``x_c``.
    Order: output irreps in turn, and for each the orders correlation, ..., 1
    (``weights_max``, ``weights[0]``, ...), as :func:`_contraction_weights`.
    """
    out_dims = [ir.dim for _, ir in symmetric_contractions.irreps_out]
    total = sum(out_dims)
    columns, offset = [], 0
    letters = "ijklmn"
    for contraction, dim in zip(symmetric_contractions.contractions, out_dims):
        correlation = int(contraction.correlation)
        for nu in range(correlation, 0, -1):
            u = getattr(contraction, f"U_matrix_{nu}").detach().to(device="cpu", dtype=torch.float64)
            if dim == 1:
                u = u.unsqueeze(0)
            idx = letters[:nu]
            equation = f"o{idx}K," + ",".join(f"sc{i}" for i in idx) + "->scoK"
            values = torch.einsum(equation, u, *([x] * nu))
            block = x.new_zeros(values.shape[:2] + (total, values.shape[-1]))
            block[:, :, offset : offset + dim] = values
            columns.append(block)
        offset += dim
    return torch.cat(columns, dim=-1)


def _cueq_basis(target, x: torch.Tensor) -> torch.Tensor:
    """Each basis polynomial of cuEquivariance's SymmetricContraction ``target`` at ``x``:
    (samples, channels, out, basis).

    Evaluates the contraction's polynomial descriptor (``target.etp``) with
    cuequivariance's NumPy reference evaluator in float64 on the CPU, one
    weight row per basis vector: that unit vector in every channel.  The
    module's own ``f`` would compute in the model's dtype, on its device.  The
    descriptor's coefficients are float64-exact for a float64 model
    (:func:`_prepare_descriptor_caches`); a float32 model's may carry float32
    round-off, as its e3nn coupling tensors do.
    Inputs and outputs are in ``ir_mul`` layout, as in the converted model.
    """
    samples, channels, _ = x.shape
    n_basis = target.weight_shape[0]
    unit = np.repeat(np.eye(n_basis)[:, :, None], channels, axis=2).reshape(n_basis, -1)
    flat = torch.cat([x[:, :, sl].transpose(1, 2).reshape(samples, -1) for sl in _irrep_slices(target.irreps_in)], 1)
    weights = np.repeat(unit, samples, axis=0)  # row (k, s): basis vector k at sample s
    features = np.tile(flat.numpy(), (n_basis, 1))
    [out] = target.etp.polynomial(weights, features)
    out = torch.from_numpy(np.asarray(out, dtype=np.float64))
    blocks, start = [], 0
    for mul, ir in target.irreps_out:
        block = out[:, start : start + mul * ir.dim].reshape(n_basis, samples, ir.dim, mul)
        blocks.append(block.transpose(2, 3))
        start += mul * ir.dim
    return torch.cat(blocks, dim=-1).permute(1, 2, 3, 0)


def _irrep_slices(irreps) -> List[slice]:
    """Per-channel column slices of each irrep of ``irreps`` (all with the same multiplicity)."""
    slices, start = [], 0
    for _, ir in irreps:
        slices.append(slice(start, start + ir.dim))
        start += ir.dim
    return slices


def _projection(source, target, *, seed: int = 0) -> torch.Tensor:
    """Matrix P (cuEquivariance basis, e3nn basis) with cueq_weights = P @ e3nn_weights, float64 on CPU.

    Both contractions are linear in their weights and act channel by channel,
    so P is fitted exactly by least squares on random features: each e3nn
    basis polynomial written in cuEquivariance's (linearly independent) basis,
    both evaluated in float64.  This works for MACE's original basis (with its
    dependent vectors) and for cuequivariance's reduced one alike, and the fit
    residual proves the map: ValueError if an e3nn polynomial is not in
    cuEquivariance's span.  The residual allowed is round-off at the precision
    the e3nn coupling tensors were computed in (float32 for a float32-trained
    checkpoint, even when it is served in float64: :func:`.basis_precision`).
    """
    channels = target.irreps_in.muls[0]
    coupling_dim = sum(ir.dim for _, ir in target.irreps_in)
    n_out = sum(ir.dim for _, ir in target.irreps_out)
    n_basis = target.weight_shape[0]
    samples = max(4, -(-32 * n_basis // (channels * n_out)))  # >= 32 equations per unknown
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, channels, coupling_dim, dtype=torch.float64, generator=generator)
    e3nn_values = _e3nn_basis(source, x).reshape(-1, _e3nn_count(source))
    cueq_values = _cueq_basis(target, x).reshape(-1, n_basis)
    fit = torch.linalg.lstsq(cueq_values, e3nn_values, driver="gelsd").solution  # (cueq basis, e3nn basis)
    residual = float((cueq_values @ fit - e3nn_values).abs().max())
    scale = float(e3nn_values.abs().max())
    if residual > residual_tolerance(_coupling_tensors(source), scale):
        raise ValueError(
            f"symmetric contraction: e3nn basis not representable in cuEquivariance's "
            f"(residual {residual:.1e} of {scale:.1e})"
        )
    return fit


def _e3nn_count(symmetric_contractions) -> int:
    return sum(
        c.weights_max.shape[1] + sum(w.shape[1] for w in c.weights) for c in symmetric_contractions.contractions
    )


def _same_up_to_unit_axes(a: torch.Size, b: torch.Size) -> bool:
    return tuple(d for d in a if d != 1) == tuple(d for d in b if d != 1)


#: e3nn buffers fixed by the architecture, not data: which outputs have paths, compiled Wigner 3j constants
_E3NN_DERIVED_BUFFERS = re.compile(r"(^|\.)(output_mask|_w3j_\w+)$")


def _tensor_names(module: torch.nn.Module) -> Dict[str, str]:
    """{state-dict key: "parameter" or "buffer"} of ``module`` (persistent buffers only: what a state dict holds)."""
    kinds = {name: "parameter" for name, _ in module.named_parameters()}
    state = module.state_dict(keep_vars=True)
    kinds.update({name: "buffer" for name in state if name not in kinds})
    return kinds


def _owned_by_cuequivariance(module: torch.nn.Module, key: str) -> bool:
    """Whether the tensor ``key`` belongs to a cuEquivariance module (its constants: descriptor coefficients)."""
    path = key.rsplit(".", 1)[0] if "." in key else ""
    parts = path.split(".") if path else []
    owner = module
    for part in parts:
        owner = getattr(owner, part)
        if type(owner).__module__.startswith("cuequivariance"):
            return True
    return False


def _transfer(source: FieldMACE, target: FieldMACE) -> None:
    """Fill every parameter and persistent buffer of ``target`` from ``source`` (errors name the key).

    Every tensor of ``target`` is filled from ``source`` except the constants
    of cuEquivariance's own modules; every non-empty tensor of ``source`` is
    used except e3nn's architecture-derived buffers (:data:`_E3NN_DERIVED_BUFFERS`).
    """
    src = source.state_dict()
    tgt = target.state_dict()
    new: Dict[str, torch.Tensor] = {}
    used = set()
    for i, (p_src, p_tgt) in enumerate(zip(source.products, target.products)):
        sc_src, sc_tgt = p_src.symmetric_contractions, p_tgt.symmetric_contractions
        key = f"products.{i}.symmetric_contractions.weight"
        projection = _projection(sc_src, sc_tgt)
        weights = _contraction_weights(sc_src)
        new[key] = torch.einsum("zkc,bk->zbc", weights, projection)
        if new[key].shape != tgt[key].shape:
            raise ValueError(f"{key}: mapped to {tuple(new[key].shape)}, cuEquivariance has {tuple(tgt[key].shape)}")
        used |= {k for k in src if k.startswith(f"products.{i}.symmetric_contractions.")}
    for key, value in tgt.items():
        if key in new or key not in src:
            continue
        stored = src[key]
        if stored.shape == value.shape:
            new[key] = stored
        elif stored.numel() == value.numel() and _same_up_to_unit_axes(stored.shape, value.shape):
            new[key] = stored.reshape(value.shape)
        else:
            raise ValueError(f"{key}: shape {tuple(stored.shape)} in e3nn, {tuple(value.shape)} in cuEquivariance")
        used.add(key)
    target_kinds, source_kinds = _tensor_names(target), _tensor_names(source)
    missing = sorted(
        f"{key} ({kind})" for key, kind in target_kinds.items()
        if key not in new and not (kind == "buffer" and _owned_by_cuequivariance(target, key))
    )
    if missing:
        raise ValueError(f"cuEquivariance tensors with no e3nn counterpart: {missing}")
    unused = sorted(
        f"{key} ({kind})" for key, kind in source_kinds.items()
        if key not in used and src[key].numel() > 0 and not (kind == "buffer" and _E3NN_DERIVED_BUFFERS.search(key))
    )
    if unused:
        raise ValueError(f"e3nn tensors not carried over: {unused}")
    merged = dict(tgt)
    merged.update({k: v.to(device=tgt[k].device, dtype=tgt[k].dtype) for k, v in new.items()})
    target.load_state_dict(merged, strict=True)


#: the lowest precision cuEquivariance's descriptor caches may hold entries of (None: not known)
_cache_precision: Optional[torch.dtype] = None


def _descriptor_caches() -> List:
    """How to clear every memo of the loaded cuequivariance modules: ``functools`` caches (classes' too),
    ``_cache*`` dicts."""
    caches, seen = [], set()
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("cuequivariance"):
            continue
        for attr, obj in list(vars(module).items()):
            if attr.startswith("_cache") and isinstance(obj, dict):  # hand-made memo tables
                caches.append(obj.clear)
                continue
            candidates = [obj]
            if inspect.isclass(obj) and obj.__module__ == name:
                candidates += [getattr(v, "__func__", v) for v in vars(obj).values()]
            for c in candidates:
                if callable(getattr(c, "cache_clear", None)) and id(c) not in seen:
                    seen.add(id(c))
                    caches.append(c.cache_clear)
    return caches


def _prepare_descriptor_caches(dtype: torch.dtype) -> None:
    """Make sure a ``dtype`` model is built from descriptors computed at (at least) ``dtype``'s precision.

    cuEquivariance builds its descriptors from Clebsch-Gordan coefficients
    that mace computes at torch's default dtype (``mace.tools.cg.O3_e3nn``
    calls ``e3nn.o3.wigner_3j``), and memoises them (reduced tensor-product
    bases, symmetric-contraction descriptors).  Entries made while a float32
    model was built are float32-rounded, and a float64 model built later in
    the same process would inherit them (~1e-9 relative error, measured).  So
    before a float64 build the caches are cleared unless only float64 builds
    filled them; float32 builds need nothing (float64 entries round exactly).
    """
    global _cache_precision
    if dtype == torch.float64 and _cache_precision != torch.float64:
        for clear in _descriptor_caches():
            clear()
        _cache_precision = torch.float64
    elif dtype != torch.float64:
        _cache_precision = dtype


def to_cueq(model: FieldMACE, *, conv_fusion: Optional[bool] = None) -> FieldMACE:
    """A cuEquivariance FieldMACE computing the same F(R, E) as the e3nn ``model``.

    Args:
        model: an e3nn FieldMACE (from :func:`.load_model` / :func:`.build_field_mace`).
        conv_fusion: fuse the convolution tensor product with its gather/scatter
            (None: on CUDA with cuEquivariance's kernels).

    Same dtype, device, heads, metadata and extrapolation statistics; ``model.backend == "cueq"``.
    Raises ValueError if cuequivariance-torch is missing or a weight cannot be mapped.
    """
    if model_backend(model) == "cueq":
        return model
    missing = cueq_import_error()
    if missing is not None:
        raise ValueError(f"backend: cueq needs cuequivariance-torch (pip install 'macefield-server[cueq]'): {missing}")
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if conv_fusion is None:
        conv_fusion = device.type == "cuda" and cueq_kernels_available()
    elif conv_fusion and not cueq_kernels_available():
        raise ValueError(
            "conv_fusion: the fused convolution needs cuEquivariance's CUDA kernels (cuequivariance_ops_torch)"
        )
    arch = describe_architecture(model)
    kwargs = field_kwargs(arch)
    kwargs["use_reduced_cg"] = True  # cuEquivariance's own (independent) weight basis; _transfer maps onto it
    kwargs["cueq_config"] = _cueq_config(conv_fusion)
    _prepare_descriptor_caches(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with warnings.catch_warnings():
            # without the CUDA kernels cuEquivariance warns once per module that it falls back
            # to PyTorch; resolve_backend reports that once per model instead
            warnings.filterwarnings("ignore", message=".*[Ff]alling back to naive.*")
            warnings.filterwarnings("ignore", message=".*not available.*naive.*")
            target = FieldMACE(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    target = target.to(dtype=dtype, device=device)
    _transfer(model, target)
    trainable = any(p.requires_grad for p in model.parameters())
    for p in target.parameters():  # a frozen (served) model stays frozen: no parameter graphs in autograd
        p.requires_grad_(trainable)
    _carry_attributes(model, target)
    extra: Any = target  # mypy reads undeclared Module attributes as Tensor | Module
    extra.arch_config = copy.deepcopy(arch)
    extra.backend = "cueq"
    return target.eval()


def _carry_attributes(model: FieldMACE, target: FieldMACE) -> None:
    """Give ``target`` every public attribute ``model`` has beyond a freshly built model's (copies).

    That is what was attached after building: ``metadata``, ``arch_config``
    and the extrapolation statistics (the grade reads the invariant channels
    of each layer's features, which are the same in ``ir_mul`` layout; they are
    checked against ``target`` by :func:`.attach`), and whatever is attached
    in future, so nothing is dropped silently.
    """
    fresh = vars(target)
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in fresh:
            setattr(target, name, copy.deepcopy(value))
    statistics = statistics_of(target)
    if statistics is not None:
        attach(target, statistics)
