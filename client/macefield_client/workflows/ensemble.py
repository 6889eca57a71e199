"""Ensemble MD: N replicas advanced in lockstep, each step's N evaluations in one batched call.

Each replica is an ``ase.Atoms`` with its own ASE integrator (``VelocityVerlet`` for NVE, ``Langevin`` or
``Bussi`` for NVT, ``Langevin`` at 0 K for damped dynamics without noise) and its own field E(t).  The
replicas run on threads; their calculators hand each force call to one gatherer, which sends the N
structures of a step together in one ``predict_many`` (PredictBatch) call as soon as every running replica
has asked, so that the server computes them in one batched pass when they fit its batch limits.  The
integrators are ASE's, unchanged: each does exactly one force call per step.

Records (every ``record_every`` steps, per replica): time (fs), potential F (eV), kinetic energy (eV),
temperature (K), the field (V/A), P (e/A^2, continuous across steps: every step's value is moved by the
polarization quanta to the branch nearest the previous step's, so there are no jumps of e*a_k/Omega),
optionally alpha (e*A^2/V; the second-derivative pass, 1.6 to 2.1x the cost of an E+F+P step on a CPU
(bench/workflows.py), only on recorded steps)
and positions (A).  ``save``/``restart`` write and read an npz with the records and the full state
(positions, momenta, clock, P branch, the thermostats' random-number state), so a restarted run continues
exactly.  ``equilibrate(N)`` runs N unrecorded steps first (at t < 0, the field held at E(0)), so the
records start at t = 0 from the equilibrated state.  Ctrl-C (KeyboardInterrupt) stops every replica at its
next force call and keeps what was recorded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..contract import DEFAULT_OUTPUTS
from .common import ContinuousPolarization
from .fields import field_of_time

THERMOSTATS = ("langevin", "bussi", "nve")
_SECOND = tuple(DEFAULT_OUTPUTS) + ("polarizability",)


class _Stopped(Exception):
    """Raised in a replica's thread when the ensemble is interrupted."""


