"""Spectra from time series (``macefield_client.workflows.spectra``, ``macefield spectrum``) on synthetic data
with known answers: IR peaks of analytic dipoles, the quantum correction, the Raman 45 a^2 + 7 gamma^2
weights, the fluctuation eps_0, replica averaging, and the command's JSON.  Pure numpy, no server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from macefield_client.contract.constants import EPS0
from macefield_client.workflows.spectra import (C_CM_PER_FS, KB_EV_PER_K, WINDOWS, autocorrelation,
                                                dielectric_from_correlation, dielectric_function,
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
    # dM/dt amplitudes 500 and 150 (A * nu): the 500 cm^-1 line is ~11x stronger
    r = ir_spectrum(dipole((1.0, 500.0), (0.1, 1500.0), noise=0.005), DT, temperature_K=300.0, max_cm1=4000)
    assert len(r.peaks_cm1) >= 2
    res = r.metadata["resolution_cm1"]
    assert abs(r.peaks_cm1[0] - 500.0) < res and abs(r.peaks_cm1[1] - 1500.0) < res
    # nothing zeroed: the spectrum between and beyond the peaks keeps its small positive values
    assert np.count_nonzero(r.intensity[(r.frequency_cm1 > 2500)] == 0.0) == 0


def thermal_harmonic_dipole(charges, frequencies_cm1, temperature_K, seed=0):
    """(N, 3): M_z = sum_m Z_m Q_m(t) for classical harmonic modes at ``temperature_K``: each mode-coordinate
    amplitude sqrt(2 k_B T) / omega_m, i.e. <Q_m^2> = k_B T / omega_m^2 (equipartition; unit mass)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((N, 3))
    for z, nu in zip(charges, frequencies_cm1):
        omega = 2.0 * np.pi * C_CM_PER_FS * nu
        m[:, 2] += z * np.sqrt(2.0 * 8.617333262e-5 * temperature_K) / omega * cosine(nu, rng.uniform(0, 2 * np.pi))
    return m


@pytest.mark.parametrize("temperature_K", [20.0, 300.0])
def test_ir_band_areas_of_a_harmonic_crystal_are_its_squared_mode_charges(temperature_K):
    """The default (harmonic) correction is exact for harmonic modes: band area ratio = (Z_1 / Z_2)^2 at any
    temperature, as the harmonic route's intensities; ``none`` is that divided by Q(nu)."""
    charges, nus = (1.0, 0.6), (435.0, 1045.0)
    m = thermal_harmonic_dipole(charges, nus, temperature_K)
    band = 60.0

    def areas(r):
        return [r.intensity[abs(r.frequency_cm1 - f) < band].sum() for f in nus]

    harmonic = areas(ir_spectrum(m, DT, normalise=False, max_lag_fs=2000.0))
    assert harmonic[1] / harmonic[0] == pytest.approx((charges[1] / charges[0]) ** 2, rel=0.02)
    bare = areas(ir_spectrum(m, DT, temperature_K=temperature_K, quantum_correction="none", normalise=False,
                             max_lag_fs=2000.0))
    q = quantum_factor(np.array(nus), temperature_K)
    assert bare[1] / bare[0] == pytest.approx((charges[1] / charges[0]) ** 2 * q[0] / q[1], rel=0.03)


def test_no_quantum_correction_is_the_harmonic_line_shape_divided_by_the_factor():
    m = dipole((1.0, 300.0), (0.2, 1500.0))
    harmonic = ir_spectrum(m, DT, normalise=False)
    bare = ir_spectrum(m, DT, quantum_correction="none", temperature_K=300.0, normalise=False)
    nu = harmonic.frequency_cm1
    assert np.allclose(bare.intensity, harmonic.intensity / quantum_factor(nu, 300.0), rtol=1e-12, atol=0)
    assert quantum_factor(0.0, 300.0) == 1.0
    x = 1.438776877 * 1500.0 / 300.0
    assert float(quantum_factor(1500.0, 300.0)) == pytest.approx(x / (1 - np.exp(-x)), rel=1e-12)
    with pytest.raises(ValueError, match="temperature_K"):
        ir_spectrum(m, DT, quantum_correction="none")


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


