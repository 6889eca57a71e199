"""Short-range training support: the scan hinge, the synthetic pair scans, the ZBL term and their config keys."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.data import covalent_radii

from conftest import alpha_quartz, random_field_model
from macefield_server.engine.architecture import add_pair_repulsion, build_field_mace, describe_architecture
from macefield_server.engine.graph import NEIGHBOUR_BACKENDS, Structure, pairs
from macefield_server.engine.predict import evaluate, prepare_batch
from macefield_server.training.config import ConfigError, config_from_dict
from macefield_server.engine.core_repulsion import zbl_energy
from macefield_server.training.short_range import (Scan, ScanSampler, ShortRangeScanConfig, closest_pair_scan,
                                                   repulsion_falls, scan_grid, scan_hinge, shortest_distances,
                                                   shortest_pair_distances, typed_pairs, unphysical_falls)


def quartz(repeat=(2, 2, 1), rattle=0.05, seed=0) -> Structure:
    return Structure.from_atoms(alpha_quartz(repeat=repeat, rattle=rattle, seed=seed), head="sio2")


def all_distances(s: Structure) -> np.ndarray:
    """Minimum-image distances between all atoms (A)."""
    from ase import Atoms

    return Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc).get_all_distances(mic=True)


# ------------------------------------------------------------------------------------------------ the hinge
def test_hinge_is_zero_for_a_monotonic_repulsive_scan():
    d = torch.linspace(1.6, 0.6, 11, dtype=torch.float64)
    e = 20.0 / d  # Coulomb-like repulsion: rises by 8 to 48 eV per A of approach here
    assert float(scan_hinge(e, d, margin=0.0)) == 0.0
    assert float(scan_hinge(e, d, margin=8.0)) == 0.0
    # a margin steeper than the rise is violated
    assert float(scan_hinge(e, d, margin=40.0)) > 0.0


def test_hinge_is_positive_for_a_scan_with_a_hole_and_measures_it():
    d = torch.tensor([1.6, 1.4, 1.2, 1.0, 0.8], dtype=torch.float64)
    e = torch.tensor([0.0, 1.0, -5.0, -9.0, 3.0], dtype=torch.float64, requires_grad=True)
    # drops of 6 and 4 eV at two of the four steps; margin 1 eV/A asks for 0.2 eV more at each
    hinge = scan_hinge(e, d, margin=1.0)
    expected = (0.0 + (0.2 + 6.0) + (0.2 + 4.0) + 0.0) / 4
    assert float(hinge) == pytest.approx(expected)
    hinge.backward()
    # descending the gradient lifts the bottom of the hole (point 3) and lowers the point before the drop (1)
    assert e.grad is not None
    np.testing.assert_allclose(e.grad.numpy(), [0.0, 0.25, 0.0, -0.25, 0.0])
    # batched scans: the mean over all steps
    both = scan_hinge(torch.stack([e.detach(), 20.0 / d]), torch.stack([d, d]), margin=1.0)
    assert float(both) == pytest.approx(expected / 2)


def test_hinge_leaves_out_exempt_steps_but_keeps_them_in_the_mean():
    d = torch.tensor([1.6, 1.4, 1.2, 1.0, 0.8], dtype=torch.float64)
    e = torch.tensor([0.0, 1.0, -5.0, -9.0, 3.0], dtype=torch.float64)
    exempt = torch.tensor([False, True, False, False])
    assert float(scan_hinge(e, d, 1.0, exempt)) == pytest.approx((0.2 + 4.0) / 4)
    assert float(scan_hinge(e, d, 1.0, torch.ones(4, dtype=torch.bool))) == 0.0


# ------------------------------------------------------------------------------------------------ the scans
@pytest.mark.parametrize("pair", [("Si", "O"), ("O", "O"), ("Si", "Si")])
def test_scan_moves_one_atom_to_the_requested_distances_and_keeps_all_other_distances(pair):
    s = quartz()
    grid = scan_grid(1.8 if pair != ("Si", "Si") else 2.9, 0.6, 0.1)
    scan = closest_pair_scan(s, pair, grid)
    i, j, _, d = typed_pairs(s, pair)
    assert scan.start == pytest.approx(d.min())
    assert s.numbers[scan.anchor] == {"Si": 14, "O": 8}[pair[0]]
    assert s.numbers[scan.moved] == {"Si": 14, "O": 8}[pair[1]]
    ref = all_distances(s)
    others = np.ones(len(s.numbers), bool)
    others[scan.moved] = False
    bond = s.positions[scan.moved] + scan.shift @ s.cell - s.positions[scan.anchor]
    for target, moved in zip(grid, scan.structures()):
        dist = all_distances(moved)
        # every distance between atoms other than the moved one is unchanged, and they did not move
        np.testing.assert_allclose(dist[np.ix_(others, others)], ref[np.ix_(others, others)], atol=1e-12)
        np.testing.assert_array_equal(moved.positions[others], s.positions[others])
        # the pair is at the requested distance, along the original bond direction
        new_bond = moved.positions[scan.moved] + scan.shift @ moved.cell - moved.positions[scan.anchor]
        assert np.linalg.norm(new_bond) == pytest.approx(target, abs=1e-12)
        np.testing.assert_allclose(new_bond / np.linalg.norm(new_bond), bond / np.linalg.norm(bond), atol=1e-12)
        assert dist[scan.anchor, scan.moved] == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("pair", [("Si", "O"), ("O", "O"), ("Si", "Si")])
def test_scans_of_pairs_across_the_cell_boundary_move_the_atom_towards_the_anchor_it_is_bonded_to(pair):
    """Every listed pair, with or without a unit-cell shift: the scan's first point (the pair's own distance) is
    the source frame itself, and at every point the moved atom is at the requested minimum-image distance from the
    anchor while its distances to all other atoms change only by moving along the bond."""
    s = quartz(repeat=(1, 1, 1))
    i, j, shift, d = typed_pairs(s, pair, cutoff=3.2)
    assert np.any(np.any(shift != 0, axis=1))  # some pairs cross the cell boundary
    for k in range(len(d)):
        grid = np.array([d[k], 0.5 * (d[k] + 0.6), 0.6])
        scan = Scan(s, pair, int(i[k]), int(j[k]), shift[k].astype(float), float(d[k]), grid)
        points = scan.structures()
        np.testing.assert_allclose(points[0].positions, s.positions, atol=1e-12)
        step = np.linalg.norm(points[-1].positions[scan.moved] - s.positions[scan.moved])
        assert step == pytest.approx(d[k] - 0.6, abs=1e-12)  # moved along the bond, not to another image
        for target, point in zip(grid, points):
            image = point.positions[scan.moved] + shift[k] @ s.cell
            assert np.linalg.norm(image - s.positions[scan.anchor]) == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("pair", [("Si", "Si"), ("O", "O"), ("Si", "O")])
def test_the_scanned_pair_does_not_depend_on_the_order_of_the_neighbour_list(pair, monkeypatch):
    """A like-element pair is listed twice (i-j, j-i): the lower index anchors, in whatever order the neighbour
    search lists the pairs (each backend's order, and that order reversed)."""
    import macefield_server.training.short_range as short_range

    s = quartz()
    found = {}
    for backend in NEIGHBOUR_BACKENDS:
        for reverse in (False, True):
            def listed(*args, _backend=backend, _reverse=reverse, **kwargs):
                out = pairs(*args, backend=_backend, **kwargs)
                return tuple(a[::-1] for a in out) if _reverse else out

            monkeypatch.setattr(short_range, "pairs", listed)
            scan = closest_pair_scan(s, pair, [1.0])
            found[(backend, reverse)] = (scan.anchor, scan.moved, tuple(scan.shift), scan.start)
    assert len(set(found.values())) == 1, found
    anchor, moved, _, start = found[(NEIGHBOUR_BACKENDS[0], False)]
    if pair[0] == pair[1]:
        assert anchor < moved
    assert start == pytest.approx(typed_pairs(s, pair)[3].min(), abs=1e-12)


def three_atoms(offset: float) -> Structure:
    """O at the origin, an Si pushed along x towards it, and a third atom (O) ``offset`` A off the path at x = 1.2."""
    positions = np.array([[5.0, 5.0, 5.0], [7.5, 5.0, 5.0], [6.2, 5.0 + offset, 5.0]])
    return Structure(numbers=np.array([8, 14, 8]), positions=positions, cell=np.eye(3) * 10.0,
                     pbc=np.ones(3, dtype=bool), head="sio2")


def test_repulsion_falls_marks_the_steps_after_the_moved_atom_passes_a_third_atom():
    """Si pushed from 2.5 to 0.6 A towards an O, past another O 0.5 A off its path: the ZBL energy of the Si with
    both O rises until the Si is abreast of the passed O, then falls there (the passed O's repulsion fades
    faster than the anchor's grows); with the third atom far away, no step is marked."""
    for offset, expect_any in ((0.5, True), (3.0, False)):
        s = three_atoms(offset)
        scan = Scan(s, ("O", "Si"), 0, 1, np.zeros(3), 2.5, scan_grid(2.5, 0.6, 0.05))
        marked = repulsion_falls(scan)
        path = [st.positions[1] for st in scan.structures()]
        to_third = np.array([np.linalg.norm(p - s.positions[2]) for p in path])
        to_anchor = np.asarray(scan.distances)
        both = torch.tensor(np.stack([to_anchor, to_third]), dtype=torch.float64)
        zbl = zbl_energy(both, torch.tensor(14), torch.tensor(8)).sum(0).numpy()
        np.testing.assert_array_equal(marked, np.diff(zbl) <= 0)  # only the two nearby atoms matter here
        assert marked.any() == expect_any
        if expect_any:  # only steps on which the moved atom moves away from the passed atom
            assert np.all(np.diff(to_third)[marked] > 0)
        # the falls that count are those over unmarked steps
        scan.exempt = marked
        energies = zbl
        assert unphysical_falls(scan, energies).size == 0
        assert unphysical_falls(scan, to_anchor).size == int((~marked).sum())  # falls at every step


def test_shortest_pair_distances_of_periodic_and_molecular_frames():
    frames = [quartz(seed=k) for k in range(2)]
    every = shortest_pair_distances(frames)
    assert set(every) == {("Si", "O"), ("O", "O"), ("Si", "Si")}
    for pair, d in shortest_distances(frames, list(every)).items():
        assert every[pair] == pytest.approx(d, abs=1e-12)
    molecule = Structure(numbers=np.array([14, 8, 8]), positions=np.array([[0, 0, 0], [1.55, 0, 0], [-1.5, 0.2, 0]]),
                         cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool))
    got = shortest_pair_distances([molecule])
    assert got[("Si", "O")] == pytest.approx(np.hypot(1.5, 0.2))
    assert got[("O", "O")] == pytest.approx(np.hypot(3.05, 0.2))