class Gatherer:
    """Collects one force call from every running replica and answers them with one ``predict_many``."""

    def __init__(self, client, n: int, *, head: str | None, model: str | None, timeout: float | None = None):
        self.client, self.head, self.model, self.timeout = client, head, model, timeout
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[Any, np.ndarray, bool]] = {}
        self.results: dict[int, Any] = {}
        self.active = n
        self.generation = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.calls = 0  #: batched calls sent
        self.structures = 0  #: structures sent

    def evaluate(self, index: int, atoms, field: np.ndarray, second: bool):
        with self.cond:
            if self.stopped or self.error is not None:
                raise _Stopped
            self.pending[index] = (atoms.copy(), np.asarray(field, dtype=float), second)
            generation = self.generation
            if len(self.pending) >= self.active:
                self._flush()
            else:
                while generation == self.generation and not self.stopped and self.error is None:
                    self.cond.wait()
            if index not in self.results:
                raise _Stopped
            return self.results.pop(index)

    def _flush(self) -> None:
        items = sorted(self.pending.items())
        self.pending = {}
        structures = [a for _, (a, _, _) in items]
        fields = np.array([f for _, (_, f, _) in items])
        outputs = _SECOND if any(s for _, (_, _, s) in items) else DEFAULT_OUTPUTS
        try:
            answers = self.client.predict_many(structures, electric_field=fields, outputs=outputs, head=self.head,
                                               model=self.model, timeout=self.timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to every replica and re-raised by run()
            self.error = exc
        else:
            self.results.update({i: r for (i, _), r in zip(items, answers)})
            self.calls += 1
            self.structures += len(items)
        self.generation += 1
        self.cond.notify_all()

    def leave(self) -> None:
        """A replica has finished its steps: the others no longer wait for it."""
        with self.cond:
            self.active -= 1
            if self.pending and len(self.pending) >= self.active:
                self._flush()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _calculator_class():
    from ase.calculators.calculator import Calculator, all_changes

    class ReplicaCalculator(Calculator):
        """ASE calculator of one replica: the field of its clock, evaluated through the gatherer."""

        implemented_properties = ["energy", "free_energy", "forces", "stress", "dipole", "polarization"]  # noqa: RUF012

        def __init__(self, gatherer: Gatherer, index: int, field: Callable[[float], np.ndarray], dt_fs: float,
                     alpha_every: int = 0):
            super().__init__()
            self.gatherer, self.index, self.field, self.dt_fs = gatherer, index, field, dt_fs
            self.alpha_every = alpha_every
            self.calls = 0  #: force calls so far: call c is at time t0 + c * dt
            self.t0_fs = 0.0  #: -(equilibration steps) * dt: the records start at t = 0
            self.branch = ContinuousPolarization()
            self.last: dict[str, Any] = {}

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            Calculator.calculate(self, atoms, properties, system_changes)
            time_fs = self.t0_fs + self.calls * self.dt_fs
            field = np.asarray(self.field(max(time_fs, 0.0)), dtype=float)  # equilibration (t < 0): E(0)
            step = self.calls + round(self.t0_fs / self.dt_fs)  # steps since t = 0
            second = bool(self.alpha_every) and step % self.alpha_every == 0
            r = self.gatherer.evaluate(self.index, self.atoms, field, second)
            self.calls += 1
            results = {"energy": float(r.energy), "free_energy": float(r.energy), "forces": r.forces}
            if r.dipole is not None:
                results["dipole"] = r.dipole
            p = None
            if r.polarization is not None:
                p = self.branch(r.polarization, r.polarization_quantum)
                results["polarization"] = p
            if r.stress is not None:
                from ase.stress import full_3x3_to_voigt_6_stress

                results["stress"] = full_3x3_to_voigt_6_stress(r.stress)
            self.results = results
            self.last = {"time_fs": time_fs, "field": field, "polarization": p, "alpha": r.polarizability}

    return ReplicaCalculator


def _integrator(atoms, name: str, dt_fs: float, temperature: float, friction: float, taut_fs: float, rng):
    from ase import units

    if name == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt_fs * units.fs)
    if name == "bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, dt_fs * units.fs, temperature_K=temperature, taut=taut_fs * units.fs, rng=rng)
    if name == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt_fs * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng,
                        fixcm=False)
    raise ValueError(f"thermostat: one of {', '.join(THERMOSTATS)}, got {name!r}")


