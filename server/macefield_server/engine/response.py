"""Exact response engine: F and its derivatives for a whole batch by autograd.

Given a batched graph and one uniform field per structure, :func:`respond`
runs one forward pass of F(R, E, strain) and then

* one backward pass for everything first-order that was asked for:
  forces = -dF/dR, stress = (1/Omega) dF/d(strain), dipole = -dF/dE;
* if Born charges or polarizability were asked for, a second-derivative
  pass over the whole batch for each Cartesian component of the dipole
  (three batch-wide backward passes, or one ``is_grads_batched`` pass that
  vmaps the three; never a loop over structures) giving
  Z*[k, i, j] = d dipole_i / d R_kj and alpha[g, i, j] = d dipole_i / dE_j
  together.

Because structures in a batch share no edges, d(sum_g dipole_g,i)/dR_k only
sees atom k's own structure, so the batched pass is exact per structure.

The extrapolation grade (``extrapolation``, dimensionless, per atom) comes
from the field-free node features of the same forward pass, and the field
range (``field_extrapolation``, dimensionless, per structure) from the field
and the calibrated susceptibilities (:mod:`.extrapolation`); neither needs a
derivative.

Units: F eV, forces eV/A, stress eV/A^3, dipole e*A, polarization e/A^2,
Z* e, alpha e*A^2/V, chi dimensionless.  Graphs are kept only as long as the
requested order of derivatives needs them (``keep_graph`` for training).
"""

from __future__ import annotations

import functools
from typing import Dict, FrozenSet, List, Optional

import torch

from macefield_client.contract import EPS0

from .extrapolation import field_extrapolation, grade_from_layers, statistics_of

#: the outputs the engine computes; the others a request may name (the contract's output table,
#: :data:`macefield_client.contract.OUTPUTS`) are derived from these and the cell
ENGINE_OUTPUTS: FrozenSet[str] = frozenset(
    {"energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability", "extrapolation",
     "field_extrapolation"}
)
#: derived output -> the engine output it needs (None: only the cell)
DERIVED_FROM: Dict[str, Optional[str]] = {"chi": "polarizability", "eps_inf": "polarizability",
                                          "polarization_quantum": None, "volume": None,
                                          "extrapolation_max": "extrapolation"}
#: computed together: the grade and the field range come from the same statistics, at any request for either
TOGETHER = {"extrapolation": "field_extrapolation", "field_extrapolation": "extrapolation"}


#: second-derivative strategy by device (is CUDA?).  On CPU three batch-wide
#: passes are chosen for memory, not speed: after the tensor-product rewrite the
#: vmapped pass is slightly faster (bench/response_cost.py, 72-atom quartz, 64
#: channels, max_ell 3: loop 1.33 s, vmap 1.27 s; before the rewrite 3.2 s vs
#: 7.1 s), but vmapping the backward materialises three times larger edge
#: intermediates, so its peak memory is about three times the loop's.  No GPU measurement
#: exists yet, so CUDA uses the same default until one says otherwise (bench/gpu_suite.py's
#: engine section times loop against vmap on the GPU; cueq models always take loop).
SECOND_ORDER_DEFAULT = {False: "loop", True: "loop"}


def engine_outputs(requested: FrozenSet[str]) -> FrozenSet[str]:
    """What the engine must compute for ``requested`` names (derived names replaced by their source)."""
    return _engine_outputs(requested if isinstance(requested, frozenset) else frozenset(requested))


@functools.lru_cache(maxsize=512)  # a few distinct output sets, asked for every request
def _engine_outputs(requested: FrozenSet[str]) -> FrozenSet[str]:
    needed = set(requested & ENGINE_OUTPUTS)
    for name in requested & DERIVED_FROM.keys():
        source = DERIVED_FROM[name]
        if source is not None:
            needed.add(source)
    for name in set(needed) & TOGETHER.keys():
        needed.add(TOGETHER[name])
    return frozenset(needed | {"energy"})


def response_tier(outputs: FrozenSet[str]) -> int:
    """Derivative order a request needs.

    0 energy (and the extrapolation grade), 1 first derivatives, 2 Z*/alpha (and chi, eps_inf).
    """
    return _response_tier(outputs if isinstance(outputs, frozenset) else frozenset(outputs))


