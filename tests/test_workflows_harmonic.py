"""The harmonic route (``macefield_client.workflows.harmonic``, ``macefield phonons``) on the embedded default
model through a real server over loopback: alpha-quartz's Gamma-point modes, their symmetry, the acoustic sum
rule, eps_0 by two independent routes, and the invariance of IR intensities under a rotation of the crystal."""

from __future__ import annotations

import collections
import json
import sys

import numpy as np
import pytest
from serving import run_torch_free, torch_free_env

from macefield_client import Client
from macefield_client.structures import alpha_quartz

pytest.importorskip("phonopy")
from macefield_client.workflows import finite_field_eps_static, harmonic  # noqa: E402


def test_degenerate_sets_keep_accidentally_close_irreps_apart():
    """A run of close frequencies is one set per symmetry label: an A1 0.35 cm^-1 below an A2, or 0.03 cm^-1
    below an E pair, is its own set (its intensities are not averaged with theirs); unlabelled, the run is one."""
    from macefield_client.workflows.harmonic import degenerate_sets

    freqs = np.array([0.0, 0.0, 1e-6, 347.4211, 347.7715, 432.4511, 432.4765, 432.4765, 462.0])
    labels = ["E", "E", "A2", "A1", "A2", "A1", "E", "E", "A2"]
    by_label = [g.tolist() for g in degenerate_sets(freqs, labels=labels)]
    assert sorted(by_label) == [[0, 1], [2], [3], [4], [5], [6, 7], [8]]
    assert [g.tolist() for g in degenerate_sets(freqs)] == [[0, 1, 2], [3, 4], [5, 6, 7], [8]]
    assert [g.tolist() for g in degenerate_sets(freqs, labels=[""] * 9)] == [[0, 1, 2], [3, 4], [5, 6, 7], [8]]


@pytest.fixture(scope="module")
def client(default_served):
    with Client(default_served) as c:
        yield c


@pytest.fixture(scope="module")
def quartz(client):
    """9-atom alpha-quartz (PBE cell, Levien et al. coordinates) relaxed through the service, then harmonic."""
    return harmonic(client, alpha_quartz(cell="pbe"), head="sio2", relax=True)


def test_quartz_modes_sum_rule_and_labels(quartz):
    f = quartz.frequencies_cm1
    assert f.shape == (27,) and np.all(np.diff(f) >= 0)
    assert quartz.info["relax"]["converged"] and quartz.info["max_residual_force_eV_A"] < 1e-3
    assert quartz.space_group.startswith("P3_121") and quartz.point_group == "32"
    # the acoustic sum rule: three translations at zero, every optical mode stable
    assert quartz.acoustic.sum() == 3 and np.all(np.abs(f[quartz.acoustic]) < 5.0)
    assert np.all(f[~quartz.acoustic] > 50.0)
    # group theory for D3 with Z = 3: 4 A1 + 5 A2 + 9 E, of which A2 + E are the acoustic translations
    counts = collections.Counter(zip(quartz.labels, quartz.acoustic.tolist()))
    assert counts == {("A1", False): 4, ("A2", False): 4, ("A2", True): 1, ("E", False): 16, ("E", True): 2}
    # A1 modes are Raman-only (no dipole); A2 and E are IR active
    ir = quartz.ir_intensities
    assert np.all(ir[[lab == "A1" for lab in quartz.labels]] < 1e-8 * ir.max())
    # the strongest IR band is the high E (Si-O stretching) mode near 1040-1070 cm^-1 (DFPT PBE 1044, exp. 1072)
    strongest = quartz.optical_ir()[0]
    assert strongest["label"] == "E" and 1000 < strongest["frequency_cm1"] < 1100
    # uniaxial: eps tensors are diagonal with xx = yy
    for eps in (quartz.eps_inf, quartz.eps_static):
        assert np.allclose(eps, np.diag(np.diag(eps)), atol=1e-3) and eps[0, 0] == pytest.approx(eps[1, 1], abs=1e-3)
    assert np.all(np.diag(quartz.eps_static) > np.diag(quartz.eps_inf) + 1.0)


def test_eps_static_harmonic_equals_relaxed_ions_in_a_small_field(client, quartz):
    """eps_0 = eps_inf + sum_m Z_m Z_m / (Omega eps0 omega_m^2) against relaxing the ions at +-0.005 V/A."""
    direct = finite_field_eps_static(client, quartz.atoms, field=0.005, axes=(0, 2), head="sio2")
    for j in (0, 2):
        assert direct[j, j] == pytest.approx(quartz.eps_static[j, j], rel=0.01)


