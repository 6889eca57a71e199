"""The shipped default model at short range: real pairs pushed together inside validation frames, float64.

For each head and pair type of its data (SiO2: Si-O, O-O, Si-Si; BaTiO3:
Ba-O, Ti-O, O-O, Ba-Ti) the closest pair of that type in the first
validation frame is pushed together from the shortest distance of that pair
type in the file down to 0.6 A (0.05 A steps,
:func:`macefield_server.training.short_range.validation_frame_scans`, the
scans of ``bench/short_range.py``).  F must rise at every step over which
the universal screened nuclear repulsion (ZBL) of the moved atom with all
other atoms rises: physically, atoms pushed below their closest approach in
300 K MD repel.  Along one scan the straight path takes the moved atom past
a third atom and away from it again (Si pushed towards Si passes 0.64 A from
the O that bridges them); over those steps ZBL itself falls, and so may F
(:func:`macefield_server.training.short_range.repulsion_falls`).  F must
also never fall below the scan's start.

The stage-3 model (no ZBL, no short-range training) fell below the start of
five of these scans (by 0.1 to 174 eV) and locally along the other two
(``bench/results/short_range_stage3.json``).  The stage-4 model (ZBL and the
short-range hinge) stayed above the start of every scan within the thermal
scale but still fell locally along five of them where ZBL rises
(``bench/results/short_range_stage4.json``).  The shipped stage-5 model (the
core repulsion added below the data's shortest distances,
``default.stage5.yaml``) rises wherever ZBL does along all seven
(``bench/results/short_range_default.json``).

And the energy floor: no test structure (the grade's flagged cases and controls,
MD frames, these scans) lies below the relaxed crystal by more than k_B T
per atom unless the extrapolation grade flags it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA
from extrapolation_cases import (EngineCalculator, chain_structure, close_pair_quartz, compressed_quartz,
                                 swapped_batio3, wrong_quartz)
from macefield_client.structures import alpha_quartz, perovskite_batio3
from macefield_server.engine import predict
from macefield_server.engine.checkpoint import load_model
from macefield_server.engine.graph import Structure
from macefield_server.training.data import read_frames
from macefield_server.engine.graph import pairs
from macefield_server.training.short_range import DEFAULT_PAIRS, pair_name, shortest_distances, typed_pairs
from macefield_server.training.short_range import unphysical_falls, validation_frame_scans

MODEL = REPO / "server" / "macefield_server" / "weights" / "default.pt"
FILES = {"sio2": "sio2-quartz-md.xyz", "batio3": "batio3-md.xyz"}
CASES = [(head, pair_name(p)) for head, pairs in DEFAULT_PAIRS.items() for p in pairs]
#: how far (eV) a scan point may lie below the scan's start: 4 k_B T at 300 K, a dip that cannot hold a hot
#: trajectory (the stage-3 model fell 0.1 to 174 eV below the start of five scans)
DIP_EV = 0.1


@lru_cache(maxsize=None)
def frames(head: str):
    return tuple(Structure.from_atoms(a, head=head) for a in read_frames(SHARED_DATA / FILES[head]))


@lru_cache(maxsize=None)
def scans(head: str):
    model = load_model(MODEL, dtype="float64").eval()
    return validation_frame_scans(model, list(frames(head)), DEFAULT_PAIRS[head])


@pytest.mark.parametrize("head, pair", CASES)
def test_scan_starts_at_the_datas_shortest_distance_and_stays_finite(shared_data, head, pair):
    scan, energy = scans(head)[pair]
    all_frames = frames(head)
    shortest = shortest_distances(all_frames, [scan.pair])[scan.pair]
    assert scan.distances[0] == pytest.approx(shortest) and scan.distances[-1] == pytest.approx(0.6)
    assert np.all(-np.diff(scan.distances) <= 0.05 + 1e-12)
    # a validation frame, and its closest pair of that type is the one pushed
    index = next(k for k, f in enumerate(all_frames) if f is scan.source)
    assert index == int(round(0.8 * len(all_frames)))
    assert scan.start == pytest.approx(typed_pairs(scan.source, scan.pair)[3].min())
    assert scan.start >= shortest
    assert np.all(np.isfinite(energy))


@pytest.mark.parametrize("head, pair", CASES)
def test_no_scan_point_lies_below_the_start(shared_data, head, pair):
    """Pushed below the data's closest approach, the pair never ends up lower than where it started (to DIP_EV)."""
    scan, energy = scans(head)[pair]
    lowest = int(np.argmin(energy))
    assert energy[lowest] - energy[0] >= -DIP_EV, (f"{head} {pair}: {energy[lowest] - energy[0]:.3f} eV below the "
                                                   f"start at {scan.distances[lowest]:.2f} A")


