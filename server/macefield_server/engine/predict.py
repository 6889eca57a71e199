"""From structures to per-structure numpy results: the engine used by scripts and the server.

:func:`prepare_batch` (neighbour lists + tensor assembly, CPU) and
:func:`evaluate` (one :func:`.response.respond` call, then a split into one
dict per structure) are separate so that the server can assemble the next
batch while the current one computes.  :func:`predict` chains them.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence

import numpy as np
import torch

from macefield_client.contract import COMPANIONS, GRADE_OUTPUTS, resolve_outputs

from ..batch_limits import auto_limits
from .graph import GraphBatch, Structure, collate, neighbour_list

from .extrapolation import calibrated_heads
from .response import engine_outputs, respond, susceptibility


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def head_name(model, head: Optional[str], default: Optional[str] = None) -> str:
    """The name of the head :func:`head_index` resolves ``head`` to."""
    return list(getattr(model, "heads", None) or ["Default"])[head_index(model, head, default)]


def head_index(model, head: Optional[str], default: Optional[str] = None) -> int:
    """Index of ``head`` in the model's heads (None: ``default``, else the first head)."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    name = head if head not in (None, "") else default
    if name in (None, ""):
        return 0
    if name not in heads:
        raise ValueError(f"head: unknown head {name!r}; the model has {heads}")
    return heads.index(name)


def prepare_batch(
    model,
    structures: Sequence[Structure],
    *,
    default_head: Optional[str] = None,
    device=None,
    graphs: Optional[Sequence] = None,
) -> GraphBatch:
    """Neighbour lists (unless given) and tensors for ``structures`` (ValueError names a bad field)."""
    if graphs is None:
        r_max = float(model.r_max)
        graphs = [neighbour_list(s, r_max) for s in structures]
    return collate(
        structures,
        graphs,
        atomic_numbers=[int(z) for z in model.atomic_numbers],
        head_index=[head_index(model, s.head, default_head) for s in structures],
        dtype=model_dtype(model),
        device=device if device is not None else model_device(model),
    )


def evaluate(model, batch: GraphBatch, outputs: FrozenSet[str]) -> List[Dict[str, np.ndarray]]:
    """Run the response engine on a prepared batch and split per structure.

    ``outputs``: requested names (see :func:`macefield_client.contract.resolve_outputs`).
    Keys (present when asked, or a companion of what was asked, and defined):
    energy () eV, forces (N, 3) eV/A, stress (3, 3) eV/A^3 [periodic], dipole
    (3,) e*A, polarization (3,) e/A^2 [periodic] with polarization_quantum
    (3, 3) e/A^2 (row k = e*a_k/Omega: P is defined modulo integer
    combinations of these rows), born_charges (N, 3, 3) e, polarizability
    (3, 3) e*A^2/V, chi (3, 3) and eps_inf (3, 3) [periodic, with
    polarizability], volume () A^3 [periodic, always], extrapolation (N,),
    extrapolation_max () and field_extrapolation () dimensionless [together;
    structures on heads with statistics only].  field_extrapolation is
    |E| / E_ref for the structure's head and elements: above 1 the field
    displaces ions further than the thermal spread of the reference frames.
    """
    raw = respond(model, batch.tensors, None, engine_outputs(outputs))
    graded = graded_head_indices(model)
    return [keep_requested(r, outputs) for r in split_results(batch, raw, engine_outputs(outputs), graded)]