def test_scan_grid_spans_start_to_stop():
    g = scan_grid(1.41, 0.6, 0.05)
    assert g[0] == 1.41 and g[-1] == 0.6 and np.all(np.diff(g) < 0) and np.all(-np.diff(g) <= 0.05 + 1e-12)


def test_sampler_is_deterministic_and_scans_from_the_real_distance_down_to_min_distance():
    frames = [quartz(seed=k) for k in range(3)]
    cfg = ShortRangeScanConfig(weight=1.0, scans_per_step=3, points=5, min_distance=0.6, seed=7)
    sampler = ScanSampler(cfg, frames)
    names = sorted(f"{a}-{b}" for _, (a, b) in sampler.choices)
    assert names == ["O-O", "Si-O", "Si-Si"]  # every pair type of SiO2
    shortest = shortest_distances(frames, [p for _, p in sampler.choices])
    for step in range(6):
        first, again = sampler.scans(step), ScanSampler(cfg, frames).scans(step)
        assert len(first) == 3
        for a, b in zip(first, again):
            assert (a.pair, a.anchor, a.moved) == (b.pair, b.anchor, b.moved)
            np.testing.assert_array_equal(a.distances, b.distances)
        for scan in first:
            d = scan.distances
            assert len(d) == cfg.points + 1
            assert d[0] == pytest.approx(scan.start)  # the source frame itself
            np.testing.assert_allclose(scan.structures()[0].positions, scan.source.positions, atol=1e-12)
            assert np.all(np.diff(d) <= 0) and d[-1] == pytest.approx(0.6)
            assert np.all(d[1:] <= shortest[scan.pair] + 1e-12)
            # the moved atom's nearest partner of that type is the anchor
            i, j, _, dist = typed_pairs(scan.source, scan.pair)
            mine = i == scan.anchor
            assert dist[mine].min() == pytest.approx(scan.start)
            # the steps where the ZBL repulsion falls come marked for the hinge
            np.testing.assert_array_equal(scan.exempt, repulsion_falls(scan))
    only = ScanSampler(ShortRangeScanConfig(weight=1.0, pairs=["O-Si"]), frames)
    assert [p for _, p in only.choices] == [("Si", "O")]


