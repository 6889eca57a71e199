"""Ensemble MD and P-E hysteresis (``macefield_client.workflows``) through a real server.  On a small random
float64 model (the ensemble's plumbing, which any model exercises alike): the replicas of a step reach the
server as one batch, the ensemble equals separate runs with the same seeds, restarts and equilibration
continue a run exactly.  The loop extraction is exact on a synthetic loop, and ``macefield hysteresis`` reads
a polar DFT frame on the embedded default model (its whole loop, switching, is the README's test)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import md_test_model
from serving import metric, run_torch_free, tiny_server, torch_free_env

from macefield_client import Client
from macefield_client.structures import alpha_quartz
from macefield_client.workflows.ensemble import Ensemble
from macefield_client.workflows.fields import waveform
from macefield_client.workflows.hysteresis import extract_loop


@pytest.fixture(scope="module")
def server():
    """conftest's ``md_test_model`` in an in-process server with metrics."""
    with tiny_server(md_test_model()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def _batches(server):
    return (metric(server.metrics_port, "macefield_batch_structures_sum"),
            metric(server.metrics_port, "macefield_batch_structures_count"))


def test_ensemble_steps_are_one_batch_and_equal_separate_runs(server, client):
    n, steps = 4, 12
    quartz = alpha_quartz(cell="pbe")
    field = (0.0, 0.0, 0.01)
    s0, c0 = _batches(server)
    ens = Ensemble(client, quartz, replicas=n, temperature=300.0, fields=field, timestep_fs=1.0, record_every=3,
                   seed=11, head="sio2")
    together = ens.run(steps)
    s1, c1 = _batches(server)
    # every step's n evaluations reached the server together and were computed in one pass
    assert ens.gatherer.calls == steps + 1 and ens.mean_batch == n
    assert (s1 - s0) / (c1 - c0) == pytest.approx(n, rel=0.1)
    assert together["time_fs"].shape == (n, steps // 3 + 1) and np.allclose(together["time_fs"][0], [0, 3, 6, 9, 12])
    assert np.all(together["temperature_K"][:, 0] > 50)  # thermalised, different per replica
    assert len({round(float(t), 6) for t in together["temperature_K"][:, 0]}) == n
    for i in range(n):
        alone = Ensemble(client, quartz, replicas=1, temperature=300.0, fields=field, timestep_fs=1.0, record_every=3,
                         seed=11 + i, head="sio2").run(steps)
        # the same trajectory: batching changes only the (float64) round-off of the model
        assert np.allclose(alone["energy_eV"][0], together["energy_eV"][i], rtol=0, atol=1e-9)
        assert np.allclose(alone["polarization_e_A2"][0], together["polarization_e_A2"][i], rtol=0, atol=1e-12)
    # and the replicas' trajectories differ from each other by far more than that
    assert np.ptp(together["energy_eV"][:, -1]) > 1e-4


@pytest.mark.parametrize("thermostat", ["langevin", "nve"])
def test_ensemble_restart_continues_exactly(client, tmp_path, thermostat):
    """2k steps = k steps + save + restart + k steps: positions, momenta, clock, P branch and (Langevin) the
    saved random-number state carry the run on; only the round-off of the model differs."""
    quartz = alpha_quartz(cell="pbe")
    kwargs = dict(replicas=2, temperature=300.0, timestep_fs=1.0, record_every=2, seed=3, head="sio2",
                  thermostat=thermostat, fields=(0.0, 0.0, 0.01))
    straight = Ensemble(client, quartz, **kwargs).run(8)
    first = Ensemble(client, quartz, **kwargs)
    first.run(4)
    first.save(tmp_path / "state.npz")
    second = Ensemble(client, quartz, **kwargs)
    second.restart(tmp_path / "state.npz")
    resumed = second.run(4)
    assert resumed["time_fs"].shape == (2, 5)
    assert np.allclose(resumed["time_fs"], straight["time_fs"])
    assert np.allclose(resumed["energy_eV"], straight["energy_eV"], rtol=0, atol=1e-9)
    assert np.allclose(resumed["kinetic_eV"], straight["kinetic_eV"], rtol=0, atol=1e-9)
    assert np.allclose(resumed["polarization_e_A2"], straight["polarization_e_A2"], rtol=0, atol=1e-12)
    if thermostat == "nve":  # no thermostat: the total energy is conserved along the joined run, while energy
        total = resumed["energy_eV"] + resumed["kinetic_eV"]  # moves between potential and kinetic
        assert np.all(np.ptp(total, axis=1) < 0.1 * np.ptp(resumed["kinetic_eV"], axis=1))


def test_ensemble_equilibration_is_not_recorded_and_the_clock_starts_after_it(client, tmp_path):
    """equilibrate(N) + run(k) is the last k steps of an N + k run (same seeds, constant field), with its records
    starting at t = 0 from the state after N steps; a field's course starts at t = 0."""
    quartz = alpha_quartz(cell="pbe")
    kwargs = dict(replicas=2, temperature=300.0, timestep_fs=1.0, record_every=2, seed=5, head="sio2",
                  fields=(0.0, 0.0, 0.01))
    straight = Ensemble(client, quartz, **kwargs).run(10)
    ens = Ensemble(client, quartz, **kwargs)
    ens.equilibrate(4)
    assert not any(r["time_fs"] for r in ens.records)
    later = ens.run(6)
    assert np.allclose(later["time_fs"][0], [0, 2, 4, 6])
    assert np.allclose(later["energy_eV"], straight["energy_eV"][:, 2:], rtol=0, atol=1e-9)
    assert np.allclose(later["polarization_e_A2"], straight["polarization_e_A2"][:, 2:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="before the first run"):
        ens.equilibrate(2)
    ramp = Ensemble(client, quartz, replicas=1, temperature=0.0, timestep_fs=1.0, record_every=1, head="sio2",
                    fields=lambda t: np.array([0.0, 0.0, 0.01 + 1e-4 * t]))
    ramp.equilibrate(3)
    rec = ramp.run(2)
    assert np.allclose(rec["field_V_A"][0, :, 2], [0.01, 0.0101, 0.0102])  # E(0) held before t = 0


def test_ensemble_ctrl_c_keeps_the_records(client, tmp_path):
    import _thread
    import signal
    import threading

    ens = Ensemble(client, alpha_quartz(cell="pbe"), replicas=2, temperature=300.0, timestep_fs=1.0, record_every=1,
                   seed=1, head="sio2")
    # interrupt_main() does nothing while SIGINT is ignored (a test run started as a background job): handle it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, _thread.interrupt_main)
    try:
        timer.start()
        rec = ens.run(100_000)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert ens.interrupted and 2 <= rec["time_fs"].shape[1] < 100_000
    assert np.all(np.diff(rec["time_fs"][0]) == 1.0) and np.isfinite(rec["energy_eV"]).all()
    ens.save(tmp_path / "cut.npz")  # what was recorded is kept and can be continued
    assert np.load(tmp_path / "cut.npz")["record_time_fs"].shape == rec["time_fs"].shape


def test_replicas_start_at_the_temperature_asked_for(client):
    """Maxwell-Boltzmann momenta without the centre-of-mass motion: the mean starting temperature over 400
    replicas of 9-atom quartz (3N - 3 = 24 degrees of freedom, as ASE counts them with FixCom) is the target
    within 3 standard errors (a start rescaled to 3N degrees of freedom would be 9/8 too hot: 337.5 K)."""
    ens = Ensemble(client, alpha_quartz(cell="pbe"), replicas=400, temperature=300.0, seed=11, head="sio2")
    temps = np.array([a.get_temperature() for a in ens.atoms])
    assert all(np.allclose(a.get_momenta().sum(axis=0), 0.0, atol=1e-10) for a in ens.atoms)
    assert abs(temps.mean() - 300.0) < 3 * temps.std(ddof=1) / np.sqrt(len(temps)), temps.mean()


def test_loop_extraction_is_exact_on_a_synthetic_loop():
    """A parallelogram loop (linear between records) with Pr = 30, Ec = 12, Ps = 40 sampled over two cycles."""
    t = np.linspace(0.0, 2.0, 801)
    tri = waveform("triangle", 1.0, "z", 1.0)
    e = np.array([40.0 * tri(x)[2] for x in t])  # MV/cm, +-40
    p = np.empty_like(e)
    for i, x in enumerate(e):
        down = (t[i] % 1.0) < 0.5  # E decreasing: upper branch
        line = 30.0 + 2.5 * x if down else -30.0 + 2.5 * x  # P = 0 at E = -12 (down) and +12 (up)
        p[i] = np.clip(line, -40.0, 40.0)
    x = extract_loop(e, p)
    assert x["remanent_polarization_uC_cm2"] == pytest.approx(30.0, abs=1e-9)
    assert x["remanent_polarization_plus_uC_cm2"] == pytest.approx(30.0, abs=1e-9)
    assert x["remanent_polarization_minus_uC_cm2"] == pytest.approx(-30.0, abs=1e-9)
    assert x["coercive_field_MV_cm"] == pytest.approx(12.0, abs=1e-9)
    assert x["coercive_field_plus_MV_cm"] == pytest.approx(12.0, abs=1e-9)
    assert x["coercive_field_minus_MV_cm"] == pytest.approx(-12.0, abs=1e-9)
    assert x["saturation_polarization_uC_cm2"] == pytest.approx(40.0, abs=1e-9)


@pytest.mark.parametrize("records", [801, 800, 802])
def test_loop_extraction_needs_no_record_on_the_extremes_and_skips_the_virgin_curve(records):
    """The same loop shifted by 3 uC/cm^2 along P, starting unpolarised (P rising from the offset while the field
    falls from its first maximum: the virgin curve), sampled so that the records miss the field's extremes (800
    or 802 records over two cycles): the same Pr, Ec (shifted by the offset's effect only on each sign), Ps, and
    the loop centre at the offset."""
    t = np.linspace(0.0, 2.0, records)
    tri = waveform("triangle", 1.0, "z", 1.0)
    e = np.array([40.0 * tri(x)[2] for x in t])
    p = np.empty_like(e)
    for i, x in enumerate(e):
        down = (t[i] % 1.0) < 0.5
        p[i] = np.clip(30.0 + 2.5 * x if down else -30.0 + 2.5 * x, -40.0, 40.0) + 3.0
    start = t < 0.05
    p[start] = np.linspace(-5.0, 43.0, start.sum())  # the virgin curve: crosses zero while E falls
    x = extract_loop(e, p)
    tol = 2 * 40.0 * 2.0 / records * 2.5  # P changes by up to this between records near the extremes
    assert x["loop_centre_uC_cm2"] == pytest.approx(3.0, abs=tol)
    assert x["saturation_polarization_uC_cm2"] == pytest.approx(40.0, abs=tol)
    assert x["remanent_polarization_uC_cm2"] == pytest.approx(30.0, abs=tol)
    assert x["remanent_polarization_plus_uC_cm2"] == pytest.approx(33.0, abs=tol)
    assert x["remanent_polarization_minus_uC_cm2"] == pytest.approx(-27.0, abs=tol)
    # P = 0 where the shifted lines cross zero: E = -13.2 (upper branch), +10.8 (lower branch)
    assert x["coercive_field_plus_MV_cm"] == pytest.approx(10.8, abs=tol / 2.5)
    assert x["coercive_field_minus_MV_cm"] == pytest.approx(-13.2, abs=tol / 2.5)
    assert x["coercive_field_MV_cm"] == pytest.approx(12.0, abs=tol / 2.5)


def test_hysteresis_of_a_polar_dft_frame_from_a_file(shared_data, default_served, tmp_path):
    """``macefield hysteresis FILE --plot`` on the polar 135-atom PBE BaTiO3 frame (an extended XYZ file) for a
    tenth of the README loop's cycle (E0 = 0.3636 V/A along z, 0.5 ps period: E falls from E0 to 0.81 E0): P
    starts along +z (the frame is polarized) and stays there; a loop with no zero crossing has no Pr or Ec,
    which the JSON ("nan") and the printout say, and the plot is still drawn.  The whole loop, switching and
    continuity, is the README's (tests/test_readme_examples.py)."""
    import ase.io

    frame = ase.io.read(shared_data / "batio3-md.xyz", index=0)
    path = tmp_path / "batio3.xyz"
    ase.io.write(path, frame, format="extxyz", columns=["symbols", "positions"])
    out, plot = tmp_path / "loop.json", tmp_path / "loop.png"
    command = [sys.executable, "-m", "macefield_client.cli", "hysteresis", str(path), "--server", default_served,
               "--head", "batio3", "--axis", "z", "--amplitude", "0.3636", "--period", "0.5", "--cycles", "0.1",
               "--timestep", "2", "--damping", "0.02", "--record-every", "1", "--json", str(out), "--plot", str(plot)]
    done = run_torch_free(command, torch_free_env(tmp_path), timeout=300)
    data = json.loads(out.read_text())
    e, p = np.array(data["field"]), np.array(data["polarization"])
    assert len(e) == 26 and e[0] == pytest.approx(36.36) and e[-1] == pytest.approx(36.36 * np.cos(0.2 * np.pi))
    assert np.all(p > 20)
    quantum = 1602.176634 / (frame.cell[0, 0] * frame.cell[1, 1])
    assert np.abs(np.diff(p)).max() < quantum / 4
    # non-finite numbers are written as strings (strict JSON has no NaN)
    assert data["coercive_field_MV_cm"] == "nan" and data["remanent_polarization_uC_cm2"] == "nan"
    assert "coercive field Ec: nan" in done.stdout
    assert plot.stat().st_size > 10_000
