"""Workflows through the service: harmonic phonons and dielectric constants, P-E hysteresis, ensemble MD.

Torch-free like the rest of the client.  What they need beyond the client (phonopy, spglib, scipy,
matplotlib, ase) is the optional extra ``macefield-client[workflows]``; each is imported where it is used.
Formulas, units, sign conventions and defaults: docs/workflows.md.
"""

from __future__ import annotations

from .common import ContinuousPolarization, follow_branch
from .ensemble import Ensemble, run_ensemble
from .fields import waveform
from .harmonic import HarmonicResult, finite_field_eps_static, harmonic
from .hysteresis import HysteresisResult, extract_loop, hysteresis
from .relax import relax

__all__ = ["ContinuousPolarization", "Ensemble", "HarmonicResult", "HysteresisResult", "extract_loop",
           "finite_field_eps_static", "follow_branch", "harmonic", "hysteresis", "relax", "run_ensemble", "waveform"]
