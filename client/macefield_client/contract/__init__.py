"""The wire contract of MACE-Field Serve, imported by both the server and the client (numpy + protobuf only).

* :mod:`.outputs`: the output table (names, units, shapes, defaults, companions, the grade's threshold);
* :mod:`.constants`: physical constants and unit conversions (EPS0, ...);
* :mod:`.messages`: structures, results and model descriptions to and from protobuf (one mapping);
* :mod:`.labels`: reference labels in data files, converted to the wire's units (``macefield eval``, training);
* :mod:`.accuracy`: errors of predictions against labels in the model card's units (``macefield eval``, the card);
* the generated stubs, :mod:`macefield_client.proto.macefield.v1` (from ``proto/macefield/v1/macefield.proto``).

The server imports nothing else from the client package (an import-linter contract in CI holds it).
"""

from .constants import BOHR, E_PER_A2_TO_UC_PER_CM2, EPS0, HARTREE, V_PER_A_TO_MV_PER_CM
from .messages import (Limits, ModelInfo, ServerInfo, StructureLike, Timing, arrays_from_response, build_request,
                       field_vector, list_models_response, per_structure_fields, response_from_arrays,
                       server_info_from_response, structure_arrays, timing_from_response)
from .outputs import (ALL_OUTPUTS, COMPANIONS, DEFAULT_OUTPUTS, EXTRAPOLATION_THRESHOLD, GRADE_OUTPUTS, OUTPUTS,
                      SCALARS, UNITS, ECHO, clip, resolve_outputs, shape, wire_outputs)

__all__ = ["BOHR", "E_PER_A2_TO_UC_PER_CM2", "EPS0", "HARTREE", "V_PER_A_TO_MV_PER_CM", "Limits", "ModelInfo",
           "ServerInfo", "StructureLike", "Timing", "arrays_from_response", "build_request", "field_vector",
           "list_models_response", "per_structure_fields", "response_from_arrays", "server_info_from_response",
           "structure_arrays", "timing_from_response", "ALL_OUTPUTS", "COMPANIONS", "DEFAULT_OUTPUTS",
           "EXTRAPOLATION_THRESHOLD", "GRADE_OUTPUTS", "OUTPUTS", "SCALARS", "UNITS", "ECHO", "clip", "resolve_outputs",
           "shape", "wire_outputs"]