@functools.lru_cache(maxsize=512)
def _response_tier(outputs: FrozenSet[str]) -> int:
    outputs = engine_outputs(outputs)
    if outputs & {"born_charges", "polarizability"}:
        return 2
    if outputs & {"forces", "stress", "dipole", "polarization"}:
        return 1
    return 0


def respond(
    model,
    graph: Dict[str, torch.Tensor],
    electric_field: Optional[torch.Tensor],
    outputs: FrozenSet[str],
    *,
    keep_graph: bool = False,
    second_order: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """Evaluate F and the requested derivatives for a batched graph.

    Args:
        model: a FieldMACE.
        graph: tensors from :func:`.graph.collate` (or a mace-style batch dict).
        electric_field: (G, 3) or (3,) in V/A; None uses ``graph["electric_field"]`` or zero.
        outputs: names from :data:`ENGINE_OUTPUTS` (derived names such as "chi" are mapped to their source).
        keep_graph: keep the autograd graph of every output (for training losses).
        second_order: how the Z*/alpha pass runs over the three dipole components:
            "vmap" (one ``is_grads_batched`` pass) or "loop" (three batch-wide
            passes); None picks :data:`SECOND_ORDER_DEFAULT` for the device.
            cuEquivariance models (``model.backend == "cueq"``) take "loop" only.
            Known limit: "vmap" with ``keep_graph=True`` can fail with "Batching
            rule not implemented for aten::detach" inside e3nn's TorchScript
            modules once the TorchScript graph optimiser has specialised them
            (seen from the second model built in one process); the trainer
            turns that optimiser off (``run.jit_optimize``), and "loop" is unaffected.

    Returns batched tensors: ``energy`` (G,), ``forces`` (N, 3), ``stress``
    (G, 3, 3), ``dipole`` (G, 3), ``polarization`` (G, 3), ``born_charges``
    (N, 3, 3), ``polarizability`` (G, 3, 3), ``extrapolation`` (N,) float64
    and ``field_extrapolation`` (G,) float64 (together; they need the model's
    statistics, else ValueError), and ``volume`` (G,) with any
    first-order request.  Structures that are not periodic in all three
    directions have no volume: their volume, stress and polarization rows are
    NaN (nothing is divided by zero) and callers drop them.
    """
    dtype = graph["node_attrs"].dtype
    num_graphs = graph["ptr"].numel() - 1
    device = graph["node_attrs"].device
    if electric_field is None:
        electric_field = graph.get("electric_field")
    if electric_field is None:
        electric_field = torch.zeros(num_graphs, 3, dtype=dtype, device=device)
    wide = torch.float64  # geometry, field and strain leaves: derivatives are summed in float64
    field = electric_field.to(device=device, dtype=wide).reshape(-1, 3)
    if field.shape[0] == 1 and num_graphs > 1:
        field = field.expand(num_graphs, 3)
    if field.shape[0] != num_graphs:
        raise ValueError(f"electric_field: {field.shape[0]} fields for {num_graphs} structures")

    cueq = getattr(model, "backend", "e3nn") == "cueq"
    if second_order is None:
        second_order = "loop" if cueq else SECOND_ORDER_DEFAULT[device.type == "cuda"]
    if second_order not in ("vmap", "loop"):
        raise ValueError(f"second_order: expected 'vmap' or 'loop', got {second_order!r}")
    outputs = engine_outputs(frozenset(outputs))
    if second_order == "vmap" and cueq:
        raise ValueError(
            "second_order: 'vmap' is not available on the cueq backend (cuEquivariance's operations have no "
            "vmap batching rule); use 'loop' (three batch-wide passes), its default"
        )
    if "extrapolation" in outputs and statistics_of(model) is None:
        raise ValueError("outputs: extrapolation needs statistics: this model has none (run macefield-calibrate)")
    tier = response_tier(outputs)
    want_forces = "forces" in outputs
    want_stress = "stress" in outputs
    want_dipole = bool(outputs & {"dipole", "polarization", "born_charges", "polarizability"})
    want_becs = "born_charges" in outputs
    want_alpha = "polarizability" in outputs

    positions = graph["positions"].detach().clone().to(wide)
    field = field.detach().clone()
    strain = torch.zeros(num_graphs, 3, 3, dtype=wide, device=device) if want_stress else None

    positions.requires_grad_(want_forces or want_becs)
    field.requires_grad_(want_dipole)
    if strain is not None:
        strain.requires_grad_(True)

    result: Dict[str, torch.Tensor] = {}
    grad_enabled = keep_graph or tier > 0
    with torch.set_grad_enabled(grad_enabled):
        if "extrapolation" in outputs:  # the grade reads the field-free node features of this very pass
            layers: list = []
            energy, _ = model.enthalpy(graph, positions, field, strain, field_free_features=layers)
            result["extrapolation"] = grade_from_layers(model, graph, layers)
            result["field_extrapolation"] = field_extrapolation(model, graph, field)
            del layers
        else:
            energy, _ = model.enthalpy(graph, positions, field, strain)
        result["energy"] = energy
        if tier == 0:
            return _finish(result, keep_graph)

        inputs, names = [], []
        if want_forces or want_becs:
            inputs.append(positions)
            names.append("positions")
        if strain is not None:
            inputs.append(strain)
            names.append("strain")
        if want_dipole:
            inputs.append(field)
            names.append("field")
        second = tier == 2
        first = torch.autograd.grad(
            energy.sum(),
            inputs,
            create_graph=second or keep_graph,
            retain_graph=second or keep_graph,
            allow_unused=True,
        )
        grads: Dict[str, torch.Tensor] = {
            n: (g if g is not None else torch.zeros_like(x)) for n, g, x in zip(names, first, inputs)
        }

        if want_forces:
            result["forces"] = -grads["positions"]
        volume, periodic = _volumes(graph)
        # finite systems have no volume: their per-volume quantities are NaN, never x/0
        per_volume = torch.where(periodic, 1.0 / torch.where(periodic, volume, 1.0), torch.nan)
        if want_stress:
            result["stress"] = grads["strain"] * per_volume.view(-1, 1, 1)
        if want_dipole:
            dipole = -grads["field"]
            result["dipole"] = dipole
        if "polarization" in outputs:
            result["polarization"] = dipole * per_volume.view(-1, 1)
        result["volume"] = torch.where(periodic, volume, torch.nan)

        if second:
            second_inputs = ([positions] if want_becs else []) + ([field] if want_alpha else [])
            eye = torch.eye(3, dtype=dipole.dtype, device=device)
            seeds = eye.view(3, 1, 3).expand(3, num_graphs, 3)
            # grad(..., allow_unused=True) gives None for an input the dipole does not depend on
            d2: List[Optional[torch.Tensor]]
            if not dipole.requires_grad:  # dipole independent of everything (no field layers)
                d2 = [None] * len(second_inputs)
            elif second_order == "vmap":
                d2 = list(torch.autograd.grad(
                    dipole,
                    second_inputs,
                    grad_outputs=seeds,
                    is_grads_batched=True,
                    create_graph=keep_graph,
                    retain_graph=keep_graph,
                    allow_unused=True,
                ))
            else:  # three batch-wide passes, one per dipole component (never per structure)
                per_component = [
                    torch.autograd.grad(
                        dipole,
                        second_inputs,
                        grad_outputs=seeds[i],
                        create_graph=keep_graph,
                        retain_graph=keep_graph or i < 2,
                        allow_unused=True,
                    )
                    for i in range(3)
                ]
                d2 = [
                    None if per_component[0][n] is None else torch.stack([c[n] for c in per_component])
                    for n in range(len(second_inputs))
                ]
            derivatives = [
                torch.zeros((3,) + x.shape, dtype=x.dtype, device=device) if g is None else g
                for g, x in zip(d2, second_inputs)
            ]
            # derivatives[.][i, ...] holds the derivative of dipole component i
            if want_becs:
                result["born_charges"] = derivatives.pop(0).permute(1, 0, 2)  # (N, i, j)
            if want_alpha:
                result["polarizability"] = derivatives.pop(0).permute(1, 0, 2)  # (G, i, j)
    return _finish(result, keep_graph)


def _volumes(graph):
    """(volume, periodic) per structure; a mace-style batch without them counts as periodic."""
    if "volume" in graph and "periodic" in graph:
        return graph["volume"], graph["periodic"]
    volume = torch.linalg.det(graph["cell"].view(-1, 3, 3)).abs()
    return volume, volume > 0


def _finish(result: Dict[str, torch.Tensor], keep_graph: bool) -> Dict[str, torch.Tensor]:
    if keep_graph:
        return result
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}


def susceptibility(polarizability: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """chi = alpha / (Omega * eps0), dimensionless; eps_inf = 1 + chi."""
    return polarizability / (volume.view(-1, 1, 1) * EPS0)
