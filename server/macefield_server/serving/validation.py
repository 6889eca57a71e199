"""Turn a ``PredictRequest`` message into a checked :class:`Structure` (or say which field is wrong).

Every check raises :class:`InvalidRequest` whose message starts with the
offending field's name (``positions: ...``); the service answers it with
INVALID_ARGUMENT and keeps serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import FrozenSet

import numpy as np
from macefield_client.contract import GRADE_OUTPUTS, clip, resolve_outputs

from .config import LimitsConfig
from .memory import fmt
from ..engine.graph import MIN_VOLUME, ClosestPair, Structure, element_symbol, estimate_edges
from ..engine.response import response_tier
from .registry import ModelRegistry, ServedModel

MAX_REQUEST_ID = 256
MAX_NAME = 256  #: characters of a model or head name
MAX_OUTPUTS = 32  #: entries of PredictRequest.outputs
MAX_COORDINATE = 1e7  #: Angstrom; beyond it wrapping and distances lose all precision


class InvalidRequest(ValueError):
    """A request field is invalid; ``str(exc)`` starts with the field name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

    def prefixed(self, prefix: str) -> "InvalidRequest":
        """Same error for a structure inside a batch (``structures[3].positions: ...``)."""
        field, _, message = str(self).partition(": ")
        return type(self)(f"{prefix}{field}", message)


class TooLarge(InvalidRequest):
    """A valid structure whose estimated memory does not fit the budget (RESOURCE_EXHAUSTED, not INVALID_ARGUMENT)."""


@dataclass
class ParsedRequest:
    """A validated request: which model and head, the structure, the outputs."""

    request_id: str
    served: ServedModel
    head: str
    head_index: int
    structure: Structure
    outputs: FrozenSet[str]
    edges: int = 0  #: directed edges, an upper bound (exact when it mattered), counted before any neighbour list

    @property
    def tier(self) -> int:
        return response_tier(self.outputs)

    @property
    def n_atoms(self) -> int:
        return self.structure.n_atoms


