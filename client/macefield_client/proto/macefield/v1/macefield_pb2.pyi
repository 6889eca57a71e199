from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("request_id", "model", "head", "atomic_numbers", "positions", "cell", "pbc", "electric_field", "outputs", "allow_unseen_elements")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    PBC_FIELD_NUMBER: _ClassVar[int]
    ELECTRIC_FIELD_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNSEEN_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    head: str
    atomic_numbers: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[float]
    cell: _containers.RepeatedScalarFieldContainer[float]
    pbc: _containers.RepeatedScalarFieldContainer[bool]
    electric_field: _containers.RepeatedScalarFieldContainer[float]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    allow_unseen_elements: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., head: _Optional[str] = ..., atomic_numbers: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[float]] = ..., cell: _Optional[_Iterable[float]] = ..., pbc: _Optional[_Iterable[bool]] = ..., electric_field: _Optional[_Iterable[float]] = ..., outputs: _Optional[_Iterable[str]] = ..., allow_unseen_elements: _Optional[bool] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("structures",)
    STRUCTURES_FIELD_NUMBER: _ClassVar[int]
    structures: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    def __init__(self, structures: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms", "batch_structures", "batch_atoms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_STRUCTURES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ATOMS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_structures: int
    batch_atoms: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_structures: _Optional[int] = ..., batch_atoms: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "model", "head", "n_atoms", "outputs", "energy", "forces", "stress", "dipole", "polarization", "polarization_quantum", "born_charges", "polarizability", "chi", "eps_inf", "volume", "timing", "extrapolation", "extrapolation_max", "field_extrapolation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    N_ATOMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FIELD_NUMBER: _ClassVar[int]
    STRESS_FIELD_NUMBER: _ClassVar[int]
    DIPOLE_FIELD_NUMBER: _ClassVar[int]
    POLARIZATION_FIELD_NUMBER: _ClassVar[int]
    POLARIZATION_QUANTUM_FIELD_NUMBER: _ClassVar[int]
    BORN_CHARGES_FIELD_NUMBER: _ClassVar[int]
    POLARIZABILITY_FIELD_NUMBER: _ClassVar[int]
    CHI_FIELD_NUMBER: _ClassVar[int]
    EPS_INF_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_MAX_FIELD_NUMBER: _ClassVar[int]
    FIELD_EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    head: str
    n_atoms: int
    outputs: _containers.RepeatedScalarFieldContainer[str]
    energy: float
    forces: _containers.RepeatedScalarFieldContainer[float]
    stress: _containers.RepeatedScalarFieldContainer[float]
    dipole: _containers.RepeatedScalarFieldContainer[float]
    polarization: _containers.RepeatedScalarFieldContainer[float]
    polarization_quantum: _containers.RepeatedScalarFieldContainer[float]
    born_charges: _containers.RepeatedScalarFieldContainer[float]
    polarizability: _containers.RepeatedScalarFieldContainer[float]
    chi: _containers.RepeatedScalarFieldContainer[float]
    eps_inf: _containers.RepeatedScalarFieldContainer[float]
    volume: float
    timing: Timing
    extrapolation: _containers.RepeatedScalarFieldContainer[float]
    extrapolation_max: float
    field_extrapolation: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., head: _Optional[str] = ..., n_atoms: _Optional[int] = ..., outputs: _Optional[_Iterable[str]] = ..., energy: _Optional[float] = ..., forces: _Optional[_Iterable[float]] = ..., stress: _Optional[_Iterable[float]] = ..., dipole: _Optional[_Iterable[float]] = ..., polarization: _Optional[_Iterable[float]] = ..., polarization_quantum: _Optional[_Iterable[float]] = ..., born_charges: _Optional[_Iterable[float]] = ..., polarizability: _Optional[_Iterable[float]] = ..., chi: _Optional[_Iterable[float]] = ..., eps_inf: _Optional[_Iterable[float]] = ..., volume: _Optional[float] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., extrapolation: _Optional[_Iterable[float]] = ..., extrapolation_max: _Optional[float] = ..., field_extrapolation: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("name", "is_default", "extrapolation", "field_reference", "elements")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    FIELD_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    extrapolation: bool
    field_reference: float
    elements: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., extrapolation: _Optional[bool] = ..., field_reference: _Optional[float] = ..., elements: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "is_default", "heads", "default_head", "atomic_numbers", "cutoff", "dtype", "device", "outputs", "units", "trained", "description", "num_parameters", "card_json", "source", "pair_repulsion", "backend", "extrapolation_threshold")
    class UnitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEAD_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PAIR_REPULSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    default_head: str
    atomic_numbers: _containers.RepeatedScalarFieldContainer[int]
    cutoff: float
    dtype: str
    device: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    units: _containers.ScalarMap[str, str]
    trained: bool
    description: str
    num_parameters: int
    card_json: str
    source: str
    pair_repulsion: bool
    backend: str
    extrapolation_threshold: float
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ..., default_head: _Optional[str] = ..., atomic_numbers: _Optional[_Iterable[int]] = ..., cutoff: _Optional[float] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., units: _Optional[_Mapping[str, str]] = ..., trained: _Optional[bool] = ..., description: _Optional[str] = ..., num_parameters: _Optional[int] = ..., card_json: _Optional[str] = ..., source: _Optional[str] = ..., pair_repulsion: _Optional[bool] = ..., backend: _Optional[str] = ..., extrapolation_threshold: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "max_atoms_per_structure", "max_field_magnitude", "max_structures_per_request", "min_distance")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATOMS_PER_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_MAGNITUDE_FIELD_NUMBER: _ClassVar[int]
    MAX_STRUCTURES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MIN_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_atoms_per_structure: int
    max_field_magnitude: float
    max_structures_per_request: int
    min_distance: float
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_atoms_per_structure: _Optional[int] = ..., max_field_magnitude: _Optional[float] = ..., max_structures_per_request: _Optional[int] = ..., min_distance: _Optional[float] = ...) -> None: ...