def test_eps_static_short_replicas_keep_their_variance_about_the_ensemble_mean():
    """A slow dipole (AR(1), correlation time 50 frames, unit variance per component) of 16 replicas of 400
    frames: about each replica's own mean (the default) the variance loses about 2 tau / N = 25 % (the mean of
    a short replica follows the slow motion); about the mean of all replicas (``center="all"``) it is right
    within the standard error over the blocks, and the blocks do not change it."""
    rng = np.random.default_rng(4)
    tau, frames, replicas = 50.0, 400, 16
    a = np.exp(-1.0 / tau)
    m = np.empty((replicas, frames, 3))
    m[:, 0] = rng.normal(size=(replicas, 3))
    for t in range(1, frames):
        m[:, t] = a * m[:, t - 1] + np.sqrt(1 - a * a) * rng.normal(size=(replicas, 3))
    unit = 1.0 / (KB_EV_PER_K * 300.0 * 100.0 * EPS0)  # eps of a unit variance at 300 K in 100 A^3
    about_all = eps_static_fluctuation(m, 100.0, 300.0, eps_inf=0.0, blocks=4, center="all")
    about_replicas = eps_static_fluctuation(m, 100.0, 300.0, eps_inf=0.0, blocks=4)
    diag, err = np.diag(about_all.eps_static), np.diag(about_all.stderr)
    assert np.all(np.abs(diag - unit) < 3.0 * err) and np.all(err < 0.15 * unit), (diag / unit, err / unit)
    assert np.all(np.diag(about_replicas.eps_static) < 0.9 * unit)  # the bias the ensemble mean removes
    one_block = eps_static_fluctuation(m, 100.0, 300.0, eps_inf=0.0, blocks=1, center="all")
    np.testing.assert_allclose(one_block.eps_static, about_all.eps_static, rtol=1e-12, atol=1e-12)
    assert about_all.metadata["center"] == "all" and about_replicas.metadata["center"] == "replica"
    with pytest.raises(ValueError, match="center"):
        eps_static_fluctuation(m, 100.0, 300.0, center="block")


def _strength(variance: float, volume: float, temperature: float) -> float:
    """Delta = <dM^2> / (k_B T V eps0): the oscillator strength of a dipole variance (e^2 A^2)."""
    return variance / (KB_EV_PER_K * temperature * volume * EPS0)


def test_dielectric_function_of_exact_debye_and_lorentz_correlations():
    """C(t) = s exp(-t/tau) -> eps_inf + Delta / (1 - i omega tau) (Debye); a damped oscillator's C(t) ->
    eps_inf + Delta w0^2 / (w0^2 - omega^2 - i gamma omega) (Lorentz).  Noise-free: only the quadrature
    (exact for C linear between samples) errs, by ~1e-5 (Debye) and ~2e-4 (Lorentz) of the strength."""
    volume, temperature, s, dt = 100.0, 300.0, 0.2, 0.5
    delta = _strength(s, volume, temperature)
    t = np.arange(8000) * dt
    tau = 40.0
    debye = s * np.exp(-t / tau)[:, None, None] * np.eye(3)
    nu, eps = dielectric_from_correlation(debye, dt, volume_A3=volume, temperature_K=temperature, eps_inf=2.0,
                                          window="none")
    w = 2 * np.pi * C_CM_PER_FS * nu
    expected = 2.0 + delta / (1 - 1j * w * tau)
    assert np.allclose(eps[:, 0, 0], expected, rtol=0, atol=1e-4 * delta)  # to the Nyquist frequency
    assert np.allclose(eps[:, 0, 1], 0.0) and eps[0, 2, 2].real == pytest.approx(2.0 + delta)
    w0, gamma = 2 * np.pi * C_CM_PER_FS * 500.0, 0.02  # rad/fs
    w1 = np.sqrt(w0 ** 2 - gamma ** 2 / 4)
    lorentz = s * np.exp(-gamma * t / 2) * (np.cos(w1 * t) + gamma / (2 * w1) * np.sin(w1 * t))
    nu, eps = dielectric_from_correlation(lorentz[:, None, None] * np.eye(3), dt, volume_A3=volume,
                                          temperature_K=temperature, eps_inf=2.0, window="none")
    w = 2 * np.pi * C_CM_PER_FS * nu
    expected = 2.0 + delta * w0 ** 2 / (w0 ** 2 - w ** 2 - 1j * gamma * w)
    assert np.allclose(eps[:, 1, 1], expected, rtol=0, atol=1e-3 * np.abs(expected - 2).max())
    assert np.argmax(eps[:, 1, 1].imag) == np.argmax(expected.imag)
    assert abs(nu[np.argmax(expected.imag)] - 500.0) < 10.0  # near w0 (shifted by the damping)


