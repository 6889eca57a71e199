"""Workflows through the service: harmonic phonons and dielectric constants, P-E hysteresis, ensemble MD.

Torch-free like the rest of the client.  What they need beyond the client (phonopy, spglib, scipy,
matplotlib, ase) is the optional extra ``macefield-client[workflows]``; each is imported where it is used.
Formulas, units, sign conventions and defaults: docs/workflows.md.
"""

from __future__ import annotations

from .common import ContinuousPolarization, follow_branch
from .harmonic import HarmonicResult, finite_field_eps_static, harmonic
from .relax import relax

__all__ = ["ContinuousPolarization", "HarmonicResult", "finite_field_eps_static", "follow_branch", "harmonic", "relax"]