@pytest.mark.parametrize("head, pair", CASES)
def test_energy_rises_wherever_the_screened_nuclear_repulsion_does(shared_data, head, pair):
    scan, energy = scans(head)[pair]
    falls = unphysical_falls(scan, energy)
    assert not falls.size, (f"{head} {pair}: F falls where ZBL rises at {len(falls)} of {len(energy) - 1} steps "
                            f"({np.round(falls, 2).tolist()} A); lowest {energy.min() - energy[0]:.2f} eV below the "
                            f"start, at {scan.distances[int(np.argmin(energy))]:.2f} A")


@pytest.mark.parametrize("head, pair", CASES)
def test_exempt_steps_are_where_the_moved_atom_leaves_a_third_atom_it_passed(shared_data, head, pair):
    """The steps where ZBL falls (exempt above) are steps over which the moved atom moves away from an atom
    other than its anchor that it has come within 1 A of; in these frames that happens only along Si-Si, whose
    straight path passes the bridging O."""
    scan, _ = scans(head)[pair]
    if (head, pair) != ("sio2", "Si-Si"):
        assert not scan.exempt.any()
        return
    assert scan.exempt.sum() >= 3
    points = scan.structures()
    for k in np.flatnonzero(scan.exempt):
        near = []
        for st in points[k:k + 2]:
            i, j, shift, d = pairs(st.positions, st.cell, st.pbc, 1.0)
            mine = (i == scan.moved) & (j != scan.anchor)
            near.append({(int(a), tuple(b)): float(x) for a, b, x in zip(j[mine], shift[mine], d[mine])})
        assert any(key in near[1] and near[1][key] > near[0][key] for key in near[0]), (
            f"step to {scan.distances[k + 1]:.2f} A: ZBL falls but the moved atom leaves no atom within 1 A")


#: the thermal scale (eV per atom): k_B T at 300 K, the temperature of the training MD
THERMAL_EV_PER_ATOM = 8.617333262e-5 * 300.0


def relaxed_energy_per_atom(model, atoms, head: str) -> float:
    """Energy per atom (eV) of ``atoms`` with its positions relaxed by ``model`` (cell fixed, fmax 0.005 eV/A)."""
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = EngineCalculator(model, head)
    BFGS(atoms, logfile=None).run(fmax=0.005, steps=500)
    assert np.abs(atoms.get_forces()).max() < 0.005
    return atoms.get_potential_energy() / len(atoms)


def test_nothing_below_the_relaxed_crystal_goes_unflagged(shared_data):
    """Every test structure whose energy per atom lies below the relaxed crystal's (same head, the data's cell) by
    more than the thermal scale (k_B T at 300 K per atom) is flagged by the extrapolation grade (> 1 on some
    atom), float64.

    The set: the structures the grade tests flag and their controls (tests/extrapolation_cases.py), MD frames of
    both heads, and every point of the scans above: a hole that a hot or driven trajectory could fall into either
    is not there or is announced by the grade.
    """
    model = load_model(MODEL, dtype="float64").eval()
    chain, _ = chain_structure(model)
    # BaTiO3 in its data's tetragonal cell, started off-centre along c so that it relaxes into the polar
    # (ferroelectric) minimum rather than staying on the centrosymmetric saddle
    polar = perovskite_batio3()
    polar.positions[1, 2] += 0.08
    polar.positions[2:, 2] -= 0.04
    reference = {"sio2": relaxed_energy_per_atom(model, alpha_quartz(cell="pbe"), "sio2"),
                 "batio3": relaxed_energy_per_atom(model, polar, "batio3")}
    cases = {"sio2": [wrong_quartz(), compressed_quartz(0.85), compressed_quartz(0.95), close_pair_quartz(0.6),
                      chain, alpha_quartz(cell="pbe", repeat=(2, 2, 2)), alpha_quartz(repeat=(2, 2, 2))]
             + list(frames("sio2")[::20]),
             "batio3": [swapped_batio3(read_frames(SHARED_DATA / FILES["batio3"])[10]),
                        perovskite_batio3(repeat=(3, 3, 3))] + list(frames("batio3")[::6])}
    for head in cases:  # scan points: energies from the scans above, graded only where they lie below
        for name, (scan, energy) in scans(head).items():
            n = len(scan.source.numbers)
            deep = energy / n - reference[head] < -THERMAL_EV_PER_ATOM
            cases[head] += [s for s, d in zip(scan.structures(), deep) if d]
    below = {}
    for head, structures in cases.items():
        for k, (s, r) in enumerate(zip(structures, predict(model, structures, heads=head, outputs=["energy"]))):
            depth = float(r["energy"]) / len(s.numbers) - reference[head]
            if depth < -THERMAL_EV_PER_ATOM:
                below[(head, k)] = (round(depth, 3), round(float(r["extrapolation_max"]), 2))
    print("below the relaxed crystal (eV/atom, grade):", below)
    assert ("sio2", 4) in below  # the model's O=Si=O chains lie below quartz: the check is not empty
    unflagged = {k: v for k, v in below.items() if v[1] <= 1.0}
    assert not unflagged, f"below the relaxed crystal by more than k_B T per atom and not flagged: {unflagged}"