class Ensemble:
    """N replicas in lockstep on one server.

    Args:
        client: a :class:`~macefield_client.Client`.
        structures: one ``ase.Atoms`` (copied ``replicas`` times) or a list of them (one per replica).
        replicas: number of copies of a single structure.
        fields: per replica (a list) or for all: None, a constant (3,) V/A, or a callable of time (fs) -> V/A
            (e.g. :func:`~.fields.waveform`).
        timestep_fs: fs.
        temperature: K; initial velocities are Maxwell-Boltzmann at this temperature (replica i: seed + i),
            and the thermostat's target.  0: start at rest; with ``langevin`` that is viscous damping without
            noise (the 0 K hysteresis protocol; ``friction`` is the damping rate).
        thermostat: ``langevin`` (default; ``friction`` in 1/fs, default 0.01), ``bussi`` (``taut_fs``,
            default 100 fs) or ``nve`` (VelocityVerlet).
        record_every: steps between records; ``record_alpha``: alpha on recorded steps;
            ``record_positions``: positions too.
        seed: replica i uses ``seed + i`` for its velocities and its thermostat's noise, so replica i of an
            ensemble and a one-replica run with seed ``seed + i`` are the same trajectory.
    """

    def __init__(self, client, structures, *, replicas: int = 1, fields: Any = None, timestep_fs: float = 1.0,
                 temperature: float = 300.0, thermostat: str = "langevin", friction: float = 0.01,
                 taut_fs: float = 100.0, record_every: int = 10, record_alpha: bool = False,
                 record_positions: bool = False, seed: int = 0, head: str | None = None, model: str | None = None,
                 timeout: float | None = None):
        from ase.constraints import FixCom
        from ase.md.velocitydistribution import Stationary, thermalize_momenta

        if thermostat not in THERMOSTATS:
            raise ValueError(f"thermostat: one of {', '.join(THERMOSTATS)}, got {thermostat!r}")
        if isinstance(structures, Sequence):
            atoms_list = [a.copy() for a in structures]
        else:
            atoms_list = [structures.copy() for _ in range(replicas)]
        n = len(atoms_list)
        field_specs = fields if isinstance(fields, list) else [fields] * n
        if len(field_specs) != n:
            raise ValueError(f"fields: one per replica ({n}), got {len(field_specs)}")
        self.client, self.head, self.model, self.timeout = client, head, model, timeout
        self.n = n
        self.timestep_fs = float(timestep_fs)
        self.temperature = float(temperature)
        self.record_every = int(record_every)
        self.record_alpha, self.record_positions = record_alpha, record_positions
        self.gatherer = Gatherer(client, n, head=head, model=model, timeout=timeout)
        calc_class = _calculator_class()
        self.atoms, self.calcs, self.dyns, self.rngs = [], [], [], []
        for i, atoms in enumerate(atoms_list):
            rng = np.random.default_rng(seed + i)
            if temperature > 0 and not atoms.get_momenta().any():
                thermalize_momenta(atoms, temperature, rng=rng)
                # drop the centre-of-mass momentum without rescaling: 3N - 3 degrees of freedom remain (FixCom),
                # whose expected kinetic energy is (3N - 3) k_B T / 2 (rescaling back to 3N / 2 started the
                # replicas N / (N - 1) too hot)
                Stationary(atoms, preserve_temperature=False)
            calc = calc_class(self.gatherer, i, field_of_time(field_specs[i]), self.timestep_fs,
                              self.record_every if record_alpha else 0)
            atoms.calc = calc
            atoms.set_constraint(FixCom())  # the centre of mass stays put (Z* sum to zero: a field exerts no net force)
            self.atoms.append(atoms)
            self.calcs.append(calc)
            self.rngs.append(rng)
            self.dyns.append(_integrator(atoms, thermostat, self.timestep_fs, temperature, friction, taut_fs, rng))
        self.records: list[dict[str, list]] = [self._empty() for _ in range(n)]
        self.interrupted = False

    @staticmethod
    def _empty() -> dict[str, list]:
        return {k: [] for k in ("time_fs", "energy_eV", "kinetic_eV", "temperature_K", "field_V_A",
                                "polarization_e_A2", "alpha_e_A2_V", "positions_A")}

    def _record(self, i: int) -> None:
        atoms, calc, rec = self.atoms[i], self.calcs[i], self.records[i]
        atoms.get_forces()  # results of the current positions (cached: no new call)
        last = calc.last
        rec["time_fs"].append(last["time_fs"])
        rec["energy_eV"].append(float(atoms.get_potential_energy()))
        rec["kinetic_eV"].append(float(atoms.get_kinetic_energy()))
        rec["temperature_K"].append(float(atoms.get_temperature()))
        rec["field_V_A"].append(np.array(last["field"]))
        p = last["polarization"]
        rec["polarization_e_A2"].append(np.full(3, np.nan) if p is None else np.array(p))
        if self.record_alpha:
            a = last["alpha"]
            rec["alpha_e_A2_V"].append(np.full((3, 3), np.nan) if a is None else np.array(a))
        if self.record_positions:
            rec["positions_A"].append(atoms.positions.copy())

    def equilibrate(self, steps: int, *, progress: bool | None = False) -> None:
        """``steps`` steps before the records start, none of them recorded: they run at t < 0 in the field of
        t = 0 (E(0) held), so the first record of the following :meth:`run` is the equilibrated state at t = 0
        and the field starts its course there.  Only before the first :meth:`run`."""
        if steps < 0:
            raise ValueError(f"equilibrate: steps must be >= 0, got {steps}")
        if any(r["time_fs"] for r in self.records) or any(c.calls for c in self.calcs):
            raise ValueError("equilibrate: only before the first run (the records have started)")
        if steps == 0:
            return
        for calc in self.calcs:
            calc.t0_fs = -steps * self.timestep_fs
        self._advance(steps, progress=progress, record=False, desc="equilibration steps")

    def run(self, steps: int, *, progress: bool | None = False) -> dict[str, np.ndarray]:
        """Advance every replica ``steps`` steps (records every ``record_every``); returns :meth:`arrays`.

        The first record of a fresh ensemble is its starting state (t = 0).  ``progress``: a progress bar
        (None: when stderr is a terminal).  Ctrl-C stops all replicas and returns what was recorded
        (``self.interrupted`` is then True).
        """
        self._advance(steps, progress=progress, record=True, desc="MD steps")
        return self.arrays()

    def _advance(self, steps: int, *, progress: bool | None, record: bool, desc: str) -> None:
        from ..core.progress import progress_bar

        start = [c.calls for c in self.calcs]
        self.gatherer.active = self.n
        self.gatherer.stopped = False
        errors: list[BaseException] = []

        def drive(i: int) -> None:
            dyn = self.dyns[i]
            first = record and not self.records[i]["time_fs"]
            try:
                if first:
                    self._record(i)
                for k in range(1, steps + 1):
                    dyn.run(1)
                    if record and k % self.record_every == 0:
                        self._record(i)
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                self.gatherer.stop()
            finally:
                self.gatherer.leave()

        threads = [threading.Thread(target=drive, args=(i,), daemon=True, name=f"replica-{i}") for i in range(self.n)]
        bar = progress_bar(steps, progress, desc=desc)
        done = 0
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                threads[0].join(0.2)
                now = min(c.calls - s for c, s in zip(self.calcs, start))
                if now > done:
                    bar.update(min(now, steps) - done)
                    done = min(now, steps)
        except KeyboardInterrupt:
            self.interrupted = True
            self.gatherer.stop()
            for t in threads:
                t.join(10)
        finally:
            bar.close()
        if self.gatherer.error is not None:
            raise self.gatherer.error
        if errors:
            raise errors[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """Records as arrays of shape (replicas, records, ...) (replicas cut to the shortest)."""
        m = min(len(r["time_fs"]) for r in self.records)
        out = {}
        for key in self.records[0]:
            if self.records[0][key]:
                out[key] = np.array([r[key][:m] for r in self.records])
        return out

    @property
    def mean_batch(self) -> float:
        """Structures per batched call the client sent (the server's own metric: macefield_batch_structures)."""
        return self.gatherer.structures / max(self.gatherer.calls, 1)

    def save(self, path: str) -> None:
        """The records and the full state (npz): :meth:`restart` continues exactly from it."""
        state: dict[str, Any] = {f"record_{k}": v for k, v in self.arrays().items()}
        state["positions"] = np.array([a.positions for a in self.atoms])
        state["momenta"] = np.array([a.get_momenta() for a in self.atoms])
        state["calls"] = np.array([c.calls for c in self.calcs])
        state["branch"] = np.array([[np.full(3, np.nan) if v is None else v
                                     for v in (c.branch.before, c.branch.previous)] for c in self.calcs])
        state["rng"] = np.array([json.dumps(r.bit_generator.state) for r in self.rngs])
        state["timestep_fs"] = np.array(self.timestep_fs)
        state["t0_fs"] = np.array([c.t0_fs for c in self.calcs])
        if all(a.cell.rank == 3 for a in self.atoms):
            state["volume_A3"] = np.array(float(np.mean([a.get_volume() for a in self.atoms])))
        np.savez(path, **state)

    def write_extxyz(self, path: str) -> int:
        """The recorded frames as one extended XYZ (ASE), replica by replica, each in time order; returns the
        number of frames.  Per frame: the positions (A) and, in ``info``, ``replica`` (its index),
        ``time_fs``, ``energy`` (eV, the electric enthalpy F), ``temperature_K``, ``field`` (V/A),
        ``polarization`` (e/A^2), ``dipole`` (e*A: P times the cell volume) and ``alpha`` (9, e*A^2/V, when
        recorded).  Needs ``record_positions=True``; ``macefield spectrum`` reads it back by replica."""
        import ase
        import ase.io

        rec = self.arrays()
        if "positions_A" not in rec:
            raise ValueError("write_extxyz: the positions were not recorded (record_positions=True)")
        frames = []
        for i, base in enumerate(self.atoms):
            volume = base.get_volume() if base.cell.rank == 3 else None
            for k in range(rec["time_fs"].shape[1]):
                atoms = ase.Atoms(base.numbers, positions=rec["positions_A"][i, k], cell=base.cell, pbc=base.pbc)
                atoms.info = {"replica": i, "time_fs": float(rec["time_fs"][i, k]),
                              "energy": float(rec["energy_eV"][i, k]),
                              "temperature_K": float(rec["temperature_K"][i, k]),
                              "field": rec["field_V_A"][i, k]}
                p = rec["polarization_e_A2"][i, k]
                if np.isfinite(p).all():
                    atoms.info["polarization"] = p
                    if volume is not None:
                        atoms.info["dipole"] = p * volume
                if "alpha_e_A2_V" in rec:
                    atoms.info["alpha"] = rec["alpha_e_A2_V"][i, k].reshape(9)
                frames.append(atoms)
        ase.io.write(path, frames, format="extxyz")
        return len(frames)

    def restart(self, path: str) -> None:
        """Load the state written by :meth:`save` into this ensemble (same replicas and settings)."""
        data = np.load(path)
        if data["positions"].shape != (self.n, *self.atoms[0].positions.shape):
            raise ValueError(f"restart: {path} holds {data['positions'].shape[0]} replicas of "
                             f"{data['positions'].shape[1]} atoms, this ensemble {self.n} of {len(self.atoms[0])}")
        recorded = "record_time_fs" in data.files and data["record_time_fs"].shape[1] > 0
        for flag, key in ((self.record_alpha, "alpha_e_A2_V"), (self.record_positions, "positions_A")):
            if recorded and flag != (f"record_{key}" in data.files):
                raise ValueError(f"restart: {path} {'lacks' if flag else 'has'} record_{key}: record it as the "
                                 "saved run did")
        for i, (atoms, calc, rng) in enumerate(zip(self.atoms, self.calcs, self.rngs)):
            atoms.positions = data["positions"][i]
            atoms.set_momenta(data["momenta"][i])
            calc.calls = int(data["calls"][i]) - 1  # the cached call at the saved positions is made again
            if "t0_fs" in data.files:
                calc.t0_fs = float(data["t0_fs"][i])
            calc.results = {}
            before, previous = data["branch"][i]
            # the saved positions are evaluated again on the first step: the branch state one step earlier
            calc.branch.previous = None if np.isnan(before).any() else before
            calc.branch.before = None
            rng.bit_generator.state = json.loads(str(data["rng"][i]))
        self.records = [self._empty() for _ in range(self.n)]
        keys = [k for k in data.files if k.startswith("record_")]
        for i in range(self.n):
            for k in keys:
                self.records[i][k[len("record_"):]] = list(data[k][i])


def run_ensemble(client, structures, steps: int, **options) -> dict[str, np.ndarray]:
    """:class:`Ensemble` (``options``) run for ``steps`` steps: its records as arrays."""
    progress = options.pop("progress", False)
    return Ensemble(client, structures, **options).run(steps, progress=progress)


__all__ = ["THERMOSTATS", "Ensemble", "Gatherer", "run_ensemble"]
