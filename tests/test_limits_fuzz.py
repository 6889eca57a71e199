"""Limits and property-based fuzzing over real gRPC (one in-process server for the module).

Every call ends with a proper status: OK, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED
for bad or oversized input, never UNKNOWN or INTERNAL; the server stays up and
a valid request afterwards returns the direct engine's numbers.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from conftest import quartz_like, random_field_model, sio_molecule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import assert_matches, metric, request_for, wait_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BatchingConfig, LimitsConfig, ServerConfig
from macefield_server.engine import predict
from macefield_server.engine.graph import Structure, estimate_edges, neighbour_list
from macefield_server.engine.response import ENGINE_OUTPUTS as OUTPUTS
from macefield_server.serving.registry import ServedModel

MAX_MESSAGE = 256 * 1024
MAX_STREAMS = 2
LIMITS = LimitsConfig(max_atoms_per_structure=64, max_structures_per_request=4, max_edges_per_structure=2_000,
                      max_message_bytes=MAX_MESSAGE, max_concurrent_streams=MAX_STREAMS)
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
PREDICT = "/macefield.v1.MaceField/Predict"
PREDICT_BATCH = "/macefield.v1.MaceField/PredictBatch"


@pytest.fixture(scope="module")
def model():
    return random_field_model(heads=("sio2", "other"), seed=11)


@pytest.fixture(scope="module")
def server(model):
    config = ServerConfig(port=0, metrics_port=0, limits=LIMITS, batching=BatchingConfig(max_wait_ms=1))
    with BackgroundServer(config, [ServedModel("tiny", model, "sio2")]) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()


def raw_call(channel, method: str, payload: bytes, timeout: float = 60, with_answer: bool = False):
    """(status code, details) of a call with ``payload`` as the serialized request (and the answer's bytes)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        answer = call(payload, timeout=timeout)
        result = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        answer, result = b"", (exc.code(), exc.details())
    return result + (answer,) if with_answer else result


def assert_all_finite(method: str, answer: bytes):
    """Every number of an OK answer is finite (overlapping atoms must never be answered OK with NaN)."""
    responses = (pb.PredictBatchResponse.FromString(answer).results if method == PREDICT_BATCH
                 else [pb.PredictResponse.FromString(answer)])
    for r in responses:
        assert np.isfinite(r.energy) and np.isfinite(r.volume), r.request_id
        for name in ("forces", "stress", "dipole", "polarization", "polarization_quantum", "born_charges",
                     "polarizability", "chi", "eps_inf"):
            assert np.all(np.isfinite(np.asarray(getattr(r, name)))), name


def check_still_correct(channel, model, seed=0):
    atoms = quartz_like(seed=seed)
    response = rpc.MaceFieldStub(channel).Predict(
        request_for(atoms, field=(0.01, 0.0, -0.02), outputs=["forces", "stress"], request_id="after"), timeout=60)
    ref = predict(model, [atoms], electric_fields=[0.01, 0.0, -0.02], heads="sio2", outputs=["forces", "stress"])[0]
    assert_matches(response, ref)


# ------------------------------------------------------------ edge limit (unit)
@pytest.mark.parametrize(
    "structure",
    [
        Structure([8] * 40, np.full((40, 3), 1.0), np.eye(3) * 30.0, [True] * 3),  # piled on one point, big cell
        Structure([8, 14], [[0, 0, 0], [0.3, 0.2, 0.1]], np.eye(3) * 0.9, [True] * 3),  # tiny cell, many images
        Structure([8] * 30, np.random.default_rng(1).uniform(0, 3, (30, 3))),  # dense molecule
        Structure([8] * 25, np.random.default_rng(2).uniform(0, 6, (25, 3)), [[2.1, 0, 0], [0.9, 1.7, 0], [0, 0, 0]],
                  [True, True, False]),  # slab, triclinic in-plane
        Structure([8] * 12, np.random.default_rng(3).uniform(-20, 20, (12, 3)), [[3, 0, 0], [2.5, 2, 0], [1, 1, 4]],
                  [True] * 3),  # unwrapped positions, skewed cell
    ],
    ids=["collapsed", "tiny-cell", "molecule", "slab", "skewed"],
)
def test_edge_estimate_bounds_the_neighbour_list(structure):
    edges = neighbour_list(structure, 5.0).edge_index.shape[1]
    assert estimate_edges(structure, 5.0) >= edges > 0  # the cheap bound (or the count)
    assert estimate_edges(structure, 5.0, limit=0) == edges  # counted: exact


def test_every_edge_bound_is_at_least_the_neighbour_list_on_random_structures():
    """The cheap bound, the binned bound (limit between them) and the count, on random cells/slabs/molecules."""
    rng = np.random.default_rng(1)
    checked_binned = 0
    for _ in range(120):
        n, pbc = int(rng.integers(1, 60)), rng.random(3) < 0.6
        cell = np.diag(rng.uniform(5, 40, 3)) + rng.uniform(-3, 3, (3, 3)) * (rng.random() < 0.5)
        if pbc.any() and np.linalg.svd(cell[pbc], compute_uv=False).min() < 1.0:
            continue
        positions = rng.uniform(-5, 40, (n, 3)) if rng.random() < 0.8 else rng.uniform(0, 0.1, (n, 3))
        structure, cutoff = Structure([8] * n, positions, cell, pbc), float(rng.uniform(1.5, 5.0))
        edges = neighbour_list(structure, cutoff).edge_index.shape[1]
        cheap = estimate_edges(structure, cutoff, limit=10**12)
        binned = estimate_edges(structure, cutoff, limit=cheap - 1)  # the histogram bound, or the count
        checked_binned += binned < cheap
        assert cheap >= binned >= edges
        assert estimate_edges(structure, cutoff, limit=-1) >= edges
    assert checked_binned > 20


# ----------------------------------------------------------- limits over gRPC
@pytest.mark.parametrize(
    "atoms_args",
    [
        dict(numbers=[8] * 60, positions=np.full((60, 3), 2.0), cell=np.eye(3) * 40.0, pbc=True),
        dict(numbers=[8, 14], positions=[[0, 0, 0], [0.2, 0.1, 0.0]], cell=np.eye(3) * 0.7, pbc=True),
        dict(numbers=[8] * 64, positions=np.zeros((64, 3)), pbc=False),
    ],
    ids=["collapsed", "tiny-cell", "molecule-on-a-point"],
)
def test_too_many_edges_is_invalid_argument_before_the_neighbour_list(channel, model, atoms_args):
    from ase import Atoms

    atoms = Atoms(**atoms_args)
    # the count alone refuses it (validation runs before any neighbour list is built)
    assert estimate_edges(Structure.from_atoms(atoms), 4.0) > LIMITS.max_edges_per_structure
    with pytest.raises(grpc.RpcError) as info:
        rpc.MaceFieldStub(channel).Predict(request_for(atoms), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("positions:") and "limit 2000)" in info.value.details()
    check_still_correct(channel, model)


def test_oversized_message_is_resource_exhausted(channel, model):
    atoms = quartz_like()
    request = request_for(atoms)
    request.request_id = "x" * 10
    request.outputs.extend(["energy"] * (MAX_MESSAGE // 8))  # > max_message_bytes on the wire
    assert request.ByteSize() > MAX_MESSAGE
    with pytest.raises(grpc.RpcError) as info:
        rpc.MaceFieldStub(channel).Predict(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    check_still_correct(channel, model)


def test_too_many_structures_per_batch(channel):
    request = pb.PredictBatchRequest(structures=[request_for(quartz_like(seed=i)) for i in range(5)])
    with pytest.raises(grpc.RpcError) as info:
        rpc.MaceFieldStub(channel).PredictBatch(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("structures:")


def test_concurrent_streams_per_connection_are_capped(server, model):
    """Two open streams hold the connection's quota: a third RPC on it waits; another connection is served."""
    target = f"127.0.0.1:{server.port}"
    own = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection
    busy = grpc.insecure_channel(target, options=own)
    stub = rpc.MaceFieldStub(busy)
    release = threading.Event()

    def held():  # a stream that stays open until released
        yield request_for(quartz_like(seed=1), request_id="held")
        release.wait(120)

    streams = [stub.PredictStream(held(), timeout=120) for _ in range(MAX_STREAMS)]
    firsts = [next(s) for s in streams]
    assert all(r.request_id == "held" for r in firsts)
    with pytest.raises(grpc.RpcError) as info:  # no stream slot on this connection within its deadline
        stub.Predict(request_for(quartz_like(), request_id="third"), timeout=3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    other = grpc.insecure_channel(target, options=own)
    check_still_correct(other, model)  # a fresh connection has its own quota
    release.set()
    for s in streams:
        assert list(s) == []
    assert stub.Predict(request_for(quartz_like(), request_id="third"), timeout=60).request_id == "third"
    busy.close()
    other.close()


def test_client_disconnecting_mid_stream(server, channel, model):
    stub = rpc.MaceFieldStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    stop = threading.Event()

    def requests():
        for i in range(200):
            if stop.is_set():
                return
            yield request_for(quartz_like(seed=i), outputs=["forces"], request_id=f"s{i}")

    stream = stub.PredictStream(requests(), timeout=120)
    got = [next(stream) for _ in range(3)]
    assert [r.request_id for r in got] == ["s0", "s1", "s2"]
    stream.cancel()  # the client goes away with requests in flight
    stop.set()
    wait_for(lambda: metric(server.metrics_port, "macefield_in_flight", method="PredictStream") == 0,
             what="no stream left in flight")
    # recorded as it leaves in-flight, whether cancelled in an await or at a yield
    wait_for(lambda: metric(server.metrics_port, "macefield_requests_total", method="PredictStream",
                            code="CANCELLED") >= 1, timeout=10, what="the stream recorded as CANCELLED")
    check_still_correct(channel, model)


# --------------------------------------------------------------- malformed bytes
@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x22\x10\x01", bytes(range(256)), b"\x2a\x03\x00\x00"],
    ids=["varint-overrun", "truncated-string", "truncated-packed", "noise", "truncated-double"],
)
@pytest.mark.parametrize("method", [PREDICT, PREDICT_BATCH])
def test_malformed_protobuf_is_invalid_argument(channel, model, method, payload):
    code, details = raw_call(channel, method, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    check_still_correct(channel, model)


def test_malformed_message_on_a_stream_ends_it_with_invalid_argument(channel, model):
    stream = channel.stream_stream("/macefield.v1.MaceField/PredictStream", request_serializer=None,
                                   response_deserializer=pb.PredictResponse.FromString)
    good = request_for(quartz_like(seed=2), request_id="good").SerializeToString()
    responses = stream(iter([good, b"\xff\xff\xff"]), timeout=60)
    assert next(responses).request_id == "good"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request: not a valid macefield.v1.PredictRequest")
    check_still_correct(channel, model)


# -------------------------------------------------------------------- fuzzing
WEIRD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 5e-324, 1e300, -1e300, 1.7e308, 1e6, 1e9]),
    st.floats(-10.0, 10.0),
)
INT32 = st.one_of(st.sampled_from([8, 14]), st.integers(-2**31, 2**31 - 1), st.integers(-1, 130))


MUTATIONS = ["nan_pos", "huge_pos", "tiny_pos", "pos_len", "bad_z", "no_atoms", "cell_len", "cell_weird",
             "singular_cell", "tiny_cell", "pbc_len", "field_big", "field_weird", "field_len", "outputs_junk",
             "head_bad", "model_bad", "long_id", "collapsed", "too_many_atoms", "wrap_far", "overlap"]


@st.composite
def requests(draw):
    """A valid request (molecule or periodic cell) with 0-2 things broken or pushed to extremes."""
    n = draw(st.integers(1, 8))
    numbers = draw(st.lists(st.sampled_from([8, 14]), min_size=n, max_size=n))
    periodic = draw(st.booleans())
    side = draw(st.floats(5.0, 8.0))
    positions = draw(st.lists(st.floats(0.0, side), min_size=3 * n, max_size=3 * n))
    cell = (np.eye(3) * side).ravel().tolist() if periodic else []
    pbc = [True] * 3 if periodic else draw(st.sampled_from([[], [False] * 3]))
    field = draw(st.lists(st.floats(-0.3, 0.3), min_size=3, max_size=3)) if draw(st.booleans()) else []
    outputs = draw(st.lists(st.sampled_from(sorted(OUTPUTS)), max_size=3))
    head, model, request_id = draw(st.sampled_from(["", "sio2", "other"])), draw(st.sampled_from(["", "tiny"])), "f"
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2, unique=True)):
        if mutation == "nan_pos" and positions:
            positions[draw(st.integers(0, len(positions) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif mutation == "huge_pos" and positions:
            positions[draw(st.integers(0, len(positions) - 1))] = draw(st.sampled_from([1e300, -1.7e308, 1e9, 1e15]))
        elif mutation == "tiny_pos":
            positions = [draw(st.sampled_from([5e-324, 1e-300, -0.0])) for _ in positions]
        elif mutation == "pos_len" and positions:
            positions = positions[: draw(st.integers(0, len(positions) - 1))] or positions + [1.0]
        elif mutation == "bad_z" and numbers:
            numbers[0] = draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, 118, 119, -8])))
        elif mutation == "no_atoms":
            numbers, positions = [], []
        elif mutation == "cell_len":
            cell = draw(st.lists(st.floats(1.0, 9.0), min_size=1, max_size=12).filter(lambda c: len(c) != 9))
        elif mutation == "cell_weird":
            cell = draw(st.lists(WEIRD, min_size=9, max_size=9))
            pbc = [True] * 3
        elif mutation == "singular_cell":
            cell, pbc = [side, 0, 0, 2 * side, 0, 0, 0, 0, side], [True] * 3
        elif mutation == "tiny_cell":
            cell, pbc = (np.eye(3) * draw(st.sampled_from([0.5, 1e-2, 1e-5]))).ravel().tolist(), [True] * 3
        elif mutation == "pbc_len":
            pbc = draw(st.lists(st.booleans(), min_size=1, max_size=5).filter(lambda p: len(p) != 3))
        elif mutation == "field_big":
            field = [0.0, 0.0, draw(st.sampled_from([1.0000001, 2.0, 1e300]))]
        elif mutation == "field_weird":
            field = draw(st.lists(WEIRD, min_size=3, max_size=3))
        elif mutation == "field_len":
            field = draw(st.lists(st.floats(-0.1, 0.1), min_size=1, max_size=5).filter(lambda f: len(f) != 3))
        elif mutation == "outputs_junk":
            outputs = outputs + [draw(st.text(max_size=6))]
        elif mutation == "head_bad":
            head = draw(st.text(min_size=1, max_size=6).filter(lambda h: h not in ("sio2", "other")))
        elif mutation == "model_bad":
            model = draw(st.text(min_size=1, max_size=6).filter(lambda m: m != "tiny"))
        elif mutation == "long_id":
            request_id = "x" * draw(st.integers(257, 400))
        elif mutation == "collapsed":
            positions = [1.0] * len(positions)
        elif mutation == "too_many_atoms":
            k = LIMITS.max_atoms_per_structure + 1
            numbers, positions = [8] * k, np.random.default_rng(0).uniform(0, 20, 3 * k).tolist()
        elif mutation == "overlap" and len(numbers) >= 2 and len(positions) >= 6:
            # two atoms at one point, or almost: refused by name, never answered OK with NaN
            gap = draw(st.sampled_from([0.0, 1e-12, 1e-3, 0.2]))
            positions[3:6] = [positions[0] + gap, positions[1], positions[2]]
        elif mutation == "wrap_far":
            positions = [p + draw(st.sampled_from([-1e4, 3e3, 1e6])) for p in positions]
    return pb.PredictRequest(request_id=request_id, model=model, head=head, atomic_numbers=numbers,
                             positions=positions, cell=cell, pbc=pbc, electric_field=field, outputs=outputs)


PAYLOADS = st.one_of(
    requests().map(lambda r: (PREDICT, r.SerializeToString())),
    st.lists(requests(), max_size=5).map(
        lambda rs: (PREDICT_BATCH, pb.PredictBatchRequest(structures=rs).SerializeToString())),
    st.binary(max_size=300).map(lambda b: (PREDICT, b)),  # raw bytes: mostly not a valid message
    st.binary(max_size=300).map(lambda b: (PREDICT_BATCH, b)),
    requests().map(lambda r: (PREDICT, r.SerializeToString()[:-3])),  # truncated
    requests().map(lambda r: (PREDICT_BATCH, r.SerializeToString())),  # wrong message type for the method
    st.lists(requests(), min_size=1, max_size=2).map(
        lambda rs: (PREDICT, pb.PredictBatchRequest(structures=rs).SerializeToString())),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(PAYLOADS)
def test_fuzzed_requests_get_proper_status_codes(channel, payload):
    method, data = payload
    code, details, answer = raw_call(channel, method, data, with_answer=True)
    assert code in PROPER, (code, details)
    if code != grpc.StatusCode.OK:
        assert details
    else:
        assert_all_finite(method, answer)


def test_server_correct_after_fuzzing(server, channel, model):
    check_still_correct(channel, model, seed=5)
    atoms = sio_molecule()
    response = rpc.MaceFieldStub(channel).Predict(request_for(atoms, field=(0.0, 0.0, 0.1), head="other"), timeout=60)
    ref = predict(model, [atoms], electric_fields=[0.0, 0.0, 0.1], heads="other", outputs=["forces"])[0]
    assert response.energy == pytest.approx(float(ref["energy"]), rel=1e-10)
    assert metric(server.metrics_port, "macefield_requests_total", code="INTERNAL") == 0
    assert metric(server.metrics_port, "macefield_requests_total", code="UNKNOWN") == 0