def test_sampler_with_fine_step_draws_pairs_of_points_that_far_apart():
    """fine_step: every leading point has a partner fine_step closer, the last pair ends at min_distance."""
    frames = [quartz(seed=k) for k in range(3)]
    cfg = ShortRangeScanConfig(weight=1.0, scans_per_step=4, points=8, min_distance=0.6, fine_step=0.05, seed=2)
    sampler = ScanSampler(cfg, frames)
    for step in range(5):
        for scan in sampler.scans(step):
            d = scan.distances
            assert len(d) == cfg.points + 1 and d[0] == pytest.approx(scan.start)
            assert np.all(np.diff(d) <= 0) and d[-1] == pytest.approx(0.6)
            assert np.all(d[1:] <= sampler.shortest[(scan.source.head, scan.pair)] + 1e-12)
            grid = d[1:]
            # each point is fine_step from some other point: the pairs
            gaps = np.abs(grid[:, None] - grid[None, :]) + np.eye(len(grid))
            assert np.all(np.isclose(gaps, 0.05, atol=1e-12).any(axis=1))
    # a coarse sampler (fine_step 0) with the same seed draws different distances
    coarse = ScanSampler(ShortRangeScanConfig(weight=1.0, scans_per_step=4, points=8, seed=2), frames).scans(0)
    assert any(not np.allclose(a.distances, b.distances) for a, b in zip(coarse, sampler.scans(0)))


