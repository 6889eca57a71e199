"""P-E hysteresis loops: a periodic field along an axis, damped 0 K or thermal MD, Pr / Ec / Ps extracted.

The protocol of arXiv:2508.17870: E(t) = E0 cos(2 pi t / T) along an axis (or a triangle wave with the
same extremes and zeros), MD at 0 K with viscous damping (ASE's Langevin at zero temperature: friction
without noise) or at a temperature; P(t) followed continuously across the polarization quanta.  Several
replicas (thermal runs: different seeds) run as one :class:`~.ensemble.Ensemble`, batched on the server;
their P(t) is averaged.

Extraction from the loop (E_i, P_i) along the field axis, by linear interpolation between records:

* saturation polarization: P at the record of largest E in each excursion of E above 95 % of its
  amplitude, and P at the record of lowest E in each excursion below -95 %, averaged over the excursions:
  P_top and P_bottom; Ps = (P_top - P_bottom) / 2 (uC/cm^2).  The excursion the records start in is
  skipped (the structure as given has not yet answered to the field);
* loop centre (P_top + P_bottom) / 2 (``loop_centre_uC_cm2``), reported, not removed: it is zero for a
  steady symmetric loop; a fast or first-cycle loop is not (at 0 K the first cycle starts from the
  unpolarised structure), nor is a loop whose starting structure sits on another branch of P (defined
  modulo the quantum e*a/Omega; the model's P of a centrosymmetric structure is zero);
* remanent polarization: P where E crosses zero; going down (E from + to -) gives Pr+, going up gives
  Pr-; Pr = (Pr+ - Pr-) / 2 (uC/cm^2), independent of a constant offset of P;
* coercive field: E where P crosses zero; P from - to + while E rises gives Ec+, from + to - while E
  falls gives Ec-; Ec = (Ec+ - Ec-) / 2 (MV/cm).  (P rising from an unpolarised start while the field
  still falls from its first maximum is the virgin curve, not a coercive crossing.)

Crossings are averaged over every cycle recorded.  The first record is the structure as given, before the
field has acted on it: :func:`hysteresis` extracts from the records after it.  Linear interpolation makes
the extraction exact for a loop that is linear between records around its crossings (tested on a
synthetic loop, also with an unpolarised start and sampled off the field's extremes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import E_PER_A2_TO_UC_PER_CM2, V_PER_A_TO_MV_PER_CM, json_ready
from . import fields as _fields
from .fields import AXES


def _crossings(x: np.ndarray, y: np.ndarray, segments: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """y at the points where x crosses zero going up, and going down (linear interpolation); with
    ``segments`` (len(x) - 1 booleans) only between records i and i + 1 where it is true."""
    up, down = [], []
    for i in range(len(x) - 1):
        a, b = x[i], x[i + 1]
        if a == b or (segments is not None and not segments[i]):
            continue
        if (a < 0 <= b) or (a <= 0 < b):
            up.append(y[i] + (y[i + 1] - y[i]) * (0 - a) / (b - a))
        elif (a > 0 >= b) or (a >= 0 > b):
            down.append(y[i] + (y[i + 1] - y[i]) * (0 - a) / (b - a))
    return up, down


def _extremes(e: np.ndarray, sign: float, level: float) -> list[int]:
    """The record of largest ``sign * e`` in each excursion of ``sign * e`` at or above ``level``, skipping the
    excursion the series starts in."""
    above = sign * e >= level
    out, k, n = [], 0, len(e)
    while k < n:
        if not above[k]:
            k += 1
            continue
        j = k
        while j < n and above[j]:
            j += 1
        if k > 0:
            out.append(k + int(np.argmax(sign * e[k:j])))
        k = j
    return out


def extract_loop(field_MV_cm, polarization_uC_cm2) -> dict[str, float]:
    """Ps, the loop centre, Pr (+, -, mean) and Ec (+, -, mean) of a loop sampled in time order (module doc)."""
    e = np.asarray(field_MV_cm, dtype=float)
    p = np.asarray(polarization_uC_cm2, dtype=float)
    nan = float("nan")
    level = 0.95 * float(np.abs(e).max()) if e.size else 0.0
    tops, bottoms = _extremes(e, 1.0, level), _extremes(e, -1.0, level)
    p_top = float(np.mean(p[tops])) if tops else nan
    p_bottom = float(np.mean(p[bottoms])) if bottoms else nan
    q = p
    pr_up, pr_down = _crossings(e, q)      # P at E = 0: E going up -> Pr-, going down -> Pr+
    # E at P = 0: P going up while E rises -> Ec+, P going down while E falls -> Ec- (P first rising from an
    # unpolarised start, while the field still falls from its first maximum, is not a coercive crossing)
    step = np.diff(e)
    ec_up = _crossings(q, e, step > 0)[0]
    ec_down = _crossings(q, e, step < 0)[1]
    pr_plus = float(np.mean(pr_down)) if pr_down else nan
    pr_minus = float(np.mean(pr_up)) if pr_up else nan
    ec_plus = float(np.mean(ec_up)) if ec_up else nan
    ec_minus = float(np.mean(ec_down)) if ec_down else nan
    return {
        "remanent_polarization_uC_cm2": 0.5 * (pr_plus - pr_minus),
        "remanent_polarization_plus_uC_cm2": pr_plus,
        "remanent_polarization_minus_uC_cm2": pr_minus,
        "coercive_field_MV_cm": 0.5 * (ec_plus - ec_minus),
        "coercive_field_plus_MV_cm": ec_plus,
        "coercive_field_minus_MV_cm": ec_minus,
        "saturation_polarization_uC_cm2": 0.5 * (p_top - p_bottom),
        "loop_centre_uC_cm2": 0.5 * (p_top + p_bottom),
    }


@dataclass
class HysteresisResult:
    """A P-E loop: records in time order, P and E along the axis, the replica mean."""

    time_fs: np.ndarray
    field_MV_cm: np.ndarray            #: (records,) E along the axis
    polarization_uC_cm2: np.ndarray    #: (records,) P along the axis, continuous, mean over replicas
    polarization_replicas_uC_cm2: np.ndarray  #: (replicas, records)
    axis: str
    extracted: dict[str, float]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready({
            "time_fs": self.time_fs,
            "field": self.field_MV_cm, "field_unit": "MV/cm (along the axis)",
            "polarization": self.polarization_uC_cm2,
            "polarization_unit": "uC/cm^2 (along the axis, continuous across quanta, mean over replicas; "
                                 "on the branch of the starting structure)",
            "polarization_replicas_uC_cm2": self.polarization_replicas_uC_cm2,
            "axis": self.axis,
            **self.extracted,
            "settings": self.settings,
        })


def hysteresis(client, structure, *, axis: str = "z", amplitude: float = 0.3636, period_ps: float = 200.0,
               cycles: float = 1.0, waveform: str = "cosine",
               temperature: float = 0.0, damping: float = 0.01, timestep_fs: float = 2.0, replicas: int = 1,
               record_every: int = 10, seed: int = 0, equilibrate: int = 0, head: str | None = None,
               model: str | None = None, progress: bool | None = False) -> HysteresisResult:
    """Run a P-E loop (see the module doc).  ``amplitude`` E0 in V/A, ``period_ps`` T in ps, ``damping`` the
    friction in 1/fs (at 0 K: viscous damping without noise), ``timestep_fs`` fs; ``equilibrate``: steps run
    first in the field E(0) and not recorded (:meth:`~.ensemble.Ensemble.equilibrate`); returns the loop."""
    from .common import to_atoms
    from .ensemble import Ensemble

    name = waveform
    if axis not in AXES:
        raise ValueError(f"axis: x, y or z, got {axis!r}")
    if not amplitude > 0 or not period_ps > 0 or not cycles > 0:
        raise ValueError("amplitude, period and cycles must be > 0")
    atoms = to_atoms(structure)
    if not atoms.pbc.all():
        raise ValueError("structure: a hysteresis loop needs a cell periodic in all three directions")
    period_fs = 1000.0 * period_ps
    steps = int(round(cycles * period_fs / timestep_fs))
    e_of_t = _waveform(name, amplitude, axis, period_fs)
    ens = Ensemble(client, atoms, replicas=replicas, fields=e_of_t, timestep_fs=timestep_fs, temperature=temperature,
                   thermostat="langevin", friction=damping, record_every=record_every, seed=seed, head=head,
                   model=model)
    ens.equilibrate(equilibrate, progress=progress)
    rec = ens.run(steps, progress=progress)
    k = "xyz".index(axis)
    e = rec["field_V_A"][0, :, k] * V_PER_A_TO_MV_PER_CM
    p_rep = rec["polarization_e_A2"][:, :, k] * E_PER_A2_TO_UC_PER_CM2
    p = p_rep.mean(axis=0)
    settings = {"amplitude_V_A": amplitude, "period_ps": period_ps, "cycles": cycles, "waveform": name,
                "temperature_K": temperature, "damping_per_fs": damping, "timestep_fs": timestep_fs,
                "replicas": replicas, "record_every": record_every, "seed": seed, "steps": steps,
                "equilibration_steps": equilibrate,
                "n_atoms": len(atoms), "interrupted": ens.interrupted}
    return HysteresisResult(time_fs=rec["time_fs"][0], field_MV_cm=e, polarization_uC_cm2=p,
                            polarization_replicas_uC_cm2=p_rep, axis=axis, extracted=extract_loop(e[1:], p[1:]),
                            settings=settings)


def _waveform(name: str, amplitude: float, axis: str, period_fs: float):
    return _fields.waveform(name, amplitude, axis, period_fs)


__all__ = ["HysteresisResult", "extract_loop", "hysteresis"]
