"""The fluctuation eps_0 of a low-temperature Langevin ensemble against the harmonic eps_0, through the service.

1. The harmonic route (:func:`~.harmonic.harmonic`, positions relaxed through the service, no Raman):
   eps_inf and eps_0 = eps_inf + the mode sum.
2. Langevin MD of the relaxed structure (:class:`~.ensemble.Ensemble`: ``replicas`` replicas at
   ``temperature`` K, ``friction`` 1/fs, ``timestep_fs``, ``equilibrate`` unrecorded steps, then ``steps``
   steps recorded every ``record_every``), the cell dipole M = P V.
3. eps_0 = eps_inf + (<M M> - <M><M>) / (k_B T V eps0) (:func:`~.spectra.eps_static_fluctuation`; eps_inf the
   harmonic route's, T the mean kinetic temperature of the records) with its standard error over ``blocks``
   blocks per replica (the covariance about each replica's mean, or with ``center="all"`` about the mean of
   all replicas: one equilibrium ensemble), and the deviation from the harmonic eps_0 in standard errors.

At low temperature the crystal is nearly harmonic and the two must agree within the statistical error (the
Langevin thermostat samples the canonical distribution at any friction; the friction only sets how fast the
dipole decorrelates).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .common import json_ready


@dataclass
class EpsMDSettings:
    """The ensemble MD of :func:`eps_static_md` (temperature K, friction 1/fs, timestep fs, steps counted per
    replica)."""

    replicas: int = 8
    temperature: float = 50.0
    friction: float = 0.02
    timestep_fs: float = 2.0
    equilibrate: int = 200
    steps: int = 2000
    record_every: int = 2
    blocks: int = 4
    #: ``replica`` or ``all``: the mean the dipole covariance is taken about (:func:`~.spectra.eps_static_fluctuation`)
    center: str = "replica"
    seed: int = 0


@dataclass
class EpsMDResult:
    """Harmonic and fluctuation eps_0 (3x3, dimensionless), the latter's standard error, and the run."""

    eps_inf: np.ndarray
    eps_static_harmonic: np.ndarray
    eps_static_fluctuation: np.ndarray
    stderr: np.ndarray
    volume_A3: float
    mean_temperature_K: float
    md_wall_s: float
    settings: EpsMDSettings
    info: dict = field(default_factory=dict)

    @property
    def deviation_in_stderr(self) -> np.ndarray:
        """(fluctuation - harmonic) / standard error, the three diagonal components."""
        return (np.diag(self.eps_static_fluctuation) - np.diag(self.eps_static_harmonic)) / np.diag(self.stderr)

    def to_dict(self) -> dict[str, Any]:
        fluct, err, harm = (np.diag(self.eps_static_fluctuation), np.diag(self.stderr),
                            np.diag(self.eps_static_harmonic))
        return json_ready({
            "settings": asdict(self.settings), "volume_A3": self.volume_A3,
            "mean_temperature_K": self.mean_temperature_K, "md_wall_s": self.md_wall_s,
            "steps_per_s": (self.settings.equilibrate + self.settings.steps) / self.md_wall_s,
            "eps_inf_diag": np.diag(self.eps_inf), "eps_static_harmonic_diag": harm,
            "eps_static_fluctuation_diag": fluct, "eps_static_fluctuation_stderr_diag": err,
            "deviation_in_stderr": self.deviation_in_stderr,
            "isotropic": {"harmonic": float(harm.mean()), "fluctuation": float(fluct.mean()),
                          "stderr": float(np.sqrt((err ** 2).sum()) / 3)},
            "blocks_averaged": self.settings.replicas * self.settings.blocks,
            **self.info,
        })


def eps_static_md(client, structure, settings: EpsMDSettings | None = None, *, head: str | None = None,
                  model: str | None = None) -> EpsMDResult:
    """The harmonic eps_0 and the fluctuation eps_0 of a Langevin ensemble of the relaxed ``structure``
    (see the module doc)."""
    from .common import to_atoms
    from .ensemble import Ensemble
    from .harmonic import harmonic
    from .spectra import eps_static_fluctuation

    s = settings or EpsMDSettings()
    if s.temperature <= 0 or s.steps < s.record_every * 2 * s.blocks:
        raise ValueError("settings: temperature must be > 0 and steps >= 2 records per block")
    ref = harmonic(client, to_atoms(structure), head=head, model=model, relax=True, raman=False)
    atoms = ref.atoms
    volume = float(atoms.get_volume())
    ens = Ensemble(client, atoms, replicas=s.replicas, temperature=s.temperature, thermostat="langevin",
                   friction=s.friction, timestep_fs=s.timestep_fs, record_every=s.record_every, seed=s.seed,
                   head=head, model=model)
    start = time.perf_counter()
    ens.equilibrate(s.equilibrate)
    rec = ens.run(s.steps)
    wall = time.perf_counter() - start
    m = rec["polarization_e_A2"] * volume  # (replicas, records, 3), e*A
    temperature = float(rec["temperature_K"].mean())
    eps = eps_static_fluctuation(m, volume, temperature, eps_inf=ref.eps_inf, blocks=s.blocks,
                                 center=s.center)
    return EpsMDResult(eps_inf=np.asarray(ref.eps_inf), eps_static_harmonic=np.asarray(ref.eps_static),
                       eps_static_fluctuation=eps.eps_static, stderr=eps.stderr, volume_A3=volume,
                       mean_temperature_K=temperature, md_wall_s=wall, settings=s,
                       info={"interrupted": ens.interrupted})


__all__ = ["EpsMDResult", "EpsMDSettings", "eps_static_md"]
