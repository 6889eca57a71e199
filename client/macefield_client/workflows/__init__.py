"""Workflows through the service: harmonic phonons and dielectric constants, P-E hysteresis, ensemble MD,
spectra, the fluctuation eps_0 and eps(omega) from trajectories.

Torch-free like the rest of the client.  What they need beyond the client (phonopy, spglib, scipy,
matplotlib, ase) is the optional extra ``macefield-client[workflows]``; each is imported where it is used.
Formulas, units, sign conventions and defaults: docs/workflows.md.
"""

from __future__ import annotations

from .common import ContinuousPolarization, follow_branch
from .ensemble import Ensemble, run_ensemble
from .eps_md import EpsMDResult, EpsMDSettings, eps_static_md
from .fields import waveform
from .harmonic import HarmonicResult, finite_field_eps_static, harmonic
from .hysteresis import HysteresisResult, extract_loop, hysteresis
from .relax import relax
from .spectra import (DielectricFunctionResult, DielectricResult, SpectrumResult, dielectric_function,
                      eps_static_fluctuation, ir_spectrum, raman_spectrum)

__all__ = ["ContinuousPolarization", "DielectricFunctionResult", "DielectricResult", "Ensemble", "EpsMDResult",
           "EpsMDSettings", "HarmonicResult", "HysteresisResult", "SpectrumResult", "dielectric_function",
           "eps_static_fluctuation", "eps_static_md", "extract_loop", "finite_field_eps_static", "follow_branch",
           "harmonic", "hysteresis", "ir_spectrum", "raman_spectrum", "relax", "run_ensemble", "waveform"]
