"""Figures of the workflows (matplotlib, Agg backend: files, no display)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lorentzian_spectrum(centres, weights, grid, fwhm: float) -> np.ndarray:
    """sum_m w_m L(x - x_m) with unit-area Lorentzians of full width ``fwhm`` (same units as ``grid``)."""
    g = 0.5 * fwhm
    x = np.asarray(grid)[:, None] - np.asarray(centres)[None, :]
    return (g / np.pi / (x ** 2 + g ** 2)) @ np.asarray(weights)


def plot_phonons(result, path: str, fwhm: float = 10.0) -> None:
    """IR spectrum of a :class:`~.harmonic.HarmonicResult`: sticks and Lorentzians (FWHM ``fwhm`` cm^-1),
    the IR-active sets annotated with frequency and label."""
    plt = _pyplot()
    freqs = result.frequencies_cm1
    top = max(float(freqs.max()) * 1.1, 100.0)
    grid = np.linspace(0.0, top, 4000)
    optical = ~result.acoustic
    spectrum = lorentzian_spectrum(freqs[optical], result.ir_intensities[optical], grid, fwhm)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(grid, spectrum / max(spectrum.max(), 1e-30), color="C0", label=f"Lorentzian, FWHM {fwhm:g} cm$^{{-1}}$")
    peak = max(result.ir_intensities[optical].max(), 1e-30)
    ax.vlines(freqs[optical], 0, result.ir_intensities[optical] / peak, color="C1", lw=1.5, label="modes (sticks)")
    for row in result.optical_ir()[:6]:
        y = row["intensity_e2_per_amu"] / row["degeneracy"] / peak
        ax.annotate(f"{row['frequency_cm1']:.0f} ({row['label']})", (row["frequency_cm1"], y), xytext=(0, 6),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("IR intensity (normalised to the strongest mode)")
    eps0 = np.diag(result.eps_static)
    epsi = np.diag(result.eps_inf)
    ax.set_title(f"{result.atoms.get_chemical_formula()} harmonic IR; "
                 f"eps_inf {epsi[0]:.2f}/{epsi[1]:.2f}/{epsi[2]:.2f}, eps_0 {eps0[0]:.2f}/{eps0[1]:.2f}/{eps0[2]:.2f}",
                 fontsize=9)
    ax.set_xlim(0, top)
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_loop(loop, path: str) -> None:
    """The P-E loop of a :class:`~.hysteresis.HysteresisResult` with Pr, Ec and Ps marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    e = np.asarray(loop.field_MV_cm)
    p = np.asarray(loop.polarization_uC_cm2)
    ax.plot(e, p, color="C0", lw=1.2, label="P(E)")
    x = loop.extracted
    for pr in (x["remanent_polarization_plus_uC_cm2"], x["remanent_polarization_minus_uC_cm2"]):
        if np.isfinite(pr):
            ax.plot([0.0], [pr], "o", color="C3")
    for ec in (x["coercive_field_plus_MV_cm"], x["coercive_field_minus_MV_cm"]):
        if np.isfinite(ec):
            ax.plot([ec], [0.0], "s", color="C2")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("E (MV/cm)")
    ax.set_ylabel("P (µC/cm²)")
    ax.set_title(f"Pr = {x['remanent_polarization_uC_cm2']:.1f} µC/cm², Ec = {x['coercive_field_MV_cm']:.1f} MV/cm, "
                 f"Ps = {x['saturation_polarization_uC_cm2']:.1f} µC/cm²", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_spectrum(result, path: str, annotate: int = 8) -> None:
    """A :class:`~.spectra.SpectrumResult`: the mean spectrum, its standard-error band, the peaks annotated."""
    plt = _pyplot()
    nu, s, err = result.frequency_cm1, result.intensity, result.stderr
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(nu, s, color="C0", lw=1.0)
    if np.isfinite(err).any():
        ax.fill_between(nu, s - err, s + err, color="C0", alpha=0.3, lw=0, label="standard error")
        ax.legend(fontsize=8)
    for p in result.peaks_cm1[:annotate]:
        y = float(np.interp(p, nu, s))
        ax.annotate(f"{p:.0f}", (p, y), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    meta = result.metadata
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel(f"{'IR absorption' if meta.get('kind') == 'ir' else 'Raman intensity'} "
                  f"({meta.get('intensity_unit')})", fontsize=9)
    ax.set_title(f"{meta.get('kind', '').upper()}: window {meta.get('window')}, max lag {meta.get('max_lag_fs'):g} fs, "
                 f"resolution {meta.get('resolution_cm1'):.1f} cm$^{{-1}}$", fontsize=9)
    ax.set_xlim(0, float(nu[-1]))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_eps_convergence(dipole, dt_fs: float, volume_A3: float, temperature_K: float, result, path: str) -> None:
    """The diagonal of the fluctuation eps_0 over the first t of every replica, against t (ps)."""
    from .spectra import KB_EV_PER_K
    from .common import EPS0

    plt = _pyplot()
    m = np.asarray(dipole, dtype=float)
    m = m[None] if m.ndim == 2 else m
    n = m.shape[1]
    ends = np.unique(np.linspace(8, n, 60).astype(int))
    diag = np.diag(result.eps_inf)
    curves = []
    for e in ends:
        d = m[:, :e] - m[:, :e].mean(axis=1, keepdims=True)
        var = (d ** 2).sum(axis=1).sum(axis=0) / (m.shape[0] * (e - 1))
        curves.append(diag + var / (KB_EV_PER_K * temperature_K * volume_A3 * EPS0))
    curves_a = np.array(curves)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate("xyz"):
        ax.plot(ends * dt_fs / 1000.0, curves_a[:, i], label=f"eps_0,{name}{name} = {result.eps_static[i, i]:.2f}")
    ax.set_xlabel("simulation time per replica (ps)")
    ax.set_ylabel("static dielectric constant eps_0 (dimensionless)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


__all__ = ["lorentzian_spectrum", "plot_eps_convergence", "plot_loop", "plot_phonons", "plot_spectrum"]
