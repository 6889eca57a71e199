"""Spectra and the static dielectric tensor from MD time series: IR, Raman, fluctuation eps_0.

Inputs are the records of :class:`~.ensemble.Ensemble` (or any trajectory): the cell dipole M(t) (e*A; the
polarization P in e/A^2 gives the same normalised IR spectrum) or the polarizability alpha(t) (3x3,
e*A^2/V), sampled every ``dt_fs`` fs, one series ``(frames, ...)`` or several replicas ``(replicas, frames,
...)``.  Everything is numpy/scipy FFT; formulas (docs/workflows.md, "Spectra"):

Correlation functions (Wiener-Khinchin): for a series x(t_k), k = 0..n-1, the autocorrelation
C(tau_m) = 1/(n - m) sum_k x(t_k) . x(t_k + tau_m) (the unbiased estimate, summed over Cartesian components)
is the inverse FFT of |FFT(x)|^2 with x zero-padded to at least 2n - 1 points, so the circular wrap of the
FFT never mixes the end of the series into small lags.

Line shape: S(nu) = dt [w(0) C(0) + 2 sum_{m=1}^{L} w(tau_m) g(tau_m) C(tau_m) cos(2 pi c nu tau_m)],
nu in cm^-1 (c in cm/fs), tau_L = ``max_lag_fs``, w the lag window: ``hann`` (default) w = cos^2(pi tau /
(2 tau_L)), which goes smoothly to zero at the largest lag (no sinc ringing of a cut correlation), or
``none`` (the cut itself).  g is the optional Gaussian broadening: a Gaussian of full width at half maximum
``broadening_cm1`` convolved with the spectrum is the product g(tau) = exp(-(2 pi c sigma tau)^2 / 2),
sigma = FWHM / sqrt(8 ln 2), applied to C before the transform (exact, no edge effects on the grid).
The grid is zero-padded 4x (cosmetic interpolation); the resolution is ``resolution_cm1`` = 1 / (c tau_L)
(the full width of a line of an infinitely long signal is below it for both windows).

IR: the absorption line shape alpha(nu) n(nu).  Quantum linear response gives
alpha n ∝ omega (1 - exp(-beta hbar omega)) I(omega), I the transform of the quantum correlation
<M(0) M(t)>; MD gives the classical one, I_cl.  The quantum correction factor Q (I ≈ Q I_cl) is the
harmonic one by default, Q(nu) = beta hbar omega / (1 - exp(-beta hbar omega)), with beta hbar omega =
h c nu / (k_B T) = 1.4387769 nu/T (nu in cm^-1, T in K); it is exact for a harmonic crystal with a
dipole linear in the displacements (its Kubo-transformed correlation is the classical one) and turns the
product into alpha n ∝ beta omega^2 I_cl = beta FT<dM/dt(0) . dM/dt(t)>, the line shape computed here:
each band's area is then the square of its mode's effective charge, independent of temperature and
frequency, as in the harmonic route.  ``none``: the classical correlation put into the quantum formula
without a factor, i.e. that line shape divided by Q(nu) (high-frequency bands too weak by Q: x4.8 at
1000 cm^-1 and 300 K).  dM/dt by central differences (e*A/fs), its mean over each block removed (a
drifting M gives no zero-frequency line); the central difference sees omega as sin(omega dt)/dt, so the
line shape is divided by (sin(omega dt)/(omega dt))^2 and cut at half the Nyquist frequency, 1/(4 c dt)
(4170 cm^-1 for records 2 fs apart), where that factor is still 0.41.

Raman: a(t) = tr alpha / 3 and the traceless part b(t) = alpha - a 1; the rotational invariants are a^2
and gamma^2 = (3/2) tr(b^2) (= 1/2 [(axx-ayy)^2 + (ayy-azz)^2 + (azz-axx)^2] + 3 (axy^2 + ayz^2 + azx^2)
for a symmetric alpha).  The isotropic spectrum is the transform of <da(0) da(t)>, the anisotropic one of
(3/2) <b(0) : b(t)> (the correlation whose zero lag is <gamma^2>), and the total Raman spectrum (no
analyser) for 90-degree scattering of light polarised perpendicular to the scattering plane is
45 I_iso + 7 I_aniso (natural light would give 45 I_iso + 13 I_aniso), i.e. the 45 a^2 + 7 gamma^2
combination of the Raman activities.  The mean of alpha over each block is removed (no Rayleigh line).
``bose="stokes"``: the Stokes side with the harmonic Bose factor, (n(omega) + 1) beta hbar omega = Q(nu)
(the classical correlation is symmetric in nu; the Stokes line of a harmonic oscillator is Q times it).

Static dielectric tensor (fluctuation formula, conducting "tinfoil" boundary conditions, as in periodic MD):
eps_0,ij = eps_inf,ij + (<M_i M_j> - <M_i><M_j>) / (k_B T V eps0) with M the total cell dipole (e*A), V the
cell volume (A^3), k_B T in eV and eps0 = 0.0055263494 e/(V*A): e^2 A^2 / (e*V * A^3 * e/(V*A)) = 1.
<M> is each replica's mean over its whole run (not each block's, which would drop the slow fluctuations);
blocks only give the standard error.

Dielectric function (classical fluctuation-dissipation theorem, tinfoil boundary conditions): with
C_ij(t) = <dM_i(0) dM_j(t)> the dipole covariance at lag t (dM = M - <M>, <M> each replica's mean over
its whole run, as for eps_0; symmetrised in ij, which time reversal makes exact; scaled by N/(N - 1), N the
replica's frames, so that C(0) is the covariance of eps_0 above), the
response function chi(t) = -beta/(V eps0) dC/dt (t > 0) transforms to

    eps_ij(omega) = eps_inf,ij + beta/(V eps0) [C_ij(0) + i omega int_0^inf C_ij(t) exp(i omega t) dt]

    eps'  = eps_inf + beta/(V eps0) [C(0) - omega int_0^inf C(t) sin(omega t) dt]
    eps'' =           beta/(V eps0)        omega int_0^inf C(t) cos(omega t) dt   (>= 0: Wiener-Khinchin)

so eps(omega -> 0) is the fluctuation eps_0 exactly, and eps(omega -> inf) -> eps_inf (the convention
exp(-i omega t) for fields, eps'' > 0 for absorption).  omega = 2 pi c nu with nu in cm^-1.  The
half-sided integral is exact for C interpolated linearly between the lags 0..L (lag window w and Gaussian
broadening g applied to C as for the spectra): dt [sinc^2(theta/2) sum_{m>=1} C_m exp(i m theta) +
C_0 (1 + i theta - exp(i theta)) / theta^2], theta = omega dt, on the FFT grid zero-padded ``pad`` times
(the plain trapezoid rule errs by ~(omega dt)^2 C(0) / 12 in eps' at high frequency; this does not).
Then eps'' = (beta / (2 V eps0)) omega sinc^2(theta/2) S(nu), S the line shape of C as for the spectra.
An exponential C(t) = C(0) exp(-t/tau) gives the Debye form eps_inf + Delta / (1 - i omega tau), a damped
oscillator the Lorentz form (both tested).  This classical eps(omega) is also the quantum one under the
harmonic correction, as for IR: the quantum fluctuation-dissipation theorem holds exactly with the
Kubo-transformed correlation, which a harmonic crystal's classical correlation equals; so no factor is
applied (omega eps'' / c is the IR line shape alpha n above).

Averaging: each replica is cut into ``blocks`` contiguous blocks of equal length; every block gives one
spectrum (or covariance); the result is their mean and the standard error std / sqrt(count) (ddof = 1;
NaN with one block of one replica).  The spectrum is normalised to a maximum of 1 by default
(``normalise``; ``metadata["normalisation"]`` says which).  ``peaks_cm1``: local maxima of the mean
spectrum with a height and a prominence of at least ``peak_threshold`` (default 0.05) times its maximum,
strongest first; nothing below the threshold is set to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import C_CM_PER_S, EPS0, json_ready

#: speed of light in cm/fs
C_CM_PER_FS = C_CM_PER_S * 1e-15
#: Boltzmann constant, eV/K (CODATA 2018, exact)
KB_EV_PER_K = 8.617333262e-5
#: second radiation constant h c / k_B, cm K (CODATA 2018): beta hbar omega = HC_OVER_KB * nu[cm^-1] / T[K]
HC_OVER_KB_CM_K = 1.438776877
WINDOWS = ("hann", "none")
QUANTUM_CORRECTIONS = ("harmonic", "none")
BOSE = ("none", "stokes")


@dataclass
class SpectrumResult:
    """A spectrum on a wavenumber grid: the mean over blocks and replicas, its standard error, the peaks."""

    frequency_cm1: np.ndarray
    intensity: np.ndarray
    stderr: np.ndarray
    peaks_cm1: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)  #: Raman: isotropic and anisotropic
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({
            "frequency_cm1": self.frequency_cm1, "frequency_unit": "cm^-1",
            "intensity": self.intensity, "intensity_unit": self.metadata.get("intensity_unit"),
            "intensity_stderr": self.stderr,
            "peaks_cm1": self.peaks_cm1,
            **{f"intensity_{k}": v for k, v in self.components.items()},
            "metadata": self.metadata,
        })


@dataclass
class DielectricResult:
    """The static dielectric tensor from dipole fluctuations, with its standard error over blocks."""

    eps_static: np.ndarray   #: (3, 3)
    stderr: np.ndarray       #: (3, 3)
    eps_inf: np.ndarray      #: (3, 3)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"eps_static": self.eps_static, "eps_static_stderr": self.stderr, "eps_inf": self.eps_inf,
                           "eps_unit": "dimensionless", "metadata": self.metadata})


@dataclass
class DielectricFunctionResult:
    """eps(omega) = eps' + i eps'' from dipole fluctuations: tensors (frequency, 3, 3) and their isotropic
    average (trace / 3), the mean over blocks and its standard error."""

    frequency_cm1: np.ndarray  #: (F,) cm^-1
    eps_real: np.ndarray       #: (F, 3, 3)
    eps_imag: np.ndarray       #: (F, 3, 3)
    stderr_real: np.ndarray    #: (F, 3, 3)
    stderr_imag: np.ndarray    #: (F, 3, 3)
    eps_inf: np.ndarray        #: (3, 3)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def isotropic_real(self) -> np.ndarray:
        return np.trace(self.eps_real, axis1=-2, axis2=-1) / 3.0

    @property
    def isotropic_imag(self) -> np.ndarray:
        return np.trace(self.eps_imag, axis1=-2, axis2=-1) / 3.0

    def to_dict(self) -> dict[str, Any]:
        return json_ready({"frequency_cm1": self.frequency_cm1, "frequency_unit": "cm^-1",
                           "eps_real_isotropic": self.isotropic_real, "eps_imag_isotropic": self.isotropic_imag,
                           "eps_real": self.eps_real, "eps_imag": self.eps_imag,
                           "eps_real_stderr": self.stderr_real, "eps_imag_stderr": self.stderr_imag,
                           "eps_inf": self.eps_inf, "eps_unit": "dimensionless", "metadata": self.metadata})


# --------------------------------------------------------------------------------------------------- helpers
def _replicas(x, tail: int) -> np.ndarray:
    """``x`` as (replicas, frames, components): one series (frames, ...) or several (replicas, frames, ...)."""
    x = np.asarray(x, dtype=float)
    if x.ndim == tail + 1:
        x = x[None]
    if x.ndim != tail + 2:
        raise ValueError(f"expected (frames, ...) or (replicas, frames, ...) with {tail} trailing axis(es), "
                         f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the series has non-finite values (not recorded?)")
    return x.reshape(x.shape[0], x.shape[1], -1)


#: what fluctuations are measured from: each replica's mean over its run, or the mean of all replicas' frames
CENTERS = ("replica", "all")


def _deviation_blocks(x: np.ndarray, blocks: int, center: str = "replica") -> tuple[np.ndarray, int]:
    """(replicas, frames, k) -> (deviations in blocks (replicas * blocks, m, k), frames the mean was taken over):
    the deviation of every frame from its replica's mean over all its m * blocks frames used (``replica``) or
    from the mean of every such frame of every replica (``all``), then cut into blocks.

    About a whole-run mean, not each block's: a block's own mean would drop every fluctuation slower than a
    block (the soft modes that dominate eps_0) and bias the covariance low, more so with more blocks.
    """
    if blocks < 1:
        raise ValueError(f"blocks: at least 1, got {blocks}")
    if center not in CENTERS:
        raise ValueError(f"center: one of {', '.join(CENTERS)}, got {center!r}")
    m = x.shape[1] // blocks
    x = x[:, :m * blocks]
    if center == "replica":
        return _blocks(x - x.mean(axis=1, keepdims=True), blocks), m * blocks
    return _blocks(x - x.reshape(-1, x.shape[-1]).mean(axis=0), blocks), x.shape[0] * m * blocks


def _blocks(x: np.ndarray, blocks: int) -> np.ndarray:
    """(replicas, frames, k) -> (replicas * blocks, frames // blocks, k): contiguous equal blocks."""
    if blocks < 1:
        raise ValueError(f"blocks: at least 1, got {blocks}")
    r, n, k = x.shape
    m = n // blocks
    if m < 4:
        raise ValueError(f"{n} frames in {blocks} blocks: too short (at least 4 frames per block)")
    return x[:, :m * blocks].reshape(r, blocks, m, k).reshape(r * blocks, m, k)


def autocorrelation(x: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Unbiased autocorrelation along axis -2, summed over the last axis: x (..., n, k) -> C (..., L + 1),
    C(m) = 1/(n - m) sum_t x(t) . x(t + m), by FFT with zero-padding to >= 2n - 1 (no circular wrap)."""
    from scipy import fft

    n = x.shape[-2]
    lag = n - 1 if max_lag is None else min(int(max_lag), n - 1)
    size = fft.next_fast_len(2 * n - 1)
    f = fft.rfft(x, n=size, axis=-2)
    c = fft.irfft((f * f.conj()).real.sum(axis=-1), n=size, axis=-1)[..., :lag + 1]
    return c / (n - np.arange(lag + 1))


def quantum_factor(nu_cm1, temperature_K: float) -> np.ndarray:
    """Q(nu) = x / (1 - exp(-x)), x = h c nu / (k_B T): the harmonic quantum correction factor (1 at nu = 0).

    Quantum spectrum ≈ Q times the classical one: the Stokes Raman line shape; for IR it is already in
    the beta omega^2 I_cl line shape of :func:`ir_spectrum` (see the module doc)."""
    x = HC_OVER_KB_CM_K * np.asarray(nu_cm1, dtype=float) / float(temperature_K)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(np.abs(x) < 1e-12, 1.0, x / -np.expm1(-x))
    return q


def lag_window(name: str, lags: int) -> np.ndarray:
    """The one-sided lag window w(m), m = 0..L: ``hann`` cos^2(pi m / (2 L)) or ``none`` (ones)."""
    if name == "hann":
        return np.cos(0.5 * np.pi * np.arange(lags + 1) / max(lags, 1)) ** 2
    if name == "none":
        return np.ones(lags + 1)
    raise ValueError(f"window: one of {', '.join(WINDOWS)}, got {name!r}")


def lag_weights(window: str, lags: int, dt_fs: float, broadening_cm1: float = 0.0) -> np.ndarray:
    """The weights (L + 1,) applied to a correlation before its transform: the lag window times, for
    ``broadening_cm1`` > 0, the Gaussian exp(-(2 pi c sigma tau)^2 / 2) whose transform has that FWHM (cm^-1)."""
    w = lag_window(window, lags)
    if broadening_cm1 > 0:
        tau = np.arange(lags + 1) * dt_fs
        sigma = broadening_cm1 / math.sqrt(8.0 * math.log(2.0))
        w = w * np.exp(-0.5 * (2.0 * np.pi * C_CM_PER_FS * sigma * tau) ** 2)
    return w


def line_shape(c: np.ndarray, dt_fs: float, window: str = "hann", broadening_cm1: float = 0.0,
               pad: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The cosine transform of a one-sided correlation C(m dt) (..., L + 1): (nu in cm^-1, S(nu)) with
    S = dt [w C](0) + 2 dt sum_m [w g C](m) cos(2 pi c nu m dt) (units of C times fs)."""
    from scipy import fft

    lags = c.shape[-1] - 1
    w = lag_weights(window, lags, dt_fs, broadening_cm1)
    size = fft.next_fast_len(max(2 * lags, 2) * pad)
    seq = np.zeros(c.shape[:-1] + (size,))
    seq[..., :lags + 1] = c * w
    if lags > 0:
        seq[..., size - lags:] = (c * w)[..., 1:][..., ::-1]
    s = fft.rfft(seq, axis=-1).real * dt_fs
    nu = fft.rfftfreq(size, dt_fs) / C_CM_PER_FS
    return nu, s


def find_peaks_cm1(nu: np.ndarray, s: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """Local maxima of ``s`` with height and prominence >= ``threshold`` * max(s), strongest first (cm^-1)."""
    from scipy.signal import find_peaks

    top = float(np.max(s)) if s.size else 0.0
    if top <= 0:
        return np.zeros(0)
    idx, _ = find_peaks(s, height=threshold * top, prominence=threshold * top)
    idx = idx[np.argsort(-s[idx], kind="stable")]
    return nu[idx]


def _max_lag(max_lag_fs: float | None, dt_fs: float, frames: int) -> int:
    if max_lag_fs is None:
        return max(frames // 2, 1)
    lags = int(round(max_lag_fs / dt_fs))
    if lags < 1 or lags > frames - 1:
        raise ValueError(f"max_lag_fs: between {dt_fs:g} and {(frames - 1) * dt_fs:g} fs for blocks of {frames} "
                         f"frames, got {max_lag_fs:g}")
    return lags


def _finish(nu, spectra: np.ndarray, *, max_cm1, normalise: bool, peak_threshold: float, metadata: dict,
            components: dict | None = None) -> SpectrumResult:
    """Mean and standard error over the (count, grid) spectra, cut at ``max_cm1``, normalised, peaks."""
    keep = nu <= (np.inf if max_cm1 is None else float(max_cm1))
    nu, spectra = nu[keep], spectra[:, keep]
    count = spectra.shape[0]
    mean = spectra.mean(axis=0)
    err = spectra.std(axis=0, ddof=1) / math.sqrt(count) if count > 1 else np.full_like(mean, np.nan)
    comps = {k: v.mean(axis=0)[keep] for k, v in (components or {}).items()}
    scale = 1.0
    if normalise:
        scale = float(np.max(mean)) if np.max(mean) > 0 else 1.0
        metadata["normalisation"] = ("divided by the maximum of the mean spectrum (intensity max 1); "
                                     f"factor {scale:.6g} {metadata['intensity_unit_raw']}")
        metadata["intensity_unit"] = "arbitrary (normalised to max 1)"
    else:
        metadata["normalisation"] = "none"
        metadata["intensity_unit"] = metadata["intensity_unit_raw"]
    metadata["spectra_averaged"] = count
    metadata["peak_threshold"] = peak_threshold
    metadata["peak_rule"] = (f"local maxima with height and prominence >= {peak_threshold:g} x the maximum, "
                             "strongest first; no part of the spectrum is set to zero")
    return SpectrumResult(nu, mean / scale, err / scale, find_peaks_cm1(nu, mean, peak_threshold),
                          {k: v / scale for k, v in comps.items()}, metadata)


def _settings(dt_fs, lags, frames, window, broadening_cm1, blocks, replicas, temperature_K) -> dict[str, Any]:
    return {"dt_fs": float(dt_fs), "max_lag_fs": lags * float(dt_fs), "block_frames": frames,
            "block_length_fs": frames * float(dt_fs), "blocks": blocks, "replicas": replicas, "window": window,
            "broadening_fwhm_cm1": float(broadening_cm1), "temperature_K": temperature_K,
            "resolution_cm1": 1.0 / (C_CM_PER_FS * lags * dt_fs),
            "nyquist_cm1": 0.5 / (dt_fs * C_CM_PER_FS)}


# --------------------------------------------------------------------------------------------------- spectra
def ir_spectrum(dipole, dt_fs: float, *, temperature_K: float | None = None, window: str = "hann",
                max_lag_fs: float | None = None, broadening_cm1: float = 0.0, quantum_correction: str = "harmonic",
                blocks: int = 1, max_cm1: float | None = None, normalise: bool = True,
                peak_threshold: float = 0.05) -> SpectrumResult:
    """IR absorption line shape from a dipole series M(t) (e*A, or P in e/A^2), ``dt_fs`` fs apart.

    ``dipole``: (frames, 3) or (replicas, frames, 3).  ``max_lag_fs``: default half a block.
    ``quantum_correction``: ``harmonic`` (default: beta omega^2 I_cl, exact band areas for a harmonic
    crystal) or ``none`` (that divided by Q(nu); needs ``temperature_K``).  See the module doc.
    """
    if quantum_correction not in QUANTUM_CORRECTIONS:
        raise ValueError(f"quantum_correction: one of {', '.join(QUANTUM_CORRECTIONS)}, got {quantum_correction!r}")
    if quantum_correction == "none" and not temperature_K:
        raise ValueError("quantum_correction='none' needs temperature_K > 0 (it divides the harmonic line shape "
                         "by Q(nu))")
    x = _replicas(dipole, 1)
    replicas = x.shape[0]
    x = _blocks(x, blocks)
    v = np.gradient(x, dt_fs, axis=1)
    v = v - v.mean(axis=1, keepdims=True)
    lags = _max_lag(max_lag_fs, dt_fs, x.shape[1])
    nu, s = line_shape(autocorrelation(v, lags), dt_fs, window, broadening_cm1)
    # the central difference sees omega as sin(omega dt) / dt: undo its (sin(theta) / theta)^2 up to half the
    # Nyquist frequency (theta = pi/2, factor 0.405) and cut the grid there
    half_nyquist = 0.25 / (dt_fs * C_CM_PER_FS)
    max_cm1 = half_nyquist if max_cm1 is None else min(float(max_cm1), half_nyquist)
    theta = 2.0 * np.pi * C_CM_PER_FS * dt_fs * nu
    s = s / np.where(nu <= half_nyquist, np.sinc(theta / np.pi) ** 2, 1.0)
    if quantum_correction == "none":
        s = s / quantum_factor(nu, float(temperature_K))  # type: ignore[arg-type]
    meta = _settings(dt_fs, lags, x.shape[1], window, broadening_cm1, blocks, replicas, temperature_K)
    meta.update(kind="ir", quantum_correction=quantum_correction,
                quantity=("FT<dM/dt(0) . dM/dt(t)> = omega^2 FT<M(0) M(t)> (alpha n up to beta and constants; "
                          "the harmonic quantum correction)" if quantum_correction == "harmonic" else
                          "FT<dM/dt(0) . dM/dt(t)> x (1 - exp(-beta hbar omega)) / (beta hbar omega) "
                          "(no quantum correction)"),
                derivative="central differences, divided by (sin(omega dt) / (omega dt))^2; grid cut at half the "
                           f"Nyquist frequency ({half_nyquist:.0f} cm^-1)",
                intensity_unit_raw="(e*A/fs)^2 fs (with a dipole in e*A)")
    return _finish(nu, s, max_cm1=max_cm1, normalise=normalise, peak_threshold=peak_threshold, metadata=meta)


def raman_spectrum(alpha, dt_fs: float, *, temperature_K: float | None = None, window: str = "hann",
                   max_lag_fs: float | None = None, broadening_cm1: float = 0.0, bose: str = "none",
                   blocks: int = 1, max_cm1: float | None = None, normalise: bool = True,
                   peak_threshold: float = 0.05) -> SpectrumResult:
    """Unpolarised Raman line shape 45 I_iso + 7 I_aniso from alpha(t) (e*A^2/V, 3x3 per frame).

    ``alpha``: (frames, 3, 3) or (replicas, frames, 3, 3) (or 9 per frame, row-major).  ``components``
    holds ``isotropic`` (<da da>, the a^2 invariant) and ``anisotropic`` ((3/2) <b : b>, the gamma^2
    invariant), normalised with the same factor.  ``bose``: ``none`` (default, the classical symmetric
    line shape) or ``stokes`` (needs ``temperature_K``).  See the module doc.
    """
    if bose not in BOSE:
        raise ValueError(f"bose: one of {', '.join(BOSE)}, got {bose!r}")
    if bose == "stokes" and not temperature_K:
        raise ValueError("the Stokes/Bose factor needs temperature_K > 0")
    a = np.asarray(alpha, dtype=float)
    if a.shape[-1] == 9:
        a = a.reshape(a.shape[:-1] + (3, 3))
    x = _replicas(a, 2)
    replicas = x.shape[0]
    x = _blocks(x, blocks)
    x = x - x.mean(axis=1, keepdims=True)
    m = x.reshape(x.shape[0], x.shape[1], 3, 3)
    iso = (np.trace(m, axis1=-2, axis2=-1) / 3.0)[..., None]
    aniso = (m - iso[..., None] * np.eye(3)).reshape(x.shape)
    lags = _max_lag(max_lag_fs, dt_fs, x.shape[1])
    nu, s_iso = line_shape(autocorrelation(iso, lags), dt_fs, window, broadening_cm1)
    _, s_an = line_shape(1.5 * autocorrelation(aniso, lags), dt_fs, window, broadening_cm1)
    if bose == "stokes":
        q = quantum_factor(nu, float(temperature_K))  # type: ignore[arg-type]
        s_iso, s_an = s_iso * q, s_an * q
    total = 45.0 * s_iso + 7.0 * s_an
    meta = _settings(dt_fs, lags, x.shape[1], window, broadening_cm1, blocks, replicas, temperature_K)
    meta.update(kind="raman", bose=bose,
                quantity="45 I_iso + 7 I_aniso (90-degree scattering of light polarised perpendicular to the "
                         "scattering plane, no analyser)",
                intensity_unit_raw="(e*A^2/V)^2 fs")
    return _finish(nu, total, max_cm1=max_cm1, normalise=normalise, peak_threshold=peak_threshold, metadata=meta,
                   components={"isotropic": s_iso, "anisotropic": s_an})


def _eps_inf_tensor(eps_inf) -> np.ndarray:
    """eps_inf given as None (1), a number, 3 diagonal values or 3x3, as a 3x3 tensor."""
    inf = np.eye(3) if eps_inf is None else np.asarray(eps_inf, dtype=float)
    if inf.size == 1:
        return float(inf.reshape(-1)[0]) * np.eye(3)
    if inf.shape == (3,):
        return np.diag(inf)
    if inf.size != 9:
        raise ValueError(f"eps_inf: a number, 3 diagonal values or a 3x3 tensor, got shape {inf.shape}")
    return inf.reshape(3, 3)


def dielectric_from_correlation(c, dt_fs: float, *, volume_A3: float, temperature_K: float, eps_inf=None,
                                window: str = "hann", broadening_cm1: float = 0.0,
                                pad: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(nu in cm^-1, eps(nu) complex (..., F, 3, 3)) from a dipole covariance C_ij(m dt) (..., L + 1, 3, 3) in
    (e*A)^2: eps_inf + beta/(V eps0) [C(0) + i omega int_0^inf C(t) exp(i omega t) dt] (module doc)."""
    from scipy import fft

    if volume_A3 <= 0 or temperature_K <= 0:
        raise ValueError(f"volume_A3 and temperature_K must be > 0, got {volume_A3} and {temperature_K}")
    if pad < 1:
        raise ValueError(f"pad: at least 1, got {pad}")
    c = np.asarray(c, dtype=float)
    lags = c.shape[-3] - 1
    w = lag_weights(window, lags, dt_fs, broadening_cm1)
    size = fft.next_fast_len(max(2 * lags, 2) * pad)
    seq = c * w[:, None, None]
    nu = fft.rfftfreq(size, dt_fs) / C_CM_PER_FS
    theta = (2.0 * np.pi * C_CM_PER_FS * dt_fs) * nu  # omega dt
    # int_0^inf C(t) exp(i omega t) dt of C interpolated linearly between the lags (exact for it):
    # dt [sinc^2(theta/2) sum_{m>=1} C_m exp(i m theta) + C_0 (1 + i theta - exp(i theta)) / theta^2]
    tail = fft.rfft(seq, n=size, axis=-3).conj() - seq[..., :1, :, :]  # sum_{m>=1} C_m exp(+i m theta)
    half = np.sinc(theta / (2.0 * np.pi)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        head = np.where(theta > 1e-4, (1.0 + 1j * theta - np.exp(1j * theta)) / np.maximum(theta, 1e-300) ** 2,
                        0.5 + 1j * theta / 6.0)
    integral = dt_fs * (half[:, None, None] * tail + head[:, None, None] * seq[..., :1, :, :])
    omega = theta / dt_fs  # rad/fs
    scale = 1.0 / (KB_EV_PER_K * float(temperature_K) * float(volume_A3) * EPS0)
    chi = scale * (c[..., :1, :, :] + 1j * omega[:, None, None] * integral)
    return nu, _eps_inf_tensor(eps_inf) + chi


def dielectric_function(dipole, dt_fs: float, volume_A3: float, temperature_K: float, *, eps_inf=None,
                        window: str = "hann", max_lag_fs: float | None = None, broadening_cm1: float = 0.0,
                        pad: int = 4, blocks: int = 1, max_cm1: float | None = None,
                        center: str = "replica") -> DielectricFunctionResult:
    """eps(omega) from the cell dipole M(t) (e*A, continuous: no jumps of a polarization quantum), ``dt_fs``
    fs apart, of a cell of ``volume_A3`` A^3 at ``temperature_K`` K (module doc, "Dielectric function").

    ``dipole``: (frames, 3) or (replicas, frames, 3).  ``eps_inf`` as for :func:`eps_static_fluctuation`.
    ``max_lag_fs``: default half a block; ``window``: ``hann`` (default) or ``none``; ``pad``: zero-padding
    factor of the frequency grid (default 4); ``center`` as for :func:`eps_static_fluctuation`.  Its
    omega -> 0 limit equals :func:`eps_static_fluctuation` of the same series, blocks and center.
    """
    x = _replicas(dipole, 1)
    replicas = x.shape[0]
    d, frames = _deviation_blocks(x, blocks, center)
    n = d.shape[1]
    lags = _max_lag(max_lag_fs, dt_fs, n)
    # C_ij(m) = 1/(n - m) sum_t d_i(t) d_j(t + m), symmetrised, for every pair ij (autocorrelation of the
    # sums d_i + d_j gives the cross terms: C_ij + C_ji = C_(i+j) - C_ii - C_jj)
    diag = np.stack([autocorrelation(d[..., i:i + 1], lags) for i in range(3)], axis=-1)
    c = np.zeros(diag.shape[:-1] + (3, 3))
    for i in range(3):
        c[..., i, i] = diag[..., i]
        for j in range(i + 1, 3):
            pair = autocorrelation(d[..., i:i + 1] + d[..., j:j + 1], lags)
            c[..., i, j] = c[..., j, i] = 0.5 * (pair - diag[..., i] - diag[..., j])
    c *= frames / (frames - 1.0)  # the mean is estimated from these frames (ddof = 1)
    nu, eps = dielectric_from_correlation(c, dt_fs, volume_A3=volume_A3, temperature_K=temperature_K,
                                          eps_inf=eps_inf, window=window, broadening_cm1=broadening_cm1, pad=pad)
    keep = nu <= (np.inf if max_cm1 is None else float(max_cm1))
    nu, eps = nu[keep], eps[:, keep]
    count = eps.shape[0]

    def err(part: np.ndarray) -> np.ndarray:
        return part.std(axis=0, ddof=1) / math.sqrt(count) if count > 1 else np.full(part.shape[1:], np.nan)

    meta = _settings(dt_fs, lags, n, window, broadening_cm1, blocks, replicas, temperature_K)
    meta.update(kind="dielectric_function", volume_A3=float(volume_A3), pad=pad,
                eps_inf_source="given" if eps_inf is not None else "default 1 (vacuum: electronic part missing)",
                formula="eps_inf + beta/(V eps0) [C(0) + i omega int_0^inf C(t) exp(i omega t) dt], "
                        "C_ij(t) = <dM_i(0) dM_j(t)>, classical, tinfoil boundary conditions")
    return DielectricFunctionResult(nu, eps.real.mean(axis=0), eps.imag.mean(axis=0), err(eps.real),
                                    err(eps.imag), _eps_inf_tensor(eps_inf), meta)


def eps_static_fluctuation(dipole, volume_A3: float, temperature_K: float, *, eps_inf=None,
                           blocks: int = 1, center: str = "replica") -> DielectricResult:
    """eps_0 = eps_inf + (<M M^T> - <M><M>^T) / (k_B T V eps0): M the cell dipole (e*A), V in A^3, T in K.

    ``dipole``: (frames, 3) or (replicas, frames, 3), continuous (no jumps of a polarization quantum).
    ``eps_inf``: a number, 3 diagonal values or a 3x3 tensor (default 1: vacuum; the electronic part is then
    missing).  Deviations are taken about a mean over whole runs, ``center``: ``replica`` (default) each
    replica's own mean (its P is continuous, so its branch does not matter; replicas of different
    structures), ``all`` the mean of every frame of every replica (replicas of one equilibrium ensemble:
    short runs then lose nothing to the estimated mean); ddof = 1 for that mean.  The covariance is
    averaged over the blocks of every replica, which only set the standard error: the estimate does not
    depend on ``blocks``.  (About each block's own mean, every fluctuation slower than a block would be
    dropped and eps_0 biased low.)
    """
    if volume_A3 <= 0 or temperature_K <= 0:
        raise ValueError(f"volume_A3 and temperature_K must be > 0, got {volume_A3} and {temperature_K}")
    x = _replicas(dipole, 1)
    replicas = x.shape[0]
    d, frames = _deviation_blocks(x, blocks, center)
    cov = np.einsum("bti,btj->bij", d, d) / d.shape[1] * (frames / (frames - 1.0))
    kT = KB_EV_PER_K * float(temperature_K)
    eps = cov / (kT * float(volume_A3) * EPS0)
    count = eps.shape[0]
    err = eps.std(axis=0, ddof=1) / math.sqrt(count) if count > 1 else np.full((3, 3), np.nan)
    inf = _eps_inf_tensor(eps_inf)
    meta = {"kind": "dielectric", "volume_A3": float(volume_A3), "temperature_K": float(temperature_K),
            "kT_eV": kT, "blocks": blocks, "center": center, "replicas": replicas,
            "block_frames": int(d.shape[1]),
            "dipole_covariance_e2A2": cov.mean(axis=0),
            "eps_inf_source": "given" if eps_inf is not None else "default 1 (vacuum: electronic part missing)",
            "formula": "eps_inf + (<M M> - <M><M>) / (k_B T V eps0), tinfoil boundary conditions; "
                       "e^2 A^2 / (eV A^3 e/(V A)) = 1"}
    return DielectricResult(inf + eps.mean(axis=0), err, inf, meta)


__all__ = ["BOSE", "C_CM_PER_FS", "HC_OVER_KB_CM_K", "KB_EV_PER_K", "QUANTUM_CORRECTIONS", "WINDOWS",
           "CENTERS", "DielectricFunctionResult", "DielectricResult", "SpectrumResult", "autocorrelation",
           "dielectric_from_correlation", "dielectric_function", "eps_static_fluctuation", "find_peaks_cm1",
           "ir_spectrum", "lag_weights", "lag_window", "line_shape", "quantum_factor", "raman_spectrum"]