def _ornstein_uhlenbeck(replicas: int, frames: int, dt: float, tau: float, variance: float, seed: int) -> np.ndarray:
    """Exact discrete OU dipoles (replicas, frames, 3): <M_i(0) M_j(t)> = variance delta_ij exp(-|t|/tau)."""
    rng = np.random.default_rng(seed)
    a = np.exp(-dt / tau)
    m = np.empty((replicas, frames, 3))
    m[:, 0] = rng.normal(scale=np.sqrt(variance), size=(replicas, 3))
    kicks = rng.normal(scale=np.sqrt(variance * (1 - a * a)), size=(replicas, frames, 3))
    for k in range(1, frames):
        m[:, k] = a * m[:, k - 1] + kicks[:, k]
    return m + np.array([0.0, 1.0, -3.0])  # a static dipole changes nothing


def test_dielectric_function_of_an_ornstein_uhlenbeck_dipole():
    volume, temperature, variance, dt, tau = 150.0, 300.0, 0.5, 2.0, 30.0
    m = _ornstein_uhlenbeck(8, 4000, dt, tau, variance, seed=5)
    r = dielectric_function(m, dt, volume, temperature, eps_inf=[2.0, 2.0, 3.0], blocks=2, max_lag_fs=600.0,
                            max_cm1=2000)
    static = eps_static_fluctuation(m, volume, temperature, eps_inf=[2.0, 2.0, 3.0], blocks=2)
    # omega -> 0 is the fluctuation formula of the same series and blocks, to round-off
    assert r.frequency_cm1[0] == 0.0
    assert np.allclose(r.eps_real[0], static.eps_static, rtol=1e-10, atol=1e-10)
    assert np.allclose(r.eps_imag[0], 0.0, atol=1e-12)
    # eps'' >= 0 within noise, and the Debye form within the error bars
    delta = _strength(variance, volume, temperature)
    w = 2 * np.pi * C_CM_PER_FS * r.frequency_cm1
    assert np.all(r.isotropic_imag > -4 * np.trace(r.stderr_imag, axis1=1, axis2=2) / 3 - 1e-3 * delta)
    expected = delta / (1 - 1j * w * tau)
    for i, inf in enumerate((2.0, 2.0, 3.0)):
        assert np.all(np.abs(r.eps_real[:, i, i] - inf - expected.real) < 5 * r.stderr_real[:, i, i] + 0.03 * delta)
        assert np.all(np.abs(r.eps_imag[:, i, i] - expected.imag) < 5 * r.stderr_imag[:, i, i] + 0.03 * delta)
    assert np.all(np.abs(r.eps_imag[:, 0, 1]) < 5 * r.stderr_imag[:, 0, 1] + 0.03 * delta)
    assert r.eps_real.shape == (len(r.frequency_cm1), 3, 3) and r.frequency_cm1[-1] <= 2000
    assert r.metadata["replicas"] == 8 and r.metadata["blocks"] == 2
    # eps' falls from eps_0 to eps_inf, eps'' peaks at omega tau = 1
    peak = r.frequency_cm1[np.argmax(r.isotropic_imag)]
    assert abs(peak - 1 / (2 * np.pi * C_CM_PER_FS * tau)) < 0.25 / (2 * np.pi * C_CM_PER_FS * tau)


def test_dielectric_function_rejects_bad_input():
    m = _ornstein_uhlenbeck(1, 100, 1.0, 10.0, 1.0, seed=1)
    with pytest.raises(ValueError, match="volume_A3"):
        dielectric_function(m, 1.0, -1.0, 300.0)
    with pytest.raises(ValueError, match="eps_inf"):
        dielectric_function(m, 1.0, 10.0, 300.0, eps_inf=[1.0, 2.0])
    with pytest.raises(ValueError, match="window"):
        dielectric_function(m, 1.0, 10.0, 300.0, window="box")