def test_ir_intensities_invariant_under_rotating_the_crystal(client, quartz):
    rot = np.array([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])  # proper rotation
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.linalg.det(rot) == pytest.approx(1.0)
    turned = quartz.atoms.copy()
    turned.set_cell(np.asarray(turned.cell) @ rot.T, scale_atoms=True)
    other = harmonic(client, turned, head="sio2")
    assert np.allclose(other.frequencies_cm1, quartz.frequencies_cm1, atol=0.05)
    assert np.allclose(other.ir_intensities, quartz.ir_intensities, rtol=1e-4, atol=1e-6 * quartz.ir_intensities.max())
    assert np.allclose(rot.T @ other.eps_static @ rot, quartz.eps_static, atol=1e-3)
    # Raman: finite differences of a float32 alpha over 0.01 A carry ~0.1 % round-off (more on weak modes)
    top = quartz.raman_activities.max()
    assert np.allclose(other.raman_activities, quartz.raman_activities, rtol=1e-2, atol=1e-6 * top)
    optical = ~quartz.acoustic
    assert [lab for lab, o in zip(other.labels, optical) if o] == [lab for lab, o in zip(quartz.labels, optical) if o]


def test_raman_activities_obey_group_theory(quartz):
    """D3: A1 and E are Raman active, A2 is not; the translations change nothing, so no activity."""
    s = quartz.raman_activities
    assert s is not None and s.shape == (27,) and quartz.raman_tensors.shape == (27, 3, 3)
    top = s.max()
    assert np.all(s[quartz.acoustic] < 1e-6 * top)
    a2 = np.array([lab == "A2" for lab in quartz.labels]) & ~quartz.acoustic
    a1 = np.array([lab == "A1" for lab in quartz.labels])
    e = np.array([lab == "E" for lab in quartz.labels]) & ~quartz.acoustic
    assert a2.sum() == 4 and np.all(s[a2] < 1e-6 * top)
    assert np.all(s[a1] > 1e-3 * top) and np.all(s[e] > 1e-3 * top)
    # A1 tensors are diagonal with xx = yy (isotropic in the plane): a D3 invariant
    for r in quartz.raman_tensors[a1]:
        assert np.allclose(r, np.diag(np.diag(r)), atol=1e-4 * np.abs(r).max())
        assert r[0, 0] == pytest.approx(r[1, 1], rel=1e-4)
    # the strongest Raman line of alpha-quartz is the A1 ring-breathing mode (exp. 464 cm^-1)
    strongest = quartz.optical_raman()[0]
    assert strongest["label"] == "A1" and 400 < strongest["frequency_cm1"] < 480


@pytest.mark.parametrize("method", ["symmetry", "modes"])
def test_raman_activities_do_not_depend_on_the_step(client, quartz, method):
    """Central differences: S(h) = S_0 + c h^2 + O(h^4).  The h -> 0 values extrapolated from h = 0.005/0.01 A and
    from 0.01/0.02 A agree (what is left is the float32 round-off), h = 0.005 A is within 1 % of them, and the
    default h = 0.01 A within 3 % for every mode above 1 % of the strongest activity, within 5 % for the weaker
    active ones (along the modes, the weak activities of the E sets carry up to a 3.1 % h^2 term at 0.01 A, 0.8 %
    at 0.005 A); a step mishandled in d alpha / d u would change the activities by the square of the step ratio (4x)."""
    runs = {h: harmonic(client, quartz.atoms, head="sio2", raman_step=h, raman_method=method)
            for h in (0.005, 0.01, 0.02)}
    for h, r in runs.items():
        assert r.info["raman_step_A"] == h and r.info["raman_method"] == method
        assert r.info["raman_displaced_structures"] == (12 if method == "symmetry" else 54)
    s = {h: r.raman_activities for h, r in runs.items()}
    active = s[0.01] > 1e-3 * s[0.01].max()
    fine = (4.0 * s[0.005] - s[0.01]) / 3.0
    coarse = (4.0 * s[0.01] - s[0.02]) / 3.0
    assert np.allclose(fine[active], coarse[active], rtol=0.01)
    strong = s[0.01] > 1e-2 * s[0.01].max()
    assert np.allclose(s[0.01][strong], fine[strong], rtol=0.03)
    assert np.allclose(s[0.01][active], fine[active], rtol=0.05)
    assert np.allclose(s[0.005][active], fine[active], rtol=0.01)