def graded_head_indices(model) -> FrozenSet[int]:
    """Indices of the heads whose results carry the extrapolation grade (those with statistics)."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    return frozenset(heads.index(h) for h in calibrated_heads(model))


class NonFiniteResult(ArithmeticError):
    """The model produced a non-finite number (NaN or inf) for a structure; nothing of it is returned."""


def non_finite(result: Dict[str, np.ndarray]) -> List[str]:
    """Names of the outputs in ``result`` that hold a NaN or an infinity (the grade may be +inf: no reference atoms)."""
    bad = []
    with np.errstate(over="ignore"):  # a sum of huge finite values may overflow: then each value is checked
        for k, v in result.items():
            if k in GRADE_OUTPUTS:
                total = float(v.sum())  # neither NaN nor -inf: v holds no NaN and no -inf (either would show)
                if (total != total or total == -math.inf) and (np.isnan(v).any() or (v == -np.inf).any()):
                    bad.append(k)
            elif not math.isfinite(v.sum()) and not np.isfinite(v).all():  # a finite sum: all values finite
                bad.append(k)
    return sorted(bad)


def check_finite(result: Dict[str, np.ndarray], graph=None, numbers=None) -> Dict[str, np.ndarray]:
    """``result`` if every value is finite, else :class:`NonFiniteResult` naming the outputs (and the closest atoms)."""
    bad = non_finite(result)
    if not bad:
        return result
    hint = ""
    if graph is not None and getattr(graph, "closest", None) is not None:
        hint = f"; closest pair: {graph.closest.describe(numbers)}"
    raise NonFiniteResult(f"the model produced non-finite {', '.join(bad)} for this structure{hint}")


@functools.lru_cache(maxsize=256)
def returned_outputs(outputs: FrozenSet[str]) -> FrozenSet[str]:
    """The keys a result for ``outputs`` carries when defined: those asked for, their companions, energy, volume."""
    keep = {"energy", "volume"} | set(outputs)
    for name in outputs:
        keep.update(COMPANIONS.get(name, ()))
    return frozenset(keep)


def keep_requested(result: Dict[str, np.ndarray], outputs: FrozenSet[str]) -> Dict[str, np.ndarray]:
    """Drop what a pass computed beyond ``outputs`` (e.g. for other requests of its batch)."""
    keep = returned_outputs(outputs if isinstance(outputs, frozenset) else frozenset(outputs))
    return {k: v for k, v in result.items() if k in keep}


#: the engine outputs :func:`split_results` hands out (the rest of the raw dict stays on its device)
_SPLIT_KEYS = frozenset({"energy", "forces", "dipole", "born_charges", "polarizability", "extrapolation",
                         "field_extrapolation", "stress", "polarization"})


def split_results(batch: GraphBatch, raw: Dict[str, torch.Tensor], outputs: FrozenSet[str],
                  graded_heads: Optional[FrozenSet[int]] = None):
    """Cut batched engine output into one numpy dict per structure (every key the engine outputs define).

    ``graded_heads``: head indices whose structures get the extrapolation grade when it was computed (None: all).
    """
    host = {k: v.detach().cpu().double().numpy() for k, v in raw.items()
            if k in _SPLIT_KEYS and isinstance(v, torch.Tensor)}  # only what is handed out: fewer copies
    chi = None
    if "polarizability" in outputs:  # tier 2 always reports volume (NaN when not periodic)
        chi = susceptibility(raw["polarizability"], raw["volume"]).detach().cpu().double().numpy()
    heads = batch.tensors["head"].tolist()
    results = []
    start = 0
    for g, n in enumerate(batch.n_atoms):
        stop = start + n
        periodic = batch.periodic[g]
        r: Dict[str, np.ndarray] = {"energy": np.asarray(host["energy"][g])}
        if "forces" in outputs:
            r["forces"] = host["forces"][start:stop]
        if "dipole" in host:
            r["dipole"] = host["dipole"][g]
        if "born_charges" in outputs:
            r["born_charges"] = host["born_charges"][start:stop]
        if "polarizability" in outputs:
            r["polarizability"] = host["polarizability"][g]
        if "extrapolation" in host and (graded_heads is None or heads[g] in graded_heads):
            r["extrapolation"] = host["extrapolation"][start:stop]
            r["extrapolation_max"] = np.asarray(r["extrapolation"].max())
            r["field_extrapolation"] = np.asarray(host["field_extrapolation"][g])
        if periodic:
            volume = batch.volumes[g]
            r["volume"] = np.asarray(volume)
            r["polarization_quantum"] = batch.cells[g] / volume
            if "stress" in outputs:
                r["stress"] = host["stress"][g]
            if "polarization" in outputs:
                r["polarization"] = host["polarization"][g]
            if chi is not None:
                r["chi"] = chi[g]
                r["eps_inf"] = np.eye(3) + chi[g]
        results.append(r)
        start = stop
    return results


def predict(
    model,
    atoms_list,
    *,
    electric_fields=None,
    heads=None,
    outputs: Optional[Iterable[str]] = None,
    batch_size: Optional[int] = None,
    max_edges="auto",
) -> List[Dict[str, np.ndarray]]:
    """Evaluate F and its derivatives for ASE ``Atoms`` (or :class:`Structure`) objects.

    Args:
        model: a FieldMACE (see :func:`load_model`).
        atoms_list: one Atoms/Structure or a sequence of them.
        electric_fields: None (zero field), one (3,) field for all, or (n, 3), V/A.
        heads: None (default head), one head name for all, or one per structure.
        outputs: names from the output table (energy, forces, stress, dipole,
            polarization, polarization_quantum, born_charges, polarizability,
            chi, eps_inf, volume, extrapolation, extrapolation_max,
            field_extrapolation; None: all).  chi and eps_inf also come with polarizability,
            polarization_quantum with polarization, for periodic structures.
            The extrapolation grade and the field range come with every
            structure whose head has statistics (asking for them on another
            head: ValueError).
        batch_size: at most this many structures per engine pass (None: no count limit).
        max_edges: at most this many graph edges per engine pass (a larger
            structure gets a pass of its own); "auto": the CPU pass size of
            :data:`macefield_server.batch_limits.AUTO_LIMITS` on CPU (the server's too), one pass
            on a GPU; None: unlimited.

    Returns one dict per structure; see :func:`evaluate` for keys and units.
    Raises :class:`NonFiniteResult` naming the structure (and its closest atoms)
    if the model produces a NaN or infinity, e.g. for overlapping atoms.
    """
    if isinstance(atoms_list, Structure) or hasattr(atoms_list, "get_positions"):
        atoms_list = [atoms_list]
    atoms_list = list(atoms_list)
    n = len(atoms_list)
    fields = np.zeros((n, 3)) if electric_fields is None else np.asarray(electric_fields, dtype=float)
    if fields.shape == (3,):
        fields = np.tile(fields, (n, 1))
    if fields.shape != (n, 3):
        raise ValueError(f"electric_fields: expected (3,) or ({n}, 3), got {fields.shape}")
    if heads is None or isinstance(heads, str):
        heads = [heads] * n
    if len(heads) != n:
        raise ValueError(f"heads: {len(heads)} heads for {n} structures")
    wanted = resolve_outputs(outputs)

    structures = []
    for item, f, h in zip(atoms_list, fields, heads):
        if isinstance(item, Structure):
            structures.append(Structure(item.numbers, item.positions, item.cell, item.pbc, f, h or item.head))
        else:
            structures.append(Structure.from_atoms(item, electric_field=f, head=h))
    graded = calibrated_heads(model)
    if wanted & GRADE_OUTPUTS:
        missing = sorted({head_name(model, s.head) for s in structures} - set(graded))
        if missing:
            raise ValueError(f"outputs: {', '.join(sorted(wanted & GRADE_OUTPUTS))} need(s) statistics, "
                             f"and head(s) {missing} have none (run macefield-calibrate)")
    if graded:
        wanted = wanted | GRADE_OUTPUTS

    if max_edges == "auto":
        max_edges = None if model_device(model).type == "cuda" else auto_limits("cpu")[1]
    r_max = float(model.r_max)
    graphs = [neighbour_list(s, r_max) for s in structures]
    results: List[Dict[str, np.ndarray]] = []
    for chunk in _passes(graphs, batch_size, max_edges):
        batch = prepare_batch(model, [structures[i] for i in chunk], graphs=[graphs[i] for i in chunk])
        for i, r in zip(chunk, evaluate(model, batch, wanted)):
            try:
                results.append(check_finite(r, graphs[i], structures[i].numbers))
            except NonFiniteResult as exc:
                raise NonFiniteResult(f"structure {i}: {exc}") from None
    return results


def _passes(graphs, batch_size: Optional[int], max_edges: Optional[int]) -> List[List[int]]:
    """Consecutive index groups within the structure and edge limits (order kept)."""
    groups: List[List[int]] = []
    current: List[int] = []
    edges = 0
    for i, g in enumerate(graphs):
        e = int(g.edge_index.shape[1])
        full = (batch_size is not None and len(current) >= batch_size) or (
            max_edges is not None and current and edges + e > max_edges
        )
        if full:
            groups.append(current)
            current, edges = [], 0
        current.append(i)
        edges += e
    if current:
        groups.append(current)
    return groups
