"""Rewrite e3nn tensor products so their gradients do not zero-fill per slice.

e3nn generates each ``TensorProduct`` as a torch.fx graph that slices its
flat inputs once per irrep (``x[:, a:b]``) and concatenates one output block
per path (``torch.cat``).  Autograd differentiates every such slice on its
own: the backward of ``x[:, a:b]`` allocates a zero tensor of the *whole*
input and copies one block into it, and the per-slice tensors are then
summed.  A MACE edge tensor product (``conv_tp``) at max_ell 3 has 10 paths
and a 2560-wide output per edge, so each second-derivative pass (Z*, alpha)
zero-fills and adds ten ``[n_edges, 2560]`` tensors; on CPU this was ~40 % of
the full response.

:func:`rewrite_tensor_products` regenerates each tensor product's fx graph
with e3nn's own code generator and changes only how the blocks are taken
apart and put together:

* all ``x[:, a:b]`` slices of one input become a single ``torch.split``,
  whose backward is one ``cat`` (one allocation, no per-slice fills);
* the final ``torch.cat`` becomes :class:`Concat`, a ``cat`` whose backward
  is one ``torch.split`` (views), so differentiating the backward again costs
  one ``cat`` instead of one full-size fill per path.

Forward values are identical (same ops, same order); gradients are equal up
to the order in which exact zeros are added.  Parameters, buffers and
state-dict keys are unchanged, so checkpoints are unaffected.
"""

from __future__ import annotations

import operator
import warnings
from typing import List, Optional

import torch
from torch import fx

__all__ = ["Concat", "rewrite_tensor_products"]


class _Concat(torch.autograd.Function):
    """``torch.cat`` along ``dim`` whose backward is one differentiable ``split``."""

    @staticmethod
    def forward(ctx, dim: int, *xs: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.sizes = [int(x.shape[dim]) for x in xs]
        return torch.cat(xs, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *torch.split(grad, ctx.sizes, dim=ctx.dim))


class Concat(torch.nn.Module):
    """Concatenate a list along ``dim``; the gradient is split, never zero-filled per block.

    A module rather than a function: a leaf that survives re-tracing when a
    GraphModule is unpickled.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        return _Concat.apply(self.dim, *xs)


def _column_slice(node: fx.Node) -> Optional[tuple]:
    """(start, stop) when ``node`` is ``src[:, start:stop]`` with literal ints, else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None, None, None)):
        return None
    s = idx[1]
    if (not isinstance(s, slice) or s.step not in (None, 1)
            or not isinstance(s.start, int) or not isinstance(s.stop, int)):
        return None
    return (s.start, s.stop)


def _known_width(node: fx.Node) -> Optional[int]:
    """Width of dim 1 when ``node`` is ``x.reshape(-1, D)`` (how e3nn flattens its inputs)."""
    if node.op == "call_method" and node.target == "reshape" and len(node.args) == 3:
        if node.args[1] == -1 and isinstance(node.args[2], int):
            return int(node.args[2])
    return None


def _split_slices(graph: fx.Graph) -> int:
    """Replace the column slices of each flattened input by one ``torch.split``."""
    changed = 0
    for src in list(graph.nodes):
        width = _known_width(src)
        if width is None:
            continue
        users = [(u, _column_slice(u)) for u in src.users if u.args and u.args[0] is src]
        slices = [(u, r) for u, r in users if r is not None]
        if len(slices) < 2:
            continue
        bounds = sorted(set(b for _, r in slices for b in r) | {0, width})
        if bounds[0] < 0 or bounds[-1] > width:
            continue
        pieces = list(zip(bounds[:-1], bounds[1:]))
        # only non-overlapping slices: each must be exactly one of the pieces between the bounds
        if any((r[0], r[1]) not in pieces for _, r in slices):
            continue
        sizes = [b - a for a, b in pieces]
        with graph.inserting_after(src):
            split = graph.call_function(torch.split, (src, sizes), {"dim": 1})
        for u, r in slices:
            with graph.inserting_after(split):
                piece = graph.call_function(operator.getitem, (split, pieces.index(r)))
            u.replace_all_uses_with(piece)
            graph.erase_node(u)
        changed += 1
    return changed


def _replace_cat(gm: fx.GraphModule) -> int:
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.cat:
            xs = node.args[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if not isinstance(xs, (list, tuple)) or len(xs) < 2 or not isinstance(dim, int):
                continue
            name = f"concat_{changed}"
            gm.add_submodule(name, Concat(dim))
            with graph.inserting_after(node):
                new = graph.call_module(name, (list(xs),))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed += 1
    return changed


def _retraceable_empty(graph: fx.Graph) -> None:
    """``torch.empty((), device='cpu')`` (only used for shape broadcasting) -> ``x1.new_empty(())``.

    Unpickling a GraphModule re-traces its code; a factory call without
    traced inputs would then be frozen into a ``_tensor_constant`` buffer and
    change the model's state-dict keys.  ``new_empty`` on the first input is
    traced like any other op.
    """
    first = next(n for n in graph.nodes if n.op == "placeholder")
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.empty and node.args == ((),):
            with graph.inserting_after(first):
                new = graph.call_method("new_empty", (first, ()))
            node.replace_all_uses_with(new)
            graph.erase_node(node)


def _rewritten_left_right(tp) -> Optional[fx.GraphModule]:
    from e3nn.o3._tensor_product._codegen import codegen_tensor_product_left_right

    gm = codegen_tensor_product_left_right(
        tp.irreps_in1,
        tp.irreps_in2,
        tp.irreps_out,
        tp.instructions,
        tp.shared_weights,
        tp._specialized_code,
        tp._optimize_einsums,
    )
    n = _split_slices(gm.graph) + _replace_cat(gm)
    if n == 0:
        return None
    _retraceable_empty(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_tensor_products(model: torch.nn.Module) -> List[str]:
    """Rewrite every e3nn ``TensorProduct`` of ``model`` in place; returns their names.

    Idempotent.  The rewritten graph runs as Python (torch.fx) instead of
    TorchScript; it keeps the module's buffers (Wigner 3j constants) under
    the same names, dtype and device.  Pickling and ``copy.deepcopy`` keep
    working: the rewritten graph is an ordinary submodule, no longer one of
    e3nn's TorchScript code-generation slots.
    """
    from e3nn import o3

    names: List[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, o3.TensorProduct) or getattr(mod, "_macefield_rewritten", False):
            continue
        old = getattr(mod, "_compiled_main_left_right", None)
        if old is None:
            continue
        try:
            gm = _rewritten_left_right(mod)
        except (ImportError, AttributeError, TypeError) as exc:  # another e3nn version: keep its modules
            warnings.warn(f"tensor products left as e3nn built them (rewrite unavailable: {exc})", stacklevel=2)
            return names
        if gm is None:
            continue
        buffers = dict(old.named_buffers())
        if any(bname not in buffers for bname, _ in gm.named_buffers()):
            warnings.warn(f"{name}: regenerated tensor product does not match e3nn's; left as built", stacklevel=2)
            continue
        for bname, _ in list(gm.named_buffers()):
            setattr(gm, bname, buffers[bname])  # share the loaded constants (dtype, device) with the original
        mod.__codegen__ = [n for n in getattr(mod, "__codegen__", []) if n != "_compiled_main_left_right"]
        mod._compiled_main_left_right = gm
        mod._macefield_rewritten = True
        names.append(name)
    return names
