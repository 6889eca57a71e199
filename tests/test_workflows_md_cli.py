"""``macefield md`` and ``macefield spectrum`` given a structure, through a real server: on the embedded default
model, the low-temperature MD IR spectrum of alpha-quartz has its strongest bands at the harmonic route's
IR-active frequencies; on a small random float64 model (the plumbing, which any model exercises alike),
``md`` + ``spectrum`` on its npz (or its extended XYZ) is ``spectrum`` on the structure with the same seed, a
restart continues the run, and Ctrl-C keeps what was recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import md_test_model
from serving import metric, tiny_server, wait_for

from macefield_client import Client
from macefield_client.cli.main import main

pytest.importorskip("phonopy")
from macefield_client.workflows import harmonic  # noqa: E402
from macefield_client.workflows.spectra import C_CM_PER_FS  # noqa: E402


@pytest.fixture(scope="module")
def small():
    """conftest's ``md_test_model`` in an in-process server with metrics."""
    with tiny_server(md_test_model()) as srv:
        yield srv


def test_low_temperature_md_ir_bands_are_the_harmonic_ir_modes(default_served, tmp_path):
    """NVE from the relaxed PBE cell with Maxwell-Boltzmann velocities at 40 K (about 20 K once equipartition
    is reached), 4 replicas x 800 steps of 2 fs, the Hann window over the whole run: resolution 1/(N dt c) =
    1/(1600 fs c) = 20.8 cm^-1.  At this temperature quartz is harmonic: every MD band must sit at an IR-active
    mode of the harmonic route (A1 modes have no dipole), the strongest at the strongest E/A2 pair near
    1040 cm^-1."""
    from macefield_client.structures import alpha_quartz

    with Client(default_served) as client:
        ref = harmonic(client, alpha_quartz(cell="pbe"), head="sio2", relax=True, raman=False)
    ir = ref.optical_ir()  # one entry per degenerate set, strongest first
    strong = [r["frequency_cm1"] for r in ir if r["intensity_e2_per_amu"] > 0.02 * ir[0]["intensity_e2_per_amu"]]
    steps, dt = 800, 2.0
    out = tmp_path / "ir.json"
    assert main(["spectrum", "ir", "alpha-quartz", "--server", default_served, "--head", "sio2", "--relax", "--quiet",
                 "--thermostat", "nve", "--temperature", "40", "--timestep", str(dt), "--steps", str(steps),
                 "--equilibrate", "0", "--record-every", "1", "--replicas", "4", "--seed", "1",
                 "--max-lag", str(steps * dt), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    resolution = data["metadata"]["resolution_cm1"]
    assert resolution == pytest.approx(1.0 / (steps * dt * C_CM_PER_FS), rel=1e-9)  # 20.8 cm^-1
    assert 10.0 < data["metadata"]["temperature_K"] < 30.0
    peaks = data["peaks_cm1"]
    assert len(peaks) >= 3
    # the strongest band: the Si-O stretching E (1036) / A2 (1043) pair of the harmonic route
    assert min(abs(peaks[0] - f) for f in strong[:2]) < resolution
    # the three strongest bands are IR-active harmonic modes
    for p in peaks[:3]:
        assert min(abs(p - f) for f in strong) < resolution, (p, strong)


def test_md_then_spectrum_equals_spectrum_of_the_structure(small, tmp_path):
    """Same seed, same options: the npz of ``macefield md``, its extended XYZ and the run of ``macefield spectrum
    STRUCTURE`` give the same spectrum (Langevin: the thermostat noise of each replica is its seed's)."""
    run = ["--server", f"127.0.0.1:{small.port}", "--head", "sio2", "--quiet", "--thermostat", "langevin",
           "--temperature", "300", "--steps", "80", "--equilibrate", "10", "--record-every", "1", "--replicas", "2",
           "--seed", "7"]
    npz, xyz = tmp_path / "run.npz", tmp_path / "run.xyz"
    assert main(["md", "alpha-quartz", *run, "--out", str(npz), "--extxyz", str(xyz)]) == 0
    saved = np.load(npz)
    assert saved["record_time_fs"].shape == (2, 81) and float(saved["volume_A3"]) > 100.0
    results = {}
    for name, source, extra in (("npz", str(npz), []), ("xyz", str(xyz), []), ("structure", "alpha-quartz", run)):
        out = tmp_path / f"{name}.json"
        assert main(["spectrum", "ir", source, *extra, "--blocks", "2", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    a = results["npz"]
    assert a["metadata"]["spectra_averaged"] == 4 and a["metadata"]["dt_fs"] == 1.0
    for other in (results["xyz"], results["structure"]):
        assert other["peaks_cm1"] == pytest.approx(a["peaks_cm1"], abs=1e-6)
        assert np.allclose(other["intensity"], a["intensity"], atol=1e-6)
        assert other["metadata"]["temperature_K"] == pytest.approx(a["metadata"]["temperature_K"], rel=1e-6)
    # a restart continues the saved run: its records are the saved ones and the new steps
    more = tmp_path / "more.npz"
    assert main(["md", "alpha-quartz", *run, "--steps", "20", "--restart", str(npz), "--out", str(more)]) == 0
    continued = np.load(more)
    assert continued["record_time_fs"].shape == (2, 101)
    assert np.allclose(continued["record_time_fs"][:, :81], saved["record_time_fs"])
    assert np.allclose(continued["record_energy_eV"][:, :81], saved["record_energy_eV"])
    # dielectric (and raman) of a structure record alpha: eps_inf = 1 + <alpha>/(V eps0), the volume from the run
    kept, out = tmp_path / "eps.npz", tmp_path / "eps.json"
    assert main(["spectrum", "dielectric", "alpha-quartz", *run, "--steps", "30", "--out", str(kept), "--json",
                 str(out)]) == 0
    assert np.isfinite(np.load(kept)["record_alpha_e_A2_V"]).all()
    eps = json.loads(out.read_text())
    assert "recorded alpha" in eps["metadata"]["eps_inf_source"] and np.array(eps["eps_static"]).shape == (3, 3)
    # bad input is named
    assert main(["md", "alpha-quartz", *run, "--restart", str(tmp_path / "missing.npz")]) == 2
    assert main(["md", "alpha-quartz", *run, "--replicas", "3", "--restart", str(npz), "--out", str(more)]) == 2


def test_md_ctrl_c_writes_what_was_recorded_and_restarts(small, tmp_path):
    """SIGINT to a torch-free ``macefield md``: exit 130, the npz and the extended XYZ hold the records so far,
    and ``--restart`` continues from them."""
    import signal
    import subprocess
    import sys

    from serving import assert_torch_free, interruptible, torch_free_env

    env, report = torch_free_env(tmp_path)
    npz, xyz = tmp_path / "cut.npz", tmp_path / "cut.xyz"
    run = ["--server", f"127.0.0.1:{small.port}", "--head", "sio2", "--replicas", "2", "--temperature", "300",
           "--record-every", "1", "--equilibrate", "0", "--seed", "2"]
    proc = subprocess.Popen(interruptible([sys.executable, "-m", "macefield_client.cli", "md", "alpha-quartz", *run,
                                           "--steps", "100000", "--out", str(npz), "--extxyz", str(xyz)]),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered = metric(small.metrics_port, "macefield_requests_total", method="PredictBatch", code="OK")
    # start-up, then some steps (one batched call per step)
    wait_for(lambda: metric(small.metrics_port, "macefield_requests_total", method="PredictBatch", code="OK")
             >= answered + 5 or proc.poll() is not None, timeout=120, what="five MD steps answered")
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert_torch_free(report)
    assert "(interrupted)" in stdout
    records = np.load(npz)["record_time_fs"]
    assert records.shape[0] == 2 and 2 <= records.shape[1] < 100_000 and np.all(np.diff(records[0]) == 1.0)
    import ase.io

    frames = ase.io.read(xyz, index=":")
    assert len(frames) == 2 * records.shape[1] and [a.info["replica"] for a in frames[:2]] == [0, 0]
    more = tmp_path / "more.npz"
    assert main(["md", "alpha-quartz", *run, "--quiet", "--steps", "3", "--restart", str(npz), "--out",
                 str(more)]) == 0
    assert np.load(more)["record_time_fs"].shape == (2, records.shape[1] + 3)
