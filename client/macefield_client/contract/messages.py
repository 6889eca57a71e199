"""The protobuf mapping: structures to ``PredictRequest``, result arrays to and from ``PredictResponse``,
model descriptions to and from ``ModelInfo`` / ``ListModelsResponse``.

The one place that knows how a numpy result is laid out on the wire
(row-major, float64, shapes from :func:`.outputs.shape`); the server writes
with :func:`response_from_arrays` and :func:`list_models_response`, the
client reads with :func:`arrays_from_response` and :func:`server_info_from_response`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..proto.macefield.v1 import macefield_pb2 as pb
from .outputs import SCALARS, shape, wire_outputs

#: an ASE Atoms, or a mapping with "numbers" (or "atomic_numbers"), "positions" and optionally "cell" and "pbc"
StructureLike = Union[Any, Mapping[str, Any]]


def structure_arrays(structure: StructureLike) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(numbers (N,), positions (N, 3) A, cell (3, 3) A or None, pbc (3,)) of an Atoms or a mapping."""
    cell: Optional[np.ndarray]
    if hasattr(structure, "get_atomic_numbers"):  # ase.Atoms without importing ase
        atoms: Any = structure
        numbers = atoms.get_atomic_numbers()
        positions = atoms.get_positions()
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        cell = np.asarray(atoms.get_cell()[:], dtype=float)
        if not pbc.any() and not np.any(cell):
            cell = None
    elif isinstance(structure, Mapping):
        if "numbers" in structure:
            numbers = structure["numbers"]
        elif "atomic_numbers" in structure:
            numbers = structure["atomic_numbers"]
        else:
            raise ValueError("structure: a mapping needs 'numbers' (atomic numbers) and 'positions'")
        positions = structure["positions"]
        given_cell, given_pbc = structure.get("cell"), structure.get("pbc")
        pbc = np.zeros(3, bool) if given_pbc is None else np.broadcast_to(np.asarray(given_pbc, dtype=bool), (3,))
        cell = None if given_cell is None else np.asarray(given_cell, dtype=float)
    else:
        raise TypeError(f"structure: expected ase.Atoms or a mapping of arrays, got {type(structure).__name__}")
    numbers = np.asarray(numbers).astype(np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=float)
    if positions.shape != (len(numbers), 3):
        raise ValueError(f"positions: expected shape ({len(numbers)}, 3), got {positions.shape}")
    if cell is not None and cell.shape != (3, 3):
        raise ValueError(f"cell: expected shape (3, 3), got {cell.shape}")
    return numbers, positions, cell, pbc


