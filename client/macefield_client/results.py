"""Requests from structures, results from responses (numpy, the engine's names and units)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .proto.macefield.v1 import macefield_pb2 as pb

#: every output a request may ask for (PredictRequest.outputs): the one table of names (README, docs/outputs)
OUTPUTS: Tuple[str, ...] = ("energy", "forces", "stress", "dipole", "polarization", "polarization_quantum",
                            "born_charges", "polarizability", "chi", "eps_inf", "volume", "extrapolation",
                            "extrapolation_max")

#: the extrapolation grade (per atom) and its per-structure maximum: they need the model's reference
#: statistics (``macefield-calibrate``) and come with every result of a head that has them (asking
#: for them where there are none is INVALID_ARGUMENT); dimensionless, above
#: :data:`EXTRAPOLATION_THRESHOLD` the atom is extrapolating
GRADE_OUTPUTS: Tuple[str, ...] = ("extrapolation", "extrapolation_max")

#: grade above which an atom's environment lies outside everything the reference (training) set
#: showed the model: its results there are extrapolation (ListModels reports it per model)
EXTRAPOLATION_THRESHOLD = 1.0

#: what a request that names no outputs gets, in every interface (server, Client, ASE, CLI): all of
#: the first derivatives, which one backward pass gives together; Z*, alpha, chi and eps_inf need the
#: second-derivative pass (about 3x the cost of energy + forces) and are computed only when asked for.
#: Every result of a head with statistics also carries the grade (:data:`GRADE_OUTPUTS`), asked for or not
DEFAULT_OUTPUTS: Tuple[str, ...] = ("energy", "forces", "stress", "dipole", "polarization")

#: outputs returned together with another one that was asked for: P is meaningless without its
#: quanta, chi and eps_inf come free with alpha, and every periodic result carries its volume
COMPANIONS: Dict[str, Tuple[str, ...]] = {"polarization": ("polarization_quantum",),
                                          "polarizability": ("chi", "eps_inf"),
                                          "extrapolation": ("extrapolation_max",)}

#: unit of every result array (the same as the server engine's)
UNITS: Dict[str, str] = {
    "energy": "eV",
    "forces": "eV/A",
    "stress": "eV/A^3",
    "dipole": "e*A",
    "polarization": "e/A^2",
    "polarization_quantum": "e/A^2",
    "born_charges": "e",
    "polarizability": "e*A^2/V",
    "chi": "dimensionless",
    "eps_inf": "dimensionless",
    "electric_field": "V/A",
    "volume": "A^3",
    "extrapolation": "dimensionless",
    "extrapolation_max": "dimensionless",
}

_SHAPES = {
    "forces": lambda n: (n, 3),
    "stress": lambda n: (3, 3),
    "dipole": lambda n: (3,),
    "polarization": lambda n: (3,),
    "polarization_quantum": lambda n: (3, 3),
    "born_charges": lambda n: (n, 3, 3),
    "polarizability": lambda n: (3, 3),
    "chi": lambda n: (3, 3),
    "eps_inf": lambda n: (3, 3),
    "extrapolation": lambda n: (n,),
}
_SCALARS = ("energy", "volume", "extrapolation_max")

#: an ASE Atoms, or a mapping with "numbers" (or "atomic_numbers"), "positions"
#: and optionally "cell" and "pbc"
StructureLike = Union[Any, Mapping[str, Any]]


def normalise_outputs(outputs) -> List[str]:
    """None: the server default (:data:`DEFAULT_OUTPUTS`); "all": every output (the grade comes by itself
    where the model has statistics, see :data:`GRADE_OUTPUTS`); a name or a list of names."""
    if outputs is None:
        return []
    if isinstance(outputs, str):
        return [o for o in OUTPUTS if o not in GRADE_OUTPUTS] if outputs == "all" else [outputs]
    return [str(o) for o in outputs]


def structure_arrays(structure: StructureLike):
    """(numbers (N,), positions (N, 3), cell (3, 3) or None, pbc (3,)) of an Atoms or a mapping."""
    if hasattr(structure, "get_atomic_numbers"):  # ase.Atoms without importing ase
        numbers = structure.get_atomic_numbers()
        positions = structure.get_positions()
        pbc = np.asarray(structure.get_pbc(), dtype=bool)
        cell = np.asarray(structure.get_cell()[:], dtype=float)
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
        cell = structure.get("cell")
        pbc = structure.get("pbc")
        pbc = np.zeros(3, bool) if pbc is None else np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
        cell = None if cell is None else np.asarray(cell, dtype=float)
    else:
        raise TypeError(f"structure: expected ase.Atoms or a mapping of arrays, got {type(structure).__name__}")
    numbers = np.asarray(numbers).astype(np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=float)
    if positions.shape != (len(numbers), 3):
        raise ValueError(f"positions: expected shape ({len(numbers)}, 3), got {positions.shape}")
    if cell is not None and cell.shape != (3, 3):
        raise ValueError(f"cell: expected shape (3, 3), got {cell.shape}")
    return numbers, positions, cell, pbc


def field_vector(electric_field) -> List[float]:
    e = np.asarray(electric_field if electric_field is not None else (0.0, 0.0, 0.0), dtype=float).reshape(-1)
    if e.shape != (3,):
        raise ValueError(f"electric_field: expected 3 components (V/A), got shape {e.shape}")
    return e.tolist()


def build_request(structure: StructureLike, *, electric_field=(0.0, 0.0, 0.0), outputs=None, model=None, head=None,
                  request_id: str = "") -> pb.PredictRequest:
    numbers, positions, cell, pbc = structure_arrays(structure)
    return pb.PredictRequest(
        request_id=request_id,
        model=model or "",
        head=head or "",
        atomic_numbers=numbers.tolist(),
        positions=positions.ravel().tolist(),
        cell=[] if cell is None else cell.ravel().tolist(),
        pbc=pbc.tolist() if pbc.any() else [],
        electric_field=field_vector(electric_field),
        outputs=normalise_outputs(outputs),
    )


def per_structure_fields(electric_field, n: int) -> np.ndarray:
    """One (3,) field for all or one per structure -> (n, 3)."""
    e = np.asarray(electric_field if electric_field is not None else (0.0, 0.0, 0.0), dtype=float)
    if e.shape == (3,):
        return np.tile(e, (n, 1))
    if e.shape != (n, 3):
        raise ValueError(f"electric_field: expected (3,) or ({n}, 3), got {e.shape}")
    return e


class Result(Mapping):
    """One structure's results: numpy arrays named and shaped like the engine's ``predict`` output.

    ``energy`` () eV, ``forces`` (N, 3) eV/A, ``stress`` (3, 3) eV/A^3 [periodic],
    ``dipole`` (3,) e*A, ``polarization`` (3,) e/A^2 [periodic] with
    ``polarization_quantum`` (3, 3), ``born_charges`` (N, 3, 3) e,
    ``polarizability`` (3, 3) e*A^2/V, ``chi`` and ``eps_inf`` (3, 3) [periodic],
    ``volume`` () A^3 [periodic], ``extrapolation`` (N,) and ``extrapolation_max``
    () dimensionless [heads with statistics; > 1: extrapolating; +inf for an
    element the statistics have no atoms of].  Outputs not asked for (or not defined for
    the structure) are ``None`` as attributes and absent as mapping keys.
    ``units`` maps each present key to its unit.
    """

    energy: Optional[np.ndarray]
    forces: Optional[np.ndarray]
    stress: Optional[np.ndarray]
    dipole: Optional[np.ndarray]
    polarization: Optional[np.ndarray]
    polarization_quantum: Optional[np.ndarray]
    born_charges: Optional[np.ndarray]
    polarizability: Optional[np.ndarray]
    chi: Optional[np.ndarray]
    eps_inf: Optional[np.ndarray]
    volume: Optional[np.ndarray]
    extrapolation: Optional[np.ndarray]
    extrapolation_max: Optional[np.ndarray]

    FIELDS = OUTPUTS

    def __init__(self, values: Dict[str, np.ndarray], *, model: str = "", head: str = "", n_atoms: int = 0,
                 request_id: str = "", timing: Optional[Dict[str, float]] = None):
        self._values = dict(values)
        for name in self.FIELDS:
            object.__setattr__(self, name, self._values.get(name))
        self.model = model
        self.head = head
        self.n_atoms = n_atoms
        self.request_id = request_id
        self.timing = timing or {}

    @property
    def units(self) -> Dict[str, str]:
        return {k: UNITS[k] for k in self._values}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Result(model={self.model!r}, head={self.head!r}, n_atoms={self.n_atoms}, outputs={sorted(self._values)})"


def result_from_response(response: pb.PredictResponse) -> Result:
    n = response.n_atoms
    values: Dict[str, np.ndarray] = {}
    for key in response.outputs:
        if key in _SCALARS:
            values[key] = np.float64(getattr(response, key))
        elif key in _SHAPES:
            values[key] = np.asarray(getattr(response, key), dtype=np.float64).reshape(_SHAPES[key](n))
    t = response.timing
    timing = {"queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "total_ms": t.total_ms,
              "batch_structures": t.batch_structures, "batch_atoms": t.batch_atoms}
    return Result(values, model=response.model, head=response.head, n_atoms=n, request_id=response.request_id,
                  timing=timing)


@dataclass
class ModelInfo:
    """One served model (ListModels)."""

    name: str
    is_default: bool
    heads: List[str]
    default_head: str
    atomic_numbers: List[int]
    cutoff: float
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


@dataclass
class ServerInfo:
    """What the server serves and the limits that bound valid requests."""

    target: str
    models: List[ModelInfo] = field(default_factory=list)
    max_atoms_per_structure: int = 0
    max_field_magnitude: float = 0.0
    max_structures_per_request: int = 0
    min_distance: float = 0.0  #: A: closer atoms are refused

    @property
    def default_model(self) -> Optional[ModelInfo]:
        for m in self.models:
            if m.is_default:
                return m
        return self.models[0] if self.models else None


def server_info_from_response(target: str, response: pb.ListModelsResponse) -> ServerInfo:
    models = [
        ModelInfo(
            name=m.name, is_default=m.is_default, heads=[h.name for h in m.heads], default_head=m.default_head,
            atomic_numbers=list(m.atomic_numbers), cutoff=m.cutoff, dtype=m.dtype, device=m.device,
            outputs=list(m.outputs), units=dict(m.units), trained=m.trained, description=m.description,
            num_parameters=m.num_parameters, card_json=m.card_json, source=m.source, pair_repulsion=m.pair_repulsion,
            backend=m.backend,
            extrapolation_heads=[h.name for h in m.heads if h.extrapolation],
            extrapolation_threshold=m.extrapolation_threshold,
        )
        for m in response.models
    ]
    return ServerInfo(target=target, models=models, max_atoms_per_structure=response.max_atoms_per_structure,
                      max_field_magnitude=response.max_field_magnitude,
                      max_structures_per_request=response.max_structures_per_request,
                      min_distance=response.min_distance)