def test_short_range_config_keys_are_checked():
    base = {"datasets": [{"name": "a", "path": "x.xyz", "head": "h"}]}
    cfg = config_from_dict({**base, "model": {"pair_repulsion": True},
                            "loss": {"short_range": {"weight": 0.1, "pairs": ["Si-O"], "margin": 2.0}}})
    assert cfg.model.pair_repulsion and cfg.loss.short_range.weight == 0.1 and cfg.loss.short_range.margin == 2.0
    assert config_from_dict(base).loss.short_range.weight == 0.0  # off by default
    with pytest.raises(ConfigError, match="loss.short_range.wieght"):
        config_from_dict({**base, "loss": {"short_range": {"wieght": 1.0}}})
    with pytest.raises(ConfigError, match=r"loss.short_range.pairs\[0\]"):
        config_from_dict({**base, "loss": {"short_range": {"pairs": ["SiO"]}}})
    with pytest.raises(ConfigError, match="min_distance"):
        config_from_dict({**base, "loss": {"short_range": {"min_distance": 0.0}}})
    with pytest.raises(ConfigError, match="fine_step.*points must be even"):
        config_from_dict({**base, "loss": {"short_range": {"fine_step": 0.05, "points": 5}}})
    with pytest.raises(ConfigError, match="fine_step"):
        config_from_dict({**base, "loss": {"short_range": {"fine_step": -0.05}}})
    assert config_from_dict({**base, "loss": {"short_range": {"fine_step": 0.05}}}).loss.short_range.fine_step == 0.05
    assert config_from_dict(base).model.core_repulsion.width == 0.0  # off by default
    assert config_from_dict({**base, "model": {"core_repulsion": {"width": 0.6}}}).model.core_repulsion.width == 0.6
    with pytest.raises(ConfigError, match="model.core_repulsion.width"):
        config_from_dict({**base, "model": {"core_repulsion": {"width": -0.1}}})
    with pytest.raises(ConfigError, match="model.core_repulsion.inner"):
        config_from_dict({**base, "model": {"core_repulsion": {"inner": 1.0}}})