def _floats(values, field: str, sizes, what: str, finite: bool = True) -> np.ndarray:
    """``values`` as float64, refused naming ``field`` unless their count is in ``sizes`` (and, with ``finite``,
    all are finite: see :func:`_non_finite`)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size not in sizes:
        raise InvalidRequest(field, f"expected {what}, got {array.size} values")
    if finite and not np.isfinite(array).all():
        _non_finite(array, field)
    return array


def _non_finite(array: np.ndarray, field: str) -> None:
    """Raise naming the first non-finite value of ``array`` (if there is one)."""
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise InvalidRequest(field, f"non-finite value {array[bad]} at index {bad}")


def too_dense(edges: int, cutoff: float, limits: LimitsConfig, prefix: str = "") -> InvalidRequest:
    return InvalidRequest(
        "positions",
        f"{prefix}{edges} neighbour pairs within {cutoff:g} A (limit {limits.max_edges_per_structure}): "
        "the structure is collapsed or far too dense",
    )


def too_close(closest: ClosestPair, structure: Structure, limits: LimitsConfig) -> InvalidRequest:
    return InvalidRequest(
        "positions",
        f"{closest.describe(structure.numbers)}, closer than limits.min_distance = {limits.min_distance:g} A "
        "(overlapping or collapsed atoms)",
    )


def _elements(numbers, most: int = 12) -> str:
    shown = ", ".join(f"{element_symbol(int(z))} ({int(z)})" for z in list(numbers)[:most])
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


def choose_head(served: ServedModel, named: str, numbers: np.ndarray, allow_unseen: bool = False) -> str:
    """The head a structure of ``numbers`` is computed with (``named``: the request's head, may be empty).

    No head named: the head trained on every element of the structure; when several are, the default head
    if it is one of them, else the first in the model's order.  A head (named or chosen) that was never
    trained on one of the elements is refused naming them and the heads that know them, unless
    ``allow_unseen`` (then, with no head named, the default head).
    """
    present = sorted(set(np.asarray(numbers).tolist()))
    knowing = served.heads_knowing(present)
    if named:
        head = named
    elif served.default_head in knowing or not knowing:
        head = served.default_head
    else:
        head = knowing[0]
    if allow_unseen or head in knowing:
        return head
    unseen = [z for z in present if z not in served.head_elements[head]]
    who = {z: [h for h in served.heads if z in served.head_elements[h]] for z in unseen}
    known_by = "; ".join(f"{element_symbol(z)}: {', '.join(who[z]) if who[z] else 'no head'}" for z in unseen)
    if named:
        hint = f"heads trained on all of them: {', '.join(knowing)}" if knowing else \
            "no head of this model was trained on all of them"
    else:
        hint = "no head of this model was trained on all of them (none was named)"
    raise InvalidRequest(
        "atomic_numbers",
        f"element(s) {_elements(unseen)} never seen in training by head {head!r} of model {served.name!r} "
        f"(heads that know them: {known_by}); {hint}. Its results would not be physical; name another head, "
        "or set allow_unseen_elements to evaluate anyway",
    )


def parse_request(request, registry: ModelRegistry, limits: LimitsConfig) -> ParsedRequest:
    """Validate one PredictRequest against the served models and the limits."""
    for field, value, limit in (("request_id", request.request_id, MAX_REQUEST_ID), ("model", request.model, MAX_NAME),
                                ("head", request.head, MAX_NAME)):
        if len(value) > limit:
            raise InvalidRequest(field, f"{len(value)} characters, more than {limit} ({clip(value)!r})")
    if len(request.outputs) > MAX_OUTPUTS:
        raise InvalidRequest("outputs", f"{len(request.outputs)} entries, more than {MAX_OUTPUTS}")
    try:
        served = registry.get(request.model)
    except ValueError:
        raise InvalidRequest("model", f"unknown model {clip(request.model)!r}; served: {registry.names()}") from None
    if request.head and request.head not in served.heads:
        raise InvalidRequest("head",
                             f"unknown head {clip(request.head)!r} for model {served.name!r}; heads: {served.heads}")
    numbers = np.asarray(request.atomic_numbers, dtype=np.int64)
    n = int(numbers.size)
    if n == 0:
        raise InvalidRequest("atomic_numbers", "a structure needs at least one atom")
    if n > limits.max_atoms_per_structure:
        raise InvalidRequest(
            "atomic_numbers", f"{n} atoms exceed the server's maximum of {limits.max_atoms_per_structure} per structure"
        )
    present = np.unique(numbers)  # sorted; one pass in C instead of a Python loop over the atoms
    unknown = [z for z in present.tolist() if z not in served.atomic_numbers]
    if unknown:
        raise InvalidRequest(
            "atomic_numbers",
            f"element(s) {_elements(unknown)} not in model {served.name!r} "
            f"(it has {_elements(sorted(served.atomic_numbers))})",
        )
    head = choose_head(served, request.head, present, request.allow_unseen_elements)

    try:
        outputs = resolve_outputs(list(request.outputs))
    except ValueError as exc:
        raise InvalidRequest("outputs", str(exc).partition(": ")[2]) from None
    if head in served.extrapolation_heads:  # the grade comes with every result of a calibrated head
        outputs = outputs | GRADE_OUTPUTS
    elif outputs & GRADE_OUTPUTS:
        raise InvalidRequest(
            "outputs",
            f"extrapolation and field_extrapolation: model {served.name!r} has no extrapolation statistics for "
            f"head {head!r} "
            f"(heads with statistics: {served.extrapolation_heads or 'none'}); add them with macefield-calibrate",
        )

    positions = _floats(request.positions, "positions", {3 * n}, f"3*N = {3 * n} values (N = {n} atoms), Angstrom",
                        finite=False)
    top = float(np.abs(positions).max())  # NaN if any value is NaN: one pass for both checks
    if not top <= MAX_COORDINATE:
        _non_finite(positions, "positions")  # refused here, as before the cell's checks; else too large (below)

    flags = list(request.pbc)
    if len(flags) not in (0, 3):
        raise InvalidRequest("pbc", f"expected 0 or 3 flags, got {len(flags)}")
    pbc = np.array(flags or (False, False, False), dtype=bool)
    periodic_any, periodic_all = any(flags), bool(flags) and all(flags)
    # the 3x3 cell and the 3-vector field in Python floats: numpy's per-call cost is most of these checks' time
    rows = list(request.cell)
    if len(rows) not in (0, 9):
        raise InvalidRequest("cell", f"expected 0 or 9 values (3x3 lattice vectors as rows, Angstrom), "
                                     f"got {len(rows)} values")
    if not all(map(math.isfinite, rows)):
        _non_finite(np.asarray(rows, dtype=np.float64), "cell")
    cell = np.zeros((3, 3)) if not rows else np.array(rows, dtype=np.float64).reshape(3, 3)
    volume = None
    if periodic_any:
        if periodic_all:
            volume = float(abs(np.linalg.det(cell)))  # Structure.volume's own expression: cached there
            singular = volume < MIN_VOLUME
        else:
            singular = np.linalg.svd(cell[pbc], compute_uv=False).min() < 1e-6
        if singular:
            raise InvalidRequest("cell", f"singular cell (lattice vectors {cell.tolist()}) with pbc {pbc.tolist()}")

    if top > MAX_COORDINATE:
        raise InvalidRequest("positions", f"|coordinate| above {MAX_COORDINATE:g} Angstrom")
    if periodic_any:
        # hypot: finite however large (a float's ** 2 raises OverflowError above ~1.3e154)
        longest = max(math.hypot(rows[3 * k], rows[3 * k + 1], rows[3 * k + 2]) for k in range(3) if flags[k])
        if longest > limits.max_extent:
            raise InvalidRequest(
                "cell",
                f"a periodic lattice vector of {longest:.6g} A exceeds the server's limit of {limits.max_extent:g} A"
            )
    if not periodic_all:  # the spread along non-periodic directions sets the neighbour search's box
        q = np.linalg.qr(cell[pbc].T)[0] if periodic_any else np.zeros((3, 0))
        points = positions.reshape(n, 3)
        spread = float(np.ptp(points - (points @ q) @ q.T, axis=0).max())
        if spread > limits.max_extent:
            raise InvalidRequest(
                "positions",
                f"atoms spread over {spread:.6g} A along non-periodic directions (limit {limits.max_extent:g} A)",
            )

    field_values = list(request.electric_field)
    if len(field_values) not in (0, 3):
        raise InvalidRequest("electric_field", f"expected 0 or 3 values, V/Angstrom, got {len(field_values)} values")
    if not all(map(math.isfinite, field_values)):
        _non_finite(np.asarray(field_values, dtype=np.float64), "electric_field")
    efield = np.array(field_values or (0.0, 0.0, 0.0), dtype=np.float64)
    magnitude = math.hypot(*field_values)
    if magnitude > limits.max_field:
        raise InvalidRequest(
            "electric_field", f"|E| = {magnitude:.6g} V/A exceeds the server's limit of {limits.max_field:g} V/A"
        )

    structure = Structure.of_arrays(numbers, positions.reshape(n, 3), cell, pbc, efield, head, volume=volume)
    # counted (exactly once the cheap bound passes the limit) before any neighbour list is built; the limit is
    # also what the memory budget allows, so that a structure near it is counted, not refused on a bound
    tier = response_tier(outputs)
    limit = limits.max_edges_per_structure
    if served.memory is not None and served.budget is not None:
        limit = max(1, min(limit, served.memory.max_edges(tier, n, served.budget.per_pass)))
    edges = estimate_edges(structure, served.cutoff, limit)
    if edges > limits.max_edges_per_structure:
        raise too_dense(edges, served.cutoff, limits, "at most ")
    if served.memory is not None and served.budget is not None:
        needed = served.memory.estimate(tier, edges, n)
        if needed > served.budget.per_pass:
            raise too_large(needed, tier, edges, n, served)
    return ParsedRequest(
        request_id=request.request_id,
        served=served,
        head=head,
        head_index=served.heads.index(head),
        structure=structure,
        outputs=outputs,
        edges=int(edges),
    )


#: what each output tier computes, for messages
TIER_NAMES = {0: "the energy", 1: "first derivatives (forces, stress, dipole)", 2: "Born charges / polarizability"}


def too_large(needed: int, tier: int, edges: int, atoms: int, served: ServedModel) -> TooLarge:
    memory, budget = served.memory, served.budget
    assert memory is not None and budget is not None, "only a model with a measured memory model can be too large"
    cheaper = ""
    if tier > 0:
        cheaper = f"; {TIER_NAMES[tier - 1]} alone would need about {fmt(memory.estimate(tier - 1, edges, atoms))}"
    return TooLarge(
        "positions",
        f"computing {TIER_NAMES[tier]} for {edges} neighbour pairs needs about {fmt(needed)} of memory "
        f"(measured at warm-up on {served.device}), more than one pass may use here: {fmt(budget.per_pass)} "
        f"of limits.memory_budget = {fmt(budget.total)}{cheaper}",
    )


#: doubles per atom of each per-atom output in an answer
_PER_ATOM = {"forces": 3, "born_charges": 9, "extrapolation": 1}


def response_bytes(parsed: ParsedRequest) -> int:
    """An upper estimate of the bytes of this request's answer (packed doubles, 8 bytes each, plus framing)."""
    per_atom = sum(k for name, k in _PER_ATOM.items() if name in parsed.outputs) + 1  # +1: the grade, when served
    return 8 * (parsed.n_atoms * per_atom + 64) + 512
