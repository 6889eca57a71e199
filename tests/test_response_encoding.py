"""PredictResponse encoding: the arrays written as their wire form give the message protobuf's own API builds."""

from __future__ import annotations

import numpy as np
import pytest

from macefield_client.contract import Timing, arrays_from_response
from macefield_client.contract.messages import response_from_arrays
from macefield_client.contract.outputs import SCALARS, shape
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb

TIMING = Timing(queue_ms=1.5, compute_ms=20.0, total_ms=21.5, batch_structures=2, batch_atoms=13)


def reference(values, n_atoms):
    """The response built field by field with protobuf's Python API (setattr, extend)."""
    response = pb.PredictResponse(request_id="r-1", model="m", head="h", n_atoms=n_atoms,
                                  timing=pb.Timing(**TIMING.as_dict()))
    for key in sorted(values):
        if key in SCALARS:
            setattr(response, key, float(values[key]))
        else:
            getattr(response, key).extend(np.asarray(values[key], dtype=np.float64).ravel().tolist())
    response.outputs.extend(sorted(values))
    return response


def every_output(n, rng):
    names = [f.name for f in pb.PredictResponse.DESCRIPTOR.fields if f.is_repeated and f.type == f.TYPE_DOUBLE]
    values = {name: rng.normal(size=shape(name, n)) for name in names}
    values.update(energy=np.asarray(-123.25), volume=np.asarray(240.5))
    return values


@pytest.mark.parametrize("n", [1, 13, 600])
def test_encoded_response_is_the_field_by_field_message(n):
    rng = np.random.default_rng(n)
    values = every_output(n, rng)
    values["forces"][0, 0] = -0.0  # signed zero, infinity and NaN keep their bits
    values["dipole"][:] = [np.inf, -np.inf, np.nan]
    values["stress"] = np.asfortranarray(values["stress"])  # any memory order: row-major on the wire
    values["born_charges"] = values["born_charges"].astype(np.float32)  # any float dtype: float64 on the wire
    ours = response_from_arrays(values, request_id="r-1", model="m", head="h", n_atoms=n, timing=TIMING)
    theirs = reference(values, n)
    assert ours.SerializeToString() == theirs.SerializeToString()
    back = arrays_from_response(pb.PredictResponse.FromString(ours.SerializeToString()))
    for key, value in values.items():
        np.testing.assert_array_equal(back[key], np.asarray(value, dtype=np.float64))
    assert np.signbit(back["forces"][0, 0])


def test_empty_arrays_leave_their_fields_unset():
    values = {"energy": np.asarray(0.5), "forces": np.zeros((0, 3)), "extrapolation": np.zeros(0)}
    ours = response_from_arrays(values, request_id="r-1", model="m", head="h", n_atoms=0, timing=TIMING)
    assert ours.SerializeToString() == reference(values, 0).SerializeToString()
    assert len(ours.forces) == 0 and len(ours.extrapolation) == 0
