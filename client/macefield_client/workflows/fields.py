"""Time-dependent fields for the workflows: constant, any callable of time, or a named waveform.

``E(t)`` is in V/A with t in fs.  Named waveforms along a unit direction d with amplitude E0 and period T:

* ``cosine``:   E(t) = E0 cos(2 pi t / T) d                      (the hysteresis protocol of arXiv:2508.17870)
* ``triangle``: E(t) = E0 tri(t / T) d, tri(0) = 1, tri(1/2) = -1, linear in between (same extremes and zeros
  as the cosine)
* ``gaussian``: E(t) = E0 exp(-(t - t0)^2 / (2 sigma^2)) d       (a pulse; ``period`` unused)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}
WAVEFORMS = ("cosine", "triangle", "gaussian")


def waveform(name: str, amplitude: float, direction: Any, period_fs: float = 0.0, *, centre_fs: float = 0.0,
             sigma_fs: float = 0.0) -> Callable[[float], np.ndarray]:
    """A named waveform E(t) (V/A, t in fs) along ``direction`` (an axis name or a vector, normalised)."""
    d = np.asarray(AXES[direction] if isinstance(direction, str) else direction, dtype=float)
    d = d / np.linalg.norm(d)
    if name == "cosine":
        return lambda t: amplitude * np.cos(2.0 * np.pi * t / period_fs) * d
    if name == "triangle":
        def tri(t: float) -> np.ndarray:
            phase = (t / period_fs) % 1.0
            return amplitude * (1.0 - 4.0 * phase if phase < 0.5 else -3.0 + 4.0 * phase) * d
        return tri
    if name == "gaussian":
        return lambda t: amplitude * np.exp(-0.5 * ((t - centre_fs) / sigma_fs) ** 2) * d
    raise ValueError(f"waveform: one of {', '.join(WAVEFORMS)}, got {name!r}")


def field_of_time(spec: Any) -> Callable[[float], np.ndarray]:
    """E(t) from None (zero), a constant (3,) V/A, or a callable of time in fs returning (3,) V/A."""
    if spec is None:
        zero = np.zeros(3)
        return lambda t: zero
    if callable(spec):
        return lambda t: np.asarray(spec(t), dtype=float).reshape(3)
    constant = np.asarray(spec, dtype=float).reshape(3)
    return lambda t: constant


__all__ = ["AXES", "WAVEFORMS", "field_of_time", "waveform"]