def field_vector(value: Any, name: str = "electric_field") -> np.ndarray:
    """One uniform field (3,) in V/A from three numbers (``None``: zero field).

    Raises ``ValueError`` starting with ``name`` when the value is not three finite numbers.
    """
    try:
        e = np.asarray((0.0, 0.0, 0.0) if value is None else value, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected 3 numbers (V/A), got {value!r}") from None
    if e.shape != (3,):
        raise ValueError(f"{name}: expected 3 components (V/A), got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{name}: every component must be finite, got {e.tolist()}")
    return e


def per_structure_fields(electric_field: Any, n: int) -> np.ndarray:
    """One (3,) field for all ``n`` structures, or one per structure, as an (n, 3) array in V/A."""
    e = np.asarray(electric_field if electric_field is not None else (0.0, 0.0, 0.0), dtype=float)
    if e.shape == (3,):
        return np.tile(field_vector(e), (n, 1))
    if e.shape != (n, 3):
        raise ValueError(f"electric_field: expected (3,) or ({n}, 3), got {e.shape}")
    for row in e:
        field_vector(row)
    return e


def build_request(structure: StructureLike, *, electric_field: Any = (0.0, 0.0, 0.0), outputs: Any = None,
                  model: Optional[str] = None, head: Optional[str] = None,
                  request_id: str = "", allow_unseen_elements: bool = False) -> pb.PredictRequest:
    """A ``PredictRequest`` for one structure (positions A, cell rows A, field V/A).

    ``allow_unseen_elements``: evaluate even when the head was never trained on an element of the structure
    (otherwise the server refuses it; see the proto's ``PredictRequest.head``).
    """
    numbers, positions, cell, pbc = structure_arrays(structure)
    return pb.PredictRequest(
        request_id=request_id,
        model=model or "",
        head=head or "",
        atomic_numbers=numbers.tolist(),
        positions=positions.ravel().tolist(),
        cell=[] if cell is None else cell.ravel().tolist(),
        pbc=pbc.tolist() if pbc.any() else [],
        electric_field=field_vector(electric_field).tolist(),
        outputs=wire_outputs(outputs),
        allow_unseen_elements=bool(allow_unseen_elements),
    )


@dataclass
class Timing:
    """Where one structure's time went on the server (milliseconds) and the batch it was computed in."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    batch_structures: int = 0
    batch_atoms: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return {"queue_ms": self.queue_ms, "compute_ms": self.compute_ms, "total_ms": self.total_ms,
                "batch_structures": self.batch_structures, "batch_atoms": self.batch_atoms}


def response_from_arrays(values: Mapping[str, np.ndarray], *, request_id: str, model: str, head: str,
                         n_atoms: int, timing: Timing) -> pb.PredictResponse:
    """One structure's numpy results (named as in the output table) flattened row-major into a response."""
    response = pb.PredictResponse(request_id=request_id, model=model, head=head, n_atoms=n_atoms,
                                  timing=pb.Timing(**timing.as_dict()))
    packed = bytearray()  # the repeated fields as their wire form: parsed by protobuf's C code in one pass
    for key in sorted(values):
        if key in SCALARS:
            setattr(response, key, float(values[key]))
        else:
            data = np.ascontiguousarray(values[key], dtype="<f8").tobytes()  # row-major, little-endian doubles
            if data:  # an empty field stays unset, as extend([]) leaves it
                packed += _PACKED_TAGS[key] + _varint(len(data)) + data
    if packed:
        response.MergeFromString(bytes(packed))  # appends to the (empty) repeated fields: same as extend()
    response.outputs.extend(sorted(values))
    return response


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: the tag (field number, length-delimited) of each repeated double of PredictResponse
_PACKED_TAGS = {f.name: _varint(f.number << 3 | 2) for f in pb.PredictResponse.DESCRIPTOR.fields
                if f.is_repeated and f.type == f.TYPE_DOUBLE}


def arrays_from_response(response: pb.PredictResponse) -> Dict[str, np.ndarray]:
    """The named float64 arrays of a response, shaped by the output table (unknown names are skipped)."""
    n = response.n_atoms
    values: Dict[str, np.ndarray] = {}
    for key in response.outputs:
        try:
            dims = shape(key, n)
        except KeyError:  # a newer server's output this client does not know
            continue
        if key in SCALARS:
            values[key] = np.asarray(getattr(response, key), dtype=np.float64)[()]  # a numpy float64 scalar
        else:
            values[key] = np.asarray(getattr(response, key), dtype=np.float64).reshape(dims)
    return values


def timing_from_response(response: pb.PredictResponse) -> Timing:
    t = response.timing
    return Timing(queue_ms=t.queue_ms, compute_ms=t.compute_ms, total_ms=t.total_ms,
                  batch_structures=t.batch_structures, batch_atoms=t.batch_atoms)


@dataclass
class ModelInfo:
    """One served model, as ListModels describes it."""

    name: str
    is_default: bool
    heads: List[str]
    default_head: str
    atomic_numbers: List[int]
    cutoff: float  #: A
    dtype: str
    device: str
    outputs: List[str]
    units: Dict[str, str]
    trained: bool
    description: str
    num_parameters: int
    card_json: str
    source: str
    pair_repulsion: bool = False  #: F includes a ZBL short-range repulsion
    backend: str = ""  #: "e3nn" or "cueq" (empty from servers older than this field)
    #: heads with extrapolation statistics (their results carry the grade); empty: none
    extrapolation_heads: List[str] = field(default_factory=list)
    #: grade above which an atom is extrapolating (0 when the model has no statistics)
    extrapolation_threshold: float = 0.0
    #: per head with statistics, E_ref in V/A: the field at which field_extrapolation reaches 1 (+inf: no element
    #: responds to the field; absent: no statistics, or a server older than this field)
    field_references: Dict[str, float] = field(default_factory=dict)
    #: {head: atomic numbers it was trained on} (a request naming no head gets the head that knows its
    #: elements); empty from servers older than this field
    head_elements: Dict[str, List[int]] = field(default_factory=dict)

    def heads_knowing(self, numbers: Sequence[int]) -> List[str]:
        """Heads (in the model's order) trained on every element of ``numbers`` (all heads when unknown)."""
        wanted = set(int(z) for z in numbers)
        return [h for h in self.heads if wanted <= set(self.head_elements.get(h, self.atomic_numbers))]

    def to_proto(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=self.name, is_default=self.is_default,
            heads=[pb.HeadInfo(name=h, is_default=h == self.default_head, extrapolation=h in self.extrapolation_heads,
                               field_reference=self.field_references.get(h, 0.0),
                               elements=list(self.head_elements.get(h, [])))
                   for h in self.heads],
            default_head=self.default_head, atomic_numbers=list(self.atomic_numbers), cutoff=self.cutoff,
            dtype=self.dtype, device=self.device, backend=self.backend, outputs=list(self.outputs),
            units=dict(self.units), trained=self.trained, description=self.description,
            num_parameters=self.num_parameters, card_json=self.card_json, source=self.source,
            pair_repulsion=self.pair_repulsion, extrapolation_threshold=self.extrapolation_threshold)

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(name=m.name, is_default=m.is_default, heads=[h.name for h in m.heads], default_head=m.default_head,
                   atomic_numbers=list(m.atomic_numbers), cutoff=m.cutoff, dtype=m.dtype, device=m.device,
                   outputs=list(m.outputs), units=dict(m.units), trained=m.trained, description=m.description,
                   num_parameters=m.num_parameters, card_json=m.card_json, source=m.source,
                   pair_repulsion=m.pair_repulsion, backend=m.backend,
                   extrapolation_heads=[h.name for h in m.heads if h.extrapolation],
                   head_elements={h.name: list(h.elements) for h in m.heads if h.elements},
                   extrapolation_threshold=m.extrapolation_threshold,
                   field_references={h.name: h.field_reference for h in m.heads
                                     if h.extrapolation and h.field_reference})


@dataclass
class Limits:
    """The bounds a valid request keeps (ListModels)."""

    max_atoms_per_structure: int = 0
    max_field_magnitude: float = 0.0  #: V/A
    max_structures_per_request: int = 0
    min_distance: float = 0.0  #: A: closer atoms are refused


@dataclass
class ServerInfo:
    """What the server serves and the limits that bound valid requests."""

    target: str
    models: List[ModelInfo] = field(default_factory=list)
    max_atoms_per_structure: int = 0
    max_field_magnitude: float = 0.0  #: V/A
    max_structures_per_request: int = 0
    min_distance: float = 0.0  #: A: closer atoms are refused

    @property
    def default_model(self) -> Optional[ModelInfo]:
        for m in self.models:
            if m.is_default:
                return m
        return self.models[0] if self.models else None


def list_models_response(models: Sequence[ModelInfo], limits: Limits) -> pb.ListModelsResponse:
    """The server's ListModels answer."""
    return pb.ListModelsResponse(models=[m.to_proto() for m in models],
                                 max_atoms_per_structure=limits.max_atoms_per_structure,
                                 max_field_magnitude=limits.max_field_magnitude,
                                 max_structures_per_request=limits.max_structures_per_request,
                                 min_distance=limits.min_distance)


def server_info_from_response(target: str, response: pb.ListModelsResponse) -> ServerInfo:
    """The client's view of a ListModels answer from ``target``."""
    return ServerInfo(target=target, models=[ModelInfo.from_proto(m) for m in response.models],
                      max_atoms_per_structure=response.max_atoms_per_structure,
                      max_field_magnitude=response.max_field_magnitude,
                      max_structures_per_request=response.max_structures_per_request,
                      min_distance=response.min_distance)


__all__ = ["StructureLike", "structure_arrays", "field_vector", "per_structure_fields", "build_request", "Timing",
           "response_from_arrays", "arrays_from_response", "timing_from_response", "ModelInfo", "Limits",
           "ServerInfo", "list_models_response", "server_info_from_response"]
