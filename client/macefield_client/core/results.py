"""Results of the thin client: :class:`Result` (numpy arrays named and shaped by the output table).

The output table and the protobuf mapping are the wire contract's (:mod:`macefield_client.contract`); the
names below are re-exported from it for scripts that import them from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from ..contract.messages import (
    ModelInfo,
    ServerInfo,
    StructureLike,
    arrays_from_response,
    build_request,
    field_vector,
    per_structure_fields,
    server_info_from_response,
    structure_arrays,
    timing_from_response,
)
from ..contract.outputs import (
    ALL_OUTPUTS,
    COMPANIONS,
    DEFAULT_OUTPUTS,
    EXTRAPOLATION_THRESHOLD,
    GRADE_OUTPUTS,
    OUTPUTS,
    UNITS,
)
from ..proto.macefield.v1 import macefield_pb2 as pb


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

    energy: np.ndarray | None
    forces: np.ndarray | None
    stress: np.ndarray | None
    dipole: np.ndarray | None
    polarization: np.ndarray | None
    polarization_quantum: np.ndarray | None
    born_charges: np.ndarray | None
    polarizability: np.ndarray | None
    chi: np.ndarray | None
    eps_inf: np.ndarray | None
    volume: np.ndarray | None
    extrapolation: np.ndarray | None
    extrapolation_max: np.ndarray | None

    FIELDS = OUTPUTS

    def __init__(self, values: dict[str, np.ndarray], *, model: str = "", head: str = "", n_atoms: int = 0,
                 request_id: str = "", timing: dict[str, float] | None = None):
        self._values = dict(values)
        for name in self.FIELDS:
            object.__setattr__(self, name, self._values.get(name))
        self.model = model
        self.head = head
        self.n_atoms = n_atoms
        self.request_id = request_id
        self.timing = timing or {}

    def require(self, name: str) -> np.ndarray:
        """Output ``name``; ValueError naming it when this result has none (not asked for, or not defined for
        the structure)."""
        value = self._values.get(name)
        if value is None:
            raise ValueError(f"result of model {self.model!r}, head {self.head!r} has no {name!r} (outputs: "
                             f"{sorted(self._values)}): ask for it in outputs=")
        return value

    @property
    def units(self) -> dict[str, str]:
        return {k: UNITS[k] for k in self._values}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (f"Result(model={self.model!r}, head={self.head!r}, n_atoms={self.n_atoms}, "
                f"outputs={sorted(self._values)})")


def result_from_response(response: pb.PredictResponse) -> Result:
    """The :class:`Result` of one ``PredictResponse``."""
    return Result(arrays_from_response(response), model=response.model, head=response.head,
                  n_atoms=response.n_atoms, request_id=response.request_id,
                  timing=timing_from_response(response).as_dict())


__all__ = [
    "ALL_OUTPUTS",
    "COMPANIONS",
    "DEFAULT_OUTPUTS",
    "EXTRAPOLATION_THRESHOLD",
    "GRADE_OUTPUTS",
    "OUTPUTS",
    "UNITS",
    "ModelInfo",
    "Result",
    "ServerInfo",
    "StructureLike",
    "build_request",
    "field_vector",
    "per_structure_fields",
    "result_from_response",
    "server_info_from_response",
    "structure_arrays",
]