# ------------------------------------------------------------------------------------------------ ZBL
def zbl_pair(z1: int, z2: int, r: float, p: int = 5) -> float:
    """ZBL universal screened repulsion (eV) with mace-torch's envelope, cut at the sum of the covalent radii."""
    a = 0.4543 * 0.529 / (z1**0.300 + z2**0.300)
    x = r / a
    phi = 0.1818 * np.exp(-3.2 * x) + 0.5099 * np.exp(-0.9423 * x) + 0.2802 * np.exp(-0.4028 * x) \
        + 0.02817 * np.exp(-0.2016 * x)
    rc = covalent_radii[z1] + covalent_radii[z2]
    u = r / rc
    env = (1 - (p + 1) * (p + 2) / 2 * u**p + p * (p + 2) * u ** (p + 1) - p * (p + 1) / 2 * u ** (p + 2)) * (r < rc)
    return 14.3996 * z1 * z2 / r * phi * env


def energies(model, structures):
    out = evaluate(model, prepare_batch(model, structures), frozenset({"energy"}))
    return np.array([r["energy"] for r in out])


def with_zbl(model):
    return add_pair_repulsion(copy.deepcopy(model))


def test_zbl_changes_a_dimer_energy_by_exactly_the_zbl_formula_and_only_within_its_cutoff():
    model = random_field_model(heads=("sio2", "other"), seed=5)
    zbl = with_zbl(model)
    assert not hasattr(model, "pair_repulsion_fn") and hasattr(zbl, "pair_repulsion_fn")
    scale = torch.atleast_1d(model.scale_shift.scale).double().numpy()
    for h, head in enumerate(("sio2", "other")):
        for r in (0.5, 0.9, 1.3, 1.7, 1.76, 1.78, 2.5, 3.5):  # Si-O cutoff: 1.11 + 0.66 = 1.77 A
            dimer = Structure(numbers=[14, 8], positions=[[0, 0, 0], [r, 0, 0]], head=head)
            diff = float(energies(zbl, [dimer])[0] - energies(model, [dimer])[0])
            # as in mace-torch's ScaleShiftMACE, the ZBL energy passes through the head's scale; ZBLBasis
            # raises the integer Z to the power 0.3 in torch's default dtype (float32), hence rel 1e-6
            assert diff == pytest.approx(scale[h] * zbl_pair(14, 8, r), rel=1e-6, abs=1e-12), r
            if r > 1.77:
                assert diff == 0.0


def test_zbl_in_quartz_is_the_sum_over_short_pairs_and_survives_a_rebuild():
    model = random_field_model(seed=2)
    zbl = with_zbl(model)
    s = Structure.from_atoms(alpha_quartz(rattle=0.08, seed=4))
    i, j, _, d = pairs(s.positions, s.cell, s.pbc, 3.0)
    expected = 0.5 * sum(zbl_pair(int(s.numbers[a]), int(s.numbers[b]), float(r)) for a, b, r in zip(i, j, d))
    assert expected > 0  # Si-O bonds of quartz (1.61 A) are inside the Si-O ZBL cutoff (1.77 A)
    scale = float(torch.atleast_1d(model.scale_shift.scale)[0])
    diff = float(energies(zbl, [s])[0] - energies(model, [s])[0])
    assert diff == pytest.approx(scale * expected, rel=1e-6)
    # the architecture description records it, and a model rebuilt from it has the same F
    arch = describe_architecture(zbl)
    assert arch["pair_repulsion"] is True
    rebuilt = build_field_mace(arch, dtype=torch.float64)
    rebuilt.load_state_dict(zbl.state_dict())
    assert float(energies(rebuilt.eval(), [s])[0]) == pytest.approx(float(energies(zbl, [s])[0]), rel=1e-12)
    # adding it twice is a no-op
    assert add_pair_repulsion(zbl) is zbl