def test_raman_by_symmetry_equals_raman_along_every_mode(client, quartz):
    """12 displaced structures (2 distinct atoms x 6) expanded by the space group against 54 (every mode):
    the same activities within the finite-difference error of either (3 %), and both silent where D3 says."""
    modes = harmonic(client, quartz.atoms, head="sio2", raman_method="modes")
    s, top = quartz.raman_activities, quartz.raman_activities.max()
    active = s > 1e-3 * top
    assert quartz.info["raman_method"] == "symmetry" and quartz.info["raman_displaced_structures"] == 12
    assert np.allclose(modes.raman_activities[active], s[active], rtol=0.03)
    assert np.all(modes.raman_activities[~active] < 1e-6 * top)
    with pytest.raises(ValueError, match="raman_method"):
        harmonic(client, quartz.atoms, head="sio2", raman_method="cartesian")


def test_a_supercell_gives_all_its_modes_folded_to_gamma(client, quartz):
    """A 2x1x1 supercell: 54 modes (not phonopy's primitive-cell 27), among them the cell's own Gamma modes,
    and the same eps_0 (an intensive property)."""
    big = harmonic(client, quartz.atoms * (2, 1, 1), head="sio2")
    assert big.frequencies_cm1.shape == (54,) and big.acoustic.sum() == 3
    for f in quartz.frequencies_cm1[~quartz.acoustic]:
        assert np.min(np.abs(big.frequencies_cm1 - f)) < 0.5
    assert np.allclose(big.eps_static, quartz.eps_static, atol=2e-3)
    # 2x1x1 keeps the 2-fold axis along a1 (not the 3-fold one) and the lattice translation: 5 distinct atoms of
    # 18, 30 displaced structures against 108 along every mode; Gamma modes of the cell, repeated twice in phase,
    # have twice the Raman activity (extensive).  Compared as the total over the modes within 0.5 cm^-1 of the
    # strongest line (a sum over whole degenerate sets, free of the choice of eigenvectors): the supercell's
    # lower symmetry gives an A1 mode and an E pair that lie close the same label, so its sets differ
    assert big.info["raman_displaced_structures"] == 30
    first = quartz.optical_raman()[0]["frequency_cm1"]

    def near_first(result):
        return float(result.raman_activities[np.abs(result.frequencies_cm1 - first) < 0.5].sum())

    assert near_first(big) > 0.5 * quartz.raman_activities.max()
    assert near_first(big) == pytest.approx(2 * near_first(quartz), rel=1e-3)


def test_lo_to_splitting_of_the_strong_e_modes(client, quartz):
    lo_result = harmonic(client, quartz.atoms, head="sio2", lo_direction=(1.0, 0.0, 0.0), raman=False)
    assert lo_result.raman_activities is None and "raman_step_A" not in lo_result.info
    lo = lo_result.lo_frequencies_cm1
    # along x the polar E and A2 modes polarised along x harden (LO), nothing softens, acoustic stays at zero
    assert np.all(lo[3:] >= quartz.frequencies_cm1[3:] - 0.1) and lo.max() > quartz.frequencies_cm1.max() + 20


def test_phonons_command_writes_the_json_torch_free(default_served, tmp_path):
    out = tmp_path / "quartz.json"
    plot = tmp_path / "quartz.png"
    command = [sys.executable, "-m", "macefield_client.cli", "phonons", "alpha-quartz", "--server", default_served,
               "--head", "sio2", "--relax", "--json", str(out), "--plot", str(plot)]
    done = run_torch_free(command, torch_free_env(tmp_path))
    data = json.loads(out.read_text())
    f = np.array(data["frequencies_cm1"])
    assert f.shape == (27,) and np.all(np.diff(f) >= 0) and len(data["ir_intensities"]) == 27
    assert "e^2/amu" in data["ir_intensities_unit"]
    assert len(data["raman_activities_A4_per_amu"]) == 27 and "A^4/amu" in data["raman_activity_unit"]
    assert data["raman_active_modes"][0]["label"] == "A1"
    assert np.array(data["eps_inf"]).shape == (3, 3) and np.array(data["eps_static"]).shape == (3, 3)
    assert plot.stat().st_size > 10_000
    assert "eps_static diagonal:" in done.stdout and "Raman-active" in done.stdout


def test_phonons_command_without_raman(default_served, tmp_path):
    out = tmp_path / "quartz.json"
    command = [sys.executable, "-m", "macefield_client.cli", "phonons", "alpha-quartz", "--server", default_served,
               "--head", "sio2", "--no-raman", "--json", str(out)]
    done = run_torch_free(command, torch_free_env(tmp_path))
    assert "raman_activities_A4_per_amu" not in json.loads(out.read_text()) and "Raman" not in done.stdout
