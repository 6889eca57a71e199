"""One neighbour-list contract whatever builds it: the same ordered pairs, unit shifts and distances.

vesin (the host default), matscipy (the reference the server used before) and
the device path's CPU build (:mod:`macefield_server.engine.device_graph`) are
compared pair by pair on random triclinic cells, cells thinner than the cutoff
(many images), mixed and no periodicity, atoms on cell faces and far from the
origin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macefield_server.engine.device_graph import batch_edges, collate_on_device
from macefield_server.engine.graph import (NEIGHBOUR_BACKENDS, Structure, collate, neighbour_backend, neighbour_list,
                                           set_neighbour_backend)

pytest.importorskip("vesin")

CUTOFF = 5.0


def as_pairs(edge_index, unit_shifts, distances):
    """{(i, j, s0, s1, s2): distance} of one graph."""
    edge_index = np.asarray(edge_index)
    shifts = np.rint(np.asarray(unit_shifts)).astype(np.int64)
    out = {}
    for k in range(edge_index.shape[1]):
        key = (int(edge_index[0, k]), int(edge_index[1, k]), *map(int, shifts[k]))
        assert key not in out, f"pair {key} listed twice"
        out[key] = float(distances[k])
    return out


def host_pairs(structure: Structure, backend: str, cutoff: float = CUTOFF):
    g = neighbour_list(structure, cutoff, backend=backend)
    pos = g.positions
    i, j = g.edge_index
    d = np.linalg.norm(pos[j] + g.unit_shifts @ g.cell - pos[i], axis=1)
    assert np.all(d < cutoff)
    assert not np.any((i == j) & np.all(g.unit_shifts == 0, axis=1)), "a self-pair at zero shift"
    if d.size:
        assert g.closest is not None and g.closest.distance == pytest.approx(d.min(), abs=1e-12)
    else:
        assert g.closest is None
    return as_pairs(g.edge_index, g.unit_shifts, d)


def assert_same(a, b):
    assert a.keys() == b.keys(), (f"{len(a.keys() - b.keys())} pairs only in the first, "
                                  f"{len(b.keys() - a.keys())} only in the second")
    for key, d in a.items():
        assert b[key] == pytest.approx(d, abs=1e-9), key


def random_structure(rng, n, pbc, cell_scale=1.0, skew=0.4):
    cell = (np.eye(3) + skew * rng.uniform(-1, 1, (3, 3))) * rng.uniform(4.0, 9.0, 3)[:, None] * cell_scale
    frac = rng.uniform(0, 1, (n, 3))
    positions = frac @ cell + rng.normal(0, 0.3, (n, 3))  # some atoms outside the cell
    return Structure(rng.integers(1, 9, n), positions, cell, pbc)


PBCS = [(True, True, True), (True, False, True), (False, True, False), (False, False, False), (True, True, False)]


def cases():
    rng = np.random.default_rng(7)
    out = []
    for k in range(30):  # random triclinic cells, every periodicity pattern
        out.append((f"triclinic-{k}", random_structure(rng, int(rng.integers(1, 40)), PBCS[k % len(PBCS)])))
    for k in range(10):  # cells thinner than the cutoff: many images of every atom
        out.append((f"small-{k}", random_structure(rng, int(rng.integers(1, 6)), PBCS[k % len(PBCS)],
                                                   cell_scale=0.35, skew=0.6)))
    # strongly skewed cell (a2 nearly along a1), periodic
    out.append(("skewed", Structure([8, 14, 8], [[0, 0, 0], [1.3, 0.4, 0.2], [2.0, 1.9, 1.1]],
                                    [[3.0, 0, 0], [2.9, 0.8, 0], [0.3, 0.2, 2.5]], [True] * 3)))
    # atoms exactly on cell faces, edges and corners
    faces = np.array([[0, 0, 0], [4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [4.0, 4.0, 4.0], [2.0, 4.0, 0],
                      [2.0, 2.0, 4.0]])
    out.append(("faces", Structure([14] * 7, faces, np.eye(3) * 4.0, [True] * 3)))
    out.append(("faces-slab", Structure([14] * 7, faces, np.eye(3) * 4.0, [True, True, False])))
    out.append(("single-atom", Structure([14], [[0.1, 0.2, 0.3]], np.eye(3) * 3.0, [True] * 3)))
    out.append(("isolated-atom", Structure([14], [[0.1, 0.2, 0.3]])))
    out.append(("far-from-origin", Structure([8, 14, 8], np.array([[0, 0, 0], [1.6, 0, 0], [3.2, 0.1, 0]]) + 1e6,
                                             np.diag([5.0, 6.0, 7.0]), [True, False, True])))
    return out


CASES = cases()


@pytest.mark.parametrize("name,structure", CASES, ids=[c[0] for c in CASES])
def test_vesin_gives_matscipys_pairs_shifts_and_distances(name, structure):
    assert_same(host_pairs(structure, "matscipy"), host_pairs(structure, "vesin"))


def test_vesin_matches_matscipy_on_quartz_supercells():
    from macefield_client.structures import alpha_quartz

    for repeat in ((1, 1, 1), (2, 2, 2), (3, 2, 1)):
        s = Structure.from_atoms(alpha_quartz(repeat=repeat, rattle=0.05, seed=3))
        ref = host_pairs(s, "matscipy")
        assert len(ref) > 40 * s.n_atoms  # every atom has tens of neighbours within 5 A
        assert_same(ref, host_pairs(s, "vesin"))


def test_direct_vesin_call_gives_the_wrappers_arrays_in_its_order():
    """The C function called directly (engine/vesin_direct.py) returns vesin.NeighborList's (i, j, S, d): the same
    values, order and dtypes, also after a call with other sizes (its buffers are reused)."""
    import vesin
    from macefield_client.structures import alpha_quartz
    from macefield_server.engine.graph import _padded_cell, canonical_positions
    from macefield_server.engine.vesin_direct import TESTED_VESIN, direct_half_list

    direct = direct_half_list(CUTOFF)
    if vesin.__version__ not in TESTED_VESIN:
        assert direct is None  # an unchecked release goes through the wrapper
        pytest.skip(f"vesin {vesin.__version__}: not a release vesin_direct was checked against {TESTED_VESIN}")
    assert direct is not None, "the installed vesin has the C interface vesin_direct reads"
    wrapper = vesin.NeighborList(cutoff=CUTOFF, full_list=False, sorted=False, n_threads=1)
    quartz = [Structure.from_atoms(alpha_quartz(repeat=r, rattle=0.05, seed=3)) for r in ((2, 2, 2), (1, 1, 1))]
    compared = 0
    for structure in [s for _, s in CASES] + quartz:
        cell = _padded_cell(structure, CUTOFF)
        positions = canonical_positions(structure, cell)
        ours = direct(positions, cell, structure.pbc)
        theirs = wrapper.compute(positions, cell, structure.pbc, "ijSd")
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
        compared += len(ours[0])
    assert compared > 1000


THIN = Structure([14, 8], [[0.0, 0.0, 0.0], [0.01, 1.5, 0.0]], np.diag([0.03, 6.0, 6.0]), [True, False, False])


@pytest.mark.parametrize("backend", NEIGHBOUR_BACKENDS)
def test_packed_lists_for_worker_processes_unpack_bitwise(backend):
    """What a prep worker sends (vesin: the half list in small dtypes) is the in-process list, bit for bit."""
    from macefield_server.serving.prep_pool import pack, unpack

    before = neighbour_backend()
    set_neighbour_backend(backend)
    try:
        kinds = set()
        for _, structure in CASES + [("thin", THIN)]:
            want = neighbour_list(structure, CUTOFF)
            packed = pack(structure, CUTOFF)
            kinds.add((packed[0], packed[4]))
            got = unpack(packed)
            for key in ("edge_index", "unit_shifts", "positions", "cell"):
                a, b = getattr(want, key), getattr(got, key)
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
            assert got.closest == want.closest
        if backend == "vesin":  # the thin cell's shifts (|S| > 127) do not fit int8
            assert kinds == {("half", "i1"), ("half", "i4")}
            assert int(np.abs(neighbour_list(THIN, CUTOFF).unit_shifts).max()) > 127
        else:
            assert kinds == {("full", "f8")}
    finally:
        set_neighbour_backend(before)


def test_the_backend_is_a_setting_and_unknown_names_are_refused():
    assert neighbour_backend() in NEIGHBOUR_BACKENDS
    before = neighbour_backend()
    try:
        set_neighbour_backend("matscipy")
        assert neighbour_backend() == "matscipy"
        with pytest.raises(ValueError, match="neighbour backend"):
            set_neighbour_backend("nope")
        assert neighbour_backend() == "matscipy"
    finally:
        set_neighbour_backend(before)


def test_device_path_cpu_build_gives_the_host_lists_for_a_mixed_batch():
    structures = [c[1] for c in CASES]
    numbers = list(range(1, 15))
    batch, edges = collate_on_device(structures, cutoff=CUTOFF, atomic_numbers=numbers,
                                     head_index=[0] * len(structures), dtype=torch.float64, device="cpu")
    graphs = [neighbour_list(s, CUTOFF) for s in structures]
    reference = collate(structures, graphs, atomic_numbers=numbers, head_index=[0] * len(structures),
                        dtype=torch.float64, device="cpu")
    t, r = batch.tensors, reference.tensors
    for key in ("node_attrs", "positions", "cell", "batch", "ptr", "head", "electric_field", "volume", "periodic"):
        assert torch.equal(t[key], r[key]), key
    assert edges.edges == [g.edge_index.shape[1] for g in graphs]
    pos = r["positions"]

    def keyed(tensors, d):
        e = tensors["edge_index"]
        return as_pairs(e.numpy(), tensors["unit_shifts"].numpy(), d), e, tensors["shifts"]

    d_ref = (pos[r["edge_index"][1]] + r["shifts"] - pos[r["edge_index"][0]]).norm(dim=1).numpy()
    got, e, shifts = keyed(t, edges.distances.numpy())
    assert_same(keyed(r, d_ref)[0], got)
    # Angstrom shifts belong to each edge's own structure's cell
    assert torch.allclose((pos[e[1]] + shifts - pos[e[0]]).norm(dim=1), edges.distances, atol=1e-9)


def test_batch_edges_offsets_nodes_by_the_structures_before():
    a = Structure([14, 8], [[0, 0, 0], [1.6, 0, 0]])
    b = Structure([8, 8, 14], [[0, 0, 0], [0, 1.5, 0], [0, 0, 1.5]])
    positions = torch.tensor(np.concatenate([a.positions, b.positions]))
    cells = torch.tensor(np.concatenate([np.eye(3) * 30, np.eye(3) * 30]))
    edges = batch_edges(positions, cells, np.zeros((2, 3), bool), [2, 3], CUTOFF)
    assert edges.edges == [2, 6]
    pairs = set(map(tuple, edges.edge_index.T.tolist()))
    assert pairs == {(0, 1), (1, 0)} | {(i, j) for i in (2, 3, 4) for j in (2, 3, 4) if i != j}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_path_on_cuda_gives_the_host_lists():
    structures = [c[1] for c in CASES]
    numbers = list(range(1, 15))
    batch, edges = collate_on_device(structures, cutoff=CUTOFF, atomic_numbers=numbers,
                                     head_index=[0] * len(structures), dtype=torch.float32, device="cuda")
    assert edges.edges == [neighbour_list(s, CUTOFF).edge_index.shape[1] for s in structures]
    host = {}
    start = 0
    for s in structures:
        g = neighbour_list(s, CUTOFF)
        pos = g.positions
        d = np.linalg.norm(pos[g.edge_index[1]] + g.unit_shifts @ g.cell - pos[g.edge_index[0]], axis=1)
        host.update(as_pairs(g.edge_index + start, g.unit_shifts, d))
        start += s.n_atoms
    got = as_pairs(batch.tensors["edge_index"].cpu().numpy(), batch.tensors["unit_shifts"].cpu().numpy(),
                   edges.distances.cpu().numpy())
    assert_same(host, got)


def test_prep_workers_and_backend_are_checked_server_settings():
    from macefield_server.config_files import ConfigError
    from macefield_server.serving.config import NEIGHBOUR_BACKENDS as CONFIG_BACKENDS
    from macefield_server.serving.config import BatchingConfig, ServerConfig

    assert CONFIG_BACKENDS == NEIGHBOUR_BACKENDS
    assert ServerConfig(batching=BatchingConfig(prep_workers=3, neighbour_backend="matscipy")).validate()
    with pytest.raises(ConfigError, match="batching.prep_workers"):
        ServerConfig(batching=BatchingConfig(prep_workers=0)).validate()
    with pytest.raises(ConfigError, match="batching.neighbour_backend"):
        ServerConfig(batching=BatchingConfig(neighbour_backend="ase")).validate()
    assert ServerConfig(batching=BatchingConfig(prep_mode="thread")).validate()
    assert BatchingConfig().prep_mode == "auto"
    auto, process, thread = (BatchingConfig(prep_mode=m) for m in ("auto", "process", "thread"))
    assert not auto.prep_in_processes(["cpu"]) and auto.prep_in_processes(["cpu", "cuda"])
    assert process.prep_in_processes(["cpu"]) and not thread.prep_in_processes(["cuda"])
    assert not process.prep_in_processes([])  # every list built on the device: no pool
    with pytest.raises(ConfigError, match="batching.prep_mode: expected one of"):
        ServerConfig(batching=BatchingConfig(prep_mode="fork")).validate()



def test_neighbour_search_setting_is_checked_and_auto_means_the_gpu():
    from macefield_server.config_files import ConfigError
    from macefield_server.serving.config import BatchingConfig, ServerConfig

    auto = BatchingConfig()
    assert auto.search_on_device("cuda") and not auto.search_on_device("cpu")
    assert BatchingConfig(neighbour_search="device").search_on_device("cpu")
    assert not BatchingConfig(neighbour_search="host").search_on_device("cuda")
    with pytest.raises(ConfigError, match="batching.neighbour_search"):
        ServerConfig(batching=BatchingConfig(neighbour_search="gpu")).validate()


class _Item:
    """What a backend reads of a queued structure (:class:`macefield_server.serving.backend.BatchItem`)."""

    def __init__(self, structure, graph, outputs, request_id):
        self.structure, self.graph, self.head_index = structure, graph, 0
        self.outputs, self.request_id = outputs, request_id

    @property
    def n_atoms(self):
        return self.structure.n_atoms


def _server_structures():
    """Periodic quartz, a quartz slab (periodic in x, y; 12 A of vacuum along z), the SiO molecule; fields on."""
    from conftest import quartz_like, sio_molecule

    slab = quartz_like(repeat=(1, 1, 2), seed=2)
    slab.pbc = [True, True, False]
    slab.center(vacuum=6.0, axis=2)
    fields = ([0.0, 0.02, 0.0], [0.01, 0.0, -0.03], [0.0, 0.0, 0.05])
    atoms = (quartz_like(seed=1), slab, sio_molecule())
    return [Structure.from_atoms(a, electric_field=f) for a, f in zip(atoms, fields)]


def _backend(model, on_device, limits=None):
    from macefield_server.serving.engine_backend import EngineBackend
    from macefield_server.serving.metrics import Metrics
    from macefield_server.serving.registry import ServedModel

    return EngineBackend(ServedModel("tiny", model, "Default"), Metrics(), search_on_device=on_device,
                         limits=limits)


def test_server_batches_with_device_lists_give_the_host_lists_outputs(field_model):
    """The server's batch preparation through the device-graph path (on CPU tensors) against the host path:
    same energies, forces, stress, polarization, Born charges and polarizability, periodic or not."""
    from macefield_server.engine.response import ENGINE_OUTPUTS
    from macefield_client.contract import GRADE_OUTPUTS

    outputs = frozenset(ENGINE_OUTPUTS - GRADE_OUTPUTS)
    structures = _server_structures()
    cutoff = float(field_model.r_max)
    host = _backend(field_model, False)
    device = _backend(field_model, True)
    host_items = [_Item(s, neighbour_list(s, cutoff), outputs, f"h{k}") for k, s in enumerate(structures)]
    device_items = [_Item(s, None, outputs, f"d{k}") for k, s in enumerate(structures)]
    expected = host.evaluate(host.collate(host_items), host_items)
    got = device.evaluate(device.collate(device_items), device_items)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    assert "polarization" in got[0] and "polarization" not in got[1] and "born_charges" in got[2]
    for g, e in zip(got, expected):
        for key, value in e.items():
            scale = max(float(np.abs(value).max()), 1.0)
            np.testing.assert_allclose(g[key], value, rtol=0, atol=1e-10 * scale, err_msg=key)


def test_device_lists_refuse_overlapping_atoms_and_compute_the_rest(field_model):
    from macefield_server.serving.config import LimitsConfig
    from macefield_server.serving.validation import InvalidRequest

    structures = _server_structures()
    bad = structures[0].positions.copy()
    bad[4] = bad[3] + [0.1, 0.0, 0.0]  # 0.1 A apart
    structures.insert(1, Structure(structures[0].numbers, bad, structures[0].cell, structures[0].pbc))
    outputs = frozenset({"energy", "forces"})
    device = _backend(field_model, True, LimitsConfig(min_distance=0.5))
    items = [_Item(s, None, outputs, f"d{k}") for k, s in enumerate(structures)]
    got = device.evaluate(device.collate(items), items)
    assert isinstance(got[1], InvalidRequest)
    assert str(got[1]).startswith("positions: atoms 3 (") and "0.1 A apart" in str(got[1])
    host = _backend(field_model, False)
    cutoff = float(field_model.r_max)
    kept = [_Item(s, neighbour_list(s, cutoff), outputs, "h") for k, s in enumerate(structures) if k != 1]
    for g, e in zip([got[0]] + got[2:], host.evaluate(host.collate(kept), kept)):
        np.testing.assert_allclose(g["forces"], e["forces"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(g["energy"], e["energy"], rtol=1e-12)
    dense = _backend(field_model, True, LimitsConfig(max_edges_per_structure=10))
    refused = dense.evaluate(dense.collate(items[:1]), items[:1])
    assert isinstance(refused[0], InvalidRequest) and "neighbour pairs" in str(refused[0])
