"""Spectra from time series (``macefield_client.workflows.spectra``, ``macefield spectrum``) on synthetic data
with known answers: IR peaks of analytic dipoles, the quantum correction, the Raman 45 a^2 + 7 gamma^2
weights, the fluctuation eps_0, replica averaging, and the command's JSON.  Pure numpy, no server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from macefield_client.contract.constants import EPS0
from macefield_client.workflows.spectra import (C_CM_PER_FS, KB_EV_PER_K, WINDOWS, autocorrelation,
                                                eps_static_fluctuation, ir_spectrum, quantum_factor,
                                                raman_spectrum)

DT = 1.0  # fs
N = 8192
T = np.arange(N) * DT


def cosine(nu_cm1: float, phase: float = 0.0) -> np.ndarray:
    return np.cos(2.0 * np.pi * C_CM_PER_FS * nu_cm1 * T + phase)


def dipole(*terms, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """(N, 3): M_z = sum A cos(2 pi c nu t), plus white noise on every component."""
    rng = np.random.default_rng(seed)
    m = noise * rng.normal(size=(N, 3))
    for amplitude, nu in terms:
        m[:, 2] += amplitude * cosine(nu, rng.uniform(0, 2 * np.pi))
    return m


def test_autocorrelation_matches_direct_sum():
    x = np.random.default_rng(1).normal(size=(2, 64, 3))
    c = autocorrelation(x)
    direct = [[np.sum(s[:64 - m] * s[m:]) / (64 - m) for m in range(64)] for s in x]
    assert np.allclose(c, direct, atol=1e-12)  # zero-padded: no circular wrap


@pytest.mark.parametrize("window", WINDOWS)
def test_ir_single_cosine_peak(window):
    r = ir_spectrum(dipole((1.0, 1000.0), noise=0.01), DT, temperature_K=300.0, window=window, max_cm1=4000)
    assert abs(r.peaks_cm1[0] - 1000.0) < r.metadata["resolution_cm1"]
    assert r.intensity.max() == pytest.approx(1.0)
    assert "max 1" in r.metadata["normalisation"]
    assert r.frequency_cm1[-1] <= 4000


def test_ir_two_frequencies_in_order_of_strength():
    # dM/dt amplitudes 500 and 150 (A * nu): the 500 cm^-1 line is ~11x stronger classically, ~4x with Q
    r = ir_spectrum(dipole((1.0, 500.0), (0.1, 1500.0), noise=0.005), DT, temperature_K=300.0, max_cm1=4000)
    assert len(r.peaks_cm1) >= 2
    res = r.metadata["resolution_cm1"]
    assert abs(r.peaks_cm1[0] - 500.0) < res and abs(r.peaks_cm1[1] - 1500.0) < res
    # nothing zeroed: the spectrum between and beyond the peaks keeps its small positive values
    assert np.count_nonzero(r.intensity[(r.frequency_cm1 > 2500)] == 0.0) == 0


def test_quantum_correction_is_the_analytic_factor():
    m = dipole((1.0, 300.0), (0.2, 1500.0))
    classical = ir_spectrum(m, DT, quantum_correction="none", normalise=False)
    quantum = ir_spectrum(m, DT, temperature_K=300.0, normalise=False)
    nu = classical.frequency_cm1
    assert np.allclose(quantum.intensity, classical.intensity * quantum_factor(nu, 300.0), rtol=1e-12, atol=0)
    # peak heights: high frequency raised relative to low by Q(1500)/Q(300) (x = hc nu / kT)
    x = 1.438776877 * np.array([300.0, 1500.0]) / 300.0
    expected = (x[1] / (1 - np.exp(-x[1]))) / (x[0] / (1 - np.exp(-x[0])))
    i_lo, i_hi = (np.argmin(abs(nu - f)) for f in (300.0, 1500.0))
    ratio = ((quantum.intensity[i_hi] / quantum.intensity[i_lo])
             / (classical.intensity[i_hi] / classical.intensity[i_lo]))
    assert ratio == pytest.approx(expected, rel=1e-3)
    assert quantum_factor(0.0, 300.0) == 1.0


def test_raman_weights_45_a2_plus_7_gamma2():
    a_iso, a_an, nu1, nu2 = 0.3, 0.5, 600.0, 1400.0
    b = np.diag([1.0, -1.0, 0.0]) + 0.5 * (np.eye(3, k=1) + np.eye(3, k=-1))  # traceless, symmetric
    alpha = (2.0 * np.eye(3) + a_iso * cosine(nu1)[:, None, None] * np.eye(3)
             + a_an * cosine(nu2)[:, None, None] * b)
    r = raman_spectrum(alpha, DT, normalise=False, max_lag_fs=2000.0)
    nu, s = r.frequency_cm1, r.intensity
    assert np.allclose(s, 45 * r.components["isotropic"] + 7 * r.components["anisotropic"])
    band = 100.0
    area1 = s[abs(nu - nu1) < band].sum()
    area2 = s[abs(nu - nu2) < band].sum()
    # <da^2> = a_iso^2 / 2; <gamma^2> = (3/2) tr(b^2) a_an^2 / 2
    expected = (45 * a_iso ** 2 / 2) / (7 * 1.5 * np.trace(b @ b) * a_an ** 2 / 2)
    assert area1 / area2 == pytest.approx(expected, rel=0.02)
    assert r.components["isotropic"][abs(nu - nu2) < band].max() < 1e-3 * r.components["isotropic"].max()
    assert r.components["anisotropic"][abs(nu - nu1) < band].max() < 1e-3 * r.components["anisotropic"].max()
    assert sorted(np.round(r.peaks_cm1[:2], -2)) == [nu1, nu2]
    stokes = raman_spectrum(alpha, DT, normalise=False, max_lag_fs=2000.0, bose="stokes", temperature_K=300.0)
    assert np.allclose(stokes.intensity, s * quantum_factor(nu, 300.0))


def test_eps_static_from_gaussian_fluctuations():
    cov = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]])  # e^2 A^2
    volume, temperature = 120.0, 300.0
    m = np.random.default_rng(2).multivariate_normal([0.0, 0.0, 5.0], cov, size=(4, 20000))
    eps_inf = np.diag([2.0, 2.1, 2.2])
    r = eps_static_fluctuation(m, volume, temperature, eps_inf=eps_inf, blocks=5)
    expected = eps_inf + cov / (KB_EV_PER_K * temperature * volume * EPS0)
    assert np.all(np.abs(r.eps_static - expected) < 4.0 * r.stderr + 1e-9)
    assert np.all(r.stderr < 0.02 * np.abs(expected).max())
    assert np.allclose(r.eps_inf, eps_inf)
    # by hand: <M^2> 1 e^2 A^2 at kT = 1 eV in 1 A^3 -> 1 / eps0 = 180.95
    one = eps_static_fluctuation(np.array([[1.0, 0, 0], [-1.0, 0, 0]] * 8), 1.0, 1.0 / KB_EV_PER_K, eps_inf=0.0)
    assert one.eps_static[0, 0] == pytest.approx(16 / 15 / EPS0)


def test_replica_averaging_reduces_the_error_bar():
    def series(replicas):
        return np.array([dipole((1.0, 1000.0), noise=0.3, seed=s) for s in range(replicas)])

    few = ir_spectrum(series(2), DT, quantum_correction="none", normalise=False, blocks=2)
    many = ir_spectrum(series(8), DT, quantum_correction="none", normalise=False, blocks=2)
    assert few.metadata["spectra_averaged"] == 4 and many.metadata["spectra_averaged"] == 16
    ratio = np.sqrt(np.mean(few.stderr ** 2) / np.mean(many.stderr ** 2))  # mean variances: unbiased
    assert 1.6 < ratio < 2.5  # sqrt(16 / 4) = 2
    single = ir_spectrum(series(1)[0], DT, quantum_correction="none")
    assert np.isnan(single.stderr).all()


def test_cli_spectrum_writes_json(tmp_path):
    from macefield_client.cli.main import main

    rec = np.stack([dipole((1.0, 800.0), noise=0.01, seed=s)[:4096] for s in range(2)])  # (replicas, frames, 3)
    alpha = 3.0 * np.eye(3) + 0.1 * cosine(1200.0)[:4096, None, None] * np.eye(3)
    npz = tmp_path / "run.npz"
    np.savez(npz, record_time_fs=np.tile(T[:4096], (2, 1)), record_polarization_e_A2=rec / 100.0,
             record_temperature_K=np.full((2, 4096), 300.0), record_alpha_e_A2_V=np.stack([alpha, alpha]),
             timestep_fs=np.array(0.5))
    out = tmp_path / "ir.json"
    assert main(["spectrum", "ir", str(npz), "--json", str(out), "--plot", str(tmp_path / "ir.png")]) == 0
    data = json.loads(out.read_text())
    for key in ("frequency_cm1", "intensity", "peaks_cm1", "frequency_unit", "intensity_unit", "metadata"):
        assert key in data
    assert abs(data["peaks_cm1"][0] - 800.0) < data["metadata"]["resolution_cm1"]
    assert data["metadata"]["dt_fs"] == 1.0 and data["metadata"]["temperature_K"] == 300.0
    assert (tmp_path / "ir.png").stat().st_size > 0
    out = tmp_path / "raman.json"
    assert main(["spectrum", "raman", str(npz), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert abs(data["peaks_cm1"][0] - 1200.0) < data["metadata"]["resolution_cm1"]
    out = tmp_path / "eps.json"
    assert main(["spectrum", "dielectric", str(npz), "--volume", "100", "--eps-inf", "2", "--json", str(out),
                 "--plot", str(tmp_path / "eps.png")]) == 0
    data = json.loads(out.read_text())
    assert np.array(data["eps_static"]).shape == (3, 3) and data["eps_static"][0][0] > 2.0
    assert (tmp_path / "eps.png").stat().st_size > 0