def test_replica_averaging_reduces_the_error_bar():
    def series(replicas):
        return np.array([dipole((1.0, 1000.0), noise=0.3, seed=s) for s in range(replicas)])

    few = ir_spectrum(series(2), DT, normalise=False, blocks=2)
    many = ir_spectrum(series(8), DT, normalise=False, blocks=2)
    assert few.metadata["spectra_averaged"] == 4 and many.metadata["spectra_averaged"] == 16
    ratio = np.sqrt(np.mean(few.stderr ** 2) / np.mean(many.stderr ** 2))  # mean variances: unbiased
    assert 1.6 < ratio < 2.5  # sqrt(16 / 4) = 2
    single = ir_spectrum(series(1)[0], DT)
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
    function = data["dielectric_function"]
    assert function["frequency_unit"] == "cm^-1" and len(function["eps_imag_isotropic"]) == len(
        function["frequency_cm1"]) and function["frequency_cm1"][-1] <= 4000
    assert np.allclose(function["eps_real"][0], data["eps_static"], rtol=1e-10)
    assert (tmp_path / "eps.png").stat().st_size > 0


def test_ir_band_areas_do_not_fall_with_frequency_at_coarse_sampling():
    """Records 2 fs apart: the central difference's (sin(omega dt)/(omega dt))^2 (0.64 at 3000 cm^-1) is undone,
    so equal mode charges give equal band areas at 500 and 3000 cm^-1; the grid stops at half the Nyquist."""
    nus = (500.0, 3000.0)
    m = thermal_harmonic_dipole((1.0, 1.0), nus, 300.0, seed=3)[::2]
    r = ir_spectrum(m, 2.0, normalise=False, max_lag_fs=2000.0)
    a = [r.intensity[abs(r.frequency_cm1 - f) < 60.0].sum() for f in nus]
    assert a[1] / a[0] == pytest.approx(1.0, rel=0.02)
    assert r.frequency_cm1[-1] <= 0.25 / (2.0 * C_CM_PER_FS) and r.frequency_cm1[-1] > 4000.0


def ar1_dipole(replicas=8, frames=2000, tau=50.0, sigma=1.0, seed=5):
    """(replicas, frames, 3) AR(1) series with correlation time ``tau`` frames and stationary variance sigma^2."""
    rng = np.random.default_rng(seed)
    phi = np.exp(-1.0 / tau)
    x = np.zeros((replicas, frames, 3))
    x[:, 0] = sigma * rng.normal(size=(replicas, 3))
    noise = sigma * np.sqrt(1.0 - phi ** 2) * rng.normal(size=(replicas, frames, 3))
    for t in range(1, frames):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def test_fluctuation_eps0_keeps_slow_fluctuations_whatever_the_blocks():
    """A dipole with a 50-frame correlation time: eps_0 is the same with 1, 10 and 20 blocks (deviations about each
    replica's mean; blocks only set the error bar) and its fluctuation part is the exact variance within 3
    standard errors; eps(omega -> 0) stays equal to it."""
    volume, temperature = 100.0, 300.0
    x = ar1_dipole()
    exact = 1.0 / (KB_EV_PER_K * temperature * volume * EPS0)  # variance 1 (e*A)^2 per component
    results = {b: eps_static_fluctuation(x, volume, temperature, blocks=b) for b in (1, 10, 20)}
    for b, r in results.items():
        np.testing.assert_allclose(r.eps_static, results[1].eps_static, rtol=1e-12, atol=1e-12)
    r = results[20]
    for i in range(3):
        assert abs(r.eps_static[i, i] - 1.0 - exact) < 3 * r.stderr[i, i] + 0.04 * exact, (i, r.eps_static, exact)
    f = dielectric_function(x, 1.0, volume, temperature, blocks=20, max_lag_fs=99.0)
    np.testing.assert_allclose(f.eps_real[0], r.eps_static, rtol=1e-10)
