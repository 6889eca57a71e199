"""Applied electric fields for MD bridges: constant, a cosine with a Gaussian envelope, or any function of the step.

The MD bridges (``macefield-ipi``, :mod:`macefield_client.lammps`) evaluate
the model *inside* F(R, E) at the field of each step: the full non-linear
response, not the linear Z*.E coupling.  A :class:`FieldSchedule` gives

    E(t) = amplitude * cos(2 pi f t + phase) * exp(-(t - peak)^2 / (2 sigma^2))    [V/A]

with t in fs and f in THz (cycles per ps); f = 0 and phase = 0 is a static
field, no ``sigma`` means no envelope.  This is the pulse form of i-PI's
driven dynamics, written with the cyclic frequency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..contract import field_vector

#: what the bridges accept as ``field``: None (zero), a constant (3,) V/A, a
#: :class:`FieldSchedule`, or a function of the MD step returning (3,) V/A
FieldSpec = Union[None, Sequence[float], "FieldSchedule", Callable[[int], Sequence[float]]]


#: the contract's check of one field, under its older name here
as_field_vector = field_vector


@dataclass(frozen=True)
class FieldSchedule:
    """E(t) = amplitude cos(2 pi f t + phase) exp(-(t - peak)^2 / (2 sigma^2)), V/A, t in fs.

    Args:
        amplitude: (3,) V/A.
        frequency_thz: f in THz (1/ps); 0 with phase 0 gives a static field.
        phase: rad.
        peak_fs: centre of the Gaussian envelope, fs (with ``sigma_fs``).
        sigma_fs: width of the envelope, fs (None: no envelope).
    """

    amplitude: Sequence[float]
    frequency_thz: float = 0.0
    phase: float = 0.0
    peak_fs: float = 0.0
    sigma_fs: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "amplitude", tuple(field_vector(self.amplitude, "amplitude").tolist()))
        if self.sigma_fs is not None and not self.sigma_fs > 0:
            raise ValueError(f"sigma_fs: must be > 0 fs, got {self.sigma_fs}")
        for name in ("frequency_thz", "phase", "peak_fs"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be finite")

    @property
    def static(self) -> bool:
        """True when E does not depend on time."""
        return self.frequency_thz == 0.0 and self.sigma_fs is None

    def at(self, time_fs: float) -> np.ndarray:
        """E(t) in V/A at ``time_fs``."""
        omega = 2.0 * math.pi * self.frequency_thz * 1e-3  # rad/fs
        scale = math.cos(omega * time_fs + self.phase)
        if self.sigma_fs is not None:
            scale *= math.exp(-0.5 * ((time_fs - self.peak_fs) / self.sigma_fs) ** 2)
        return scale * np.asarray(self.amplitude, dtype=float)


def field_function(field: FieldSpec) -> Callable[[int, float], np.ndarray]:
    """A function (step, time in fs) -> (3,) V/A from any :data:`FieldSpec`.

    A :class:`FieldSchedule` is a function of time, a callable one of the MD step.
    """
    if field is None:
        zero = np.zeros(3)
        return lambda step, time_fs: zero
    if isinstance(field, FieldSchedule):
        return lambda step, time_fs: field.at(time_fs)
    if callable(field):
        return lambda step, time_fs: field_vector(field(step), f"field({step})")
    constant = field_vector(field, "field")
    return lambda step, time_fs: constant


__all__ = ["FieldSchedule", "FieldSpec", "as_field_vector", "field_function"]
