"""``macefield-ipi`` against the real i-PI (3.3) and a real server process on loopback (issue 15).

Every i-PI run uses an example input of docs/md_engines.md (docs/examples/ipi/),
with its socket renamed so parallel runs never meet.  i-PI records forces,
positions and Born charges with ``format='ase'`` (8 decimals) and properties
with 9 significant digits; the server's own answer for the recorded geometry
is the reference.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time

import numpy as np
import pytest
from md_engines import (
    DEFAULT_MODEL,
    EXAMPLES,
    IPIProcess,
    driver_command,
    example_input,
    ipi_arrays,
    ipi_properties,
    ipi_structures,
    quartz_frame,
    unique_name,
)
from serving import ServerProcess, assert_torch_free, metric, save_tiny_model, torch_free_env, wait_for

from macefield_client import Client
from macefield_client.fields import FieldSchedule, field_function
from macefield_client.ipi import BOHR, HARTREE
from macefield_client.ipi_socket import IPIProtocolError, parse_init

pytest.importorskip("ipi", reason="i-PI is not installed (pip install ipi): the i-PI driver tests need the real i-PI")
from ipi.utils.units import unit_to_internal  # noqa: E402

pytestmark = pytest.mark.usefixtures("shared_data")  # the quartz frames of ../shared/data

N_QUARTZ = 72
DRIVER_TIMEOUT = 600


def assert_close(got, want, rel, what=""):
    """|got - want| <= rel * (|want| + max |want|): relative to each value and to the array's scale."""
    want = np.asarray(want, dtype=float)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max(), err_msg=what)


def voigt_xx_yy_zz_xy_xz_yz(t):
    return np.array([t[0, 0], t[1, 1], t[2, 2], t[0, 1], t[0, 2], t[1, 2]])


def write_quartz(directory, name="quartz.xyz", atoms=None):
    import ase.io

    ase.io.write(directory / name, quartz_frame(0) if atoms is None else atoms, format="extxyz")
    return directory / name


def run_driver(directory, *args, timeout=DRIVER_TIMEOUT, env=None):
    return subprocess.run(driver_command(*args), cwd=directory, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def default_server():
    """The embedded default model (trained on this quartz) served in float64."""
    proc = ServerProcess(["--model", str(DEFAULT_MODEL), "--dtype", "float64"])
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint):
    """A small random float64 model, with batch limits wide enough for a ring polymer (the PIMD example config)."""
    proc = ServerProcess(["--model", str(tiny_checkpoint), "--config", str(EXAMPLES / "ipi" / "serve-md.yaml")])
    yield proc
    proc.kill()


def target(server) -> str:
    return f"127.0.0.1:{server.port}"


# ------------------------------------------------------------------ units and parsing (no processes)


def test_units_field_schedule_and_init_string():
    from ase import units

    assert BOHR == units.Bohr and HARTREE == units.Hartree  # i-PI's "ase" units: recorded values match exactly

    static = FieldSchedule((0.0, 0.0, 0.05))
    assert static.static and np.array_equal(static.at(123.0), [0.0, 0.0, 0.05])
    wave = FieldSchedule((0.0, 0.1, 0.0), frequency_thz=20.0, phase=0.5)
    assert not wave.static
    np.testing.assert_allclose(wave.at(0.0), [0.0, 0.1 * math.cos(0.5), 0.0])
    np.testing.assert_allclose(wave.at(50.0), wave.at(0.0), atol=1e-15)  # 20 THz: a period of 50 fs
    np.testing.assert_allclose(wave.at(12.5), [0.0, 0.1 * math.cos(math.pi / 2 + 0.5), 0.0], atol=1e-15)
    pulse = FieldSchedule((0.2, 0.0, 0.0), peak_fs=10.0, sigma_fs=2.0)
    np.testing.assert_allclose(pulse.at(10.0), [0.2, 0.0, 0.0])
    np.testing.assert_allclose(pulse.at(14.0), [0.2 * math.exp(-2.0), 0.0, 0.0])
    with pytest.raises(ValueError, match="amplitude"):
        FieldSchedule((0.0, 0.1))
    with pytest.raises(ValueError, match="sigma_fs"):
        FieldSchedule((0.0, 0.0, 0.1), sigma_fs=0.0)

    by_step = field_function(lambda step: (0.0, 0.0, 0.01 * step))
    assert np.array_equal(by_step(3, 1.5), [0.0, 0.0, 0.03])
    assert np.array_equal(field_function(None)(7, 3.5), np.zeros(3))
    assert np.array_equal(field_function(pulse)(99, 10.0), [0.2, 0.0, 0.0])  # schedules run on time, not steps
    with pytest.raises(ValueError, match=r"field\(2\)"):
        field_function(lambda step: (0.0, math.nan, 0.0))(2, 1.0)

    assert parse_init(" batch_size:8") == (8, "")
    assert parse_init("seed:3, batch_size:4") == (4, "seed:3")
    assert parse_init("") == (1, "")
    with pytest.raises(IPIProtocolError, match="batch_size"):
        parse_init("batch_size:x")


def test_every_extra_in_atomic_units_and_duplicates_computed_once(tiny_server):
    """The driver's answer for i-PI's input (atomic units, h with lattice vectors as columns) is the server's."""
    from macefield_client.ipi import IPIDriver

    atoms = quartz_frame(3)
    rattled = atoms.copy()
    rattled.positions[0] += 0.05
    h = np.asarray(atoms.cell).T / BOHR
    cells = np.stack([h, h, h])
    positions = np.stack([atoms.positions, rattled.positions, atoms.positions]) / BOHR
    field = FieldSchedule((0.0, 0.1, 0.05))
    with Client(target(tiny_server), timeout=120) as client:
        driver = IPIDriver(client, atoms.numbers, extras=("dipole", "BEC", "polarization", "polarizability"),
                           field=field)
        answers = driver.compute(cells, positions)
        assert driver.structures == 3 and driver.computed == 2  # the repeated structure went once
        for answer, a in zip(answers, [atoms, rattled, atoms]):
            r = client.predict(a, electric_field=field.at(0.0), outputs="all")
            extras = json.loads(answer.extras)
            n = len(a)
            assert answer.energy * HARTREE == pytest.approx(float(r.energy), rel=1e-12)
            assert_close(answer.forces * HARTREE / BOHR, r.forces, 1e-10)
            assert_close(answer.virial * HARTREE, -r.stress * a.get_volume(), 1e-10)
            assert_close(np.array(extras["dipole"]) * BOHR, r.dipole, 1e-10)
            bec = np.array(extras["BEC"])
            assert bec.shape == (3 * n, 3)
            assert_close(bec.reshape(n, 3, 3).transpose(0, 2, 1), r.born_charges, 1e-10)
            assert_close(bec[3 * 5 + 1], r.born_charges[5, :, 1], 1e-10)  # row 3k+j: d dipole / d R_kj
            assert_close(np.array(extras["polarization"]) / BOHR**2, r.polarization, 1e-10)
            assert_close(np.array(extras["polarizability"]) * BOHR**2 / HARTREE, r.polarizability, 1e-10)
        driver.close()


# ------------------------------------------------------------------ NVE, driven dynamics (the default model)


def test_nve_quartz_conserves_energy_and_ipi_records_the_servers_forces(default_server, tmp_path):
    """docs/examples/ipi/nve.xml: 200 steps at 0.5 fs; the driver runs without torch."""
    address = unique_name()
    write_quartz(tmp_path)
    example_input("nve.xml", tmp_path, address)
    env, report = torch_free_env(tmp_path)
    ipi = IPIProcess(tmp_path, address)
    try:
        done = run_driver(tmp_path, "--unix", address, "--template", "quartz.xyz", "--server", target(default_server),
                          "--log", "driver.log", env=env)
        assert done.returncode == 0, done.stderr
        assert "i-PI sent EXIT after 201 exchanges" in done.stderr, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()
    assert_torch_free(report)

    # step, time (ps), conserved (eV), T (K), kinetic (eV), potential (eV), virial_md xx yy zz xy xz yz (eV/A^3)
    props = ipi_properties(tmp_path / "nve.out")
    assert props.shape == (201, 12) and props[-1, 0] == 200 and props[-1, 1] == pytest.approx(0.1)
    drift = np.abs(props[:, 2] - props[0, 2]).max() / N_QUARTZ
    assert drift < 1e-3, f"conserved quantity drifts {drift * 1e3:.3f} meV/atom"
    assert np.ptp(props[:, 5]) > 100 * N_QUARTZ * drift  # the atoms really moved on the model's surface

    structures = ipi_structures(tmp_path / "nve.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "nve.for_0.extxyz")
    assert sorted(structures) == sorted(forces) == [0, 50, 100, 150, 200]
    with Client(target(default_server), timeout=120) as client:
        for step, atoms in structures.items():
            r = client.predict(atoms, outputs=["energy", "forces", "stress"])
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert_close(props[step, 6:12], -voigt_xx_yy_zz_xy_xz_yz(r.stress), 1e-6, f"virial at step {step}")
            # i-PI printed eV with its own 8-digit constant: compare in Hartree, what the driver sent
            assert unit_to_internal("energy", "electronvolt", props[step, 5]) == pytest.approx(
                float(r.energy) / HARTREE, rel=1e-8)
    log = np.loadtxt(tmp_path / "driver.log")
    assert log.shape == (201, 13) and np.array_equal(log[:, 2], np.arange(201)) and np.all(log[:, 12] > 0)


def test_driven_dynamics_gets_the_servers_born_charges(default_server, tmp_path):
    """docs/examples/ipi/driven.xml: eda-nve with a field pulse; i-PI takes Z* from the driver (--bec)."""
    address = unique_name()
    write_quartz(tmp_path)
    example_input("driven.xml", tmp_path, address)
    ipi = IPIProcess(tmp_path, address)
    try:
        done = run_driver(tmp_path, "--unix", address, "--template", "quartz.xyz", "--server", target(default_server),
                          "--bec")
        assert done.returncode == 0, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()

    # step, time (fs), conserved (eV), potential (eV), Efield (V/A), dipole (e*A)
    props = ipi_properties(tmp_path / "driven.out")
    assert props.shape == (41, 10)
    efield = props[:, 4:7]
    assert np.all(efield[:, :2] == 0) and np.abs(efield[:, 2]).max() > 0.02  # the pulse (0.05 V/A at 10 fs)
    structures = ipi_structures(tmp_path / "driven.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "driven.for_0.extxyz")
    bec = [ipi_arrays(tmp_path / f"driven.bec{c}_0.extxyz") for c in "xyz"]
    assert sorted(structures) == [0, 10, 20, 30, 40]
    with Client(target(default_server), timeout=120) as client:
        for step, atoms in structures.items():
            r = client.predict(atoms, outputs=["forces", "dipole", "born_charges"])  # zero field: i-PI adds Z*.E
            # i-PI's BEC row 3k+j, column i is Z*[k, i, j]: becx[k, j] = Z*[k, x, j]
            z_ipi = np.stack([b[step] for b in bec], axis=1)
            assert_close(z_ipi, r.born_charges, 1e-6, f"Born charges at step {step}")
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert_close(props[step, 7:10], r.dipole, 1e-6, f"dipole at step {step}")  # sent as e*Bohr


# ------------------------------------------------------------------ batched PIMD, field inside the model (tiny model)


def run_pimd(directory, server, batched: bool):
    directory.mkdir()
    address = unique_name()
    write_quartz(directory)
    replace = () if batched else (("<batch_size> 8 </batch_size>", ""),)
    example_input("pimd.xml", directory, address, replace)
    ipi = IPIProcess(directory, address)
    try:
        done = run_driver(directory, "--unix", address, "--template", "quartz.xyz", "--server", target(server))
        assert done.returncode == 0, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()
    return done.stderr


def test_batched_pimd_matches_unbatched_and_reaches_the_server_as_batches_of_8(tiny_server, tmp_path):
    """docs/examples/ipi/pimd.xml (8 beads, batch_size 8) against the same input without batching."""
    port = tiny_server.metrics_port

    def batches(le):
        return metric(port, "macefield_batch_structures_bucket", le=le)

    def batch_calls():
        return metric(port, "macefield_requests_total", method="PredictBatch", code="OK")

    before = {le: batches(le) for le in ("4.0", "8.0", "+Inf")}
    calls_before = batch_calls()
    said = run_pimd(tmp_path / "batched", tiny_server, batched=True)
    after = {le: batches(le) for le in ("4.0", "8.0", "+Inf")}
    calls = batch_calls() - calls_before
    assert "after 11 exchanges (88 structures," in said, said  # 10 steps + the initial forces, 8 beads each
    # every PredictBatch was computed as one engine pass of 8 structures (the first exchange, 8 identical
    # beads of the initial configuration, went as one structure)
    assert calls >= 10
    assert after["8.0"] - after["4.0"] - (before["8.0"] - before["4.0"]) == calls
    assert after["+Inf"] - after["8.0"] == before["+Inf"] - before["8.0"]

    said = run_pimd(tmp_path / "unbatched", tiny_server, batched=False)
    assert "after 88 exchanges (88 structures, 88 computed;" in said, said

    b = ipi_properties(tmp_path / "batched" / "pimd.out")
    u = ipi_properties(tmp_path / "unbatched" / "pimd.out")
    assert b.shape == u.shape == (11, 13)
    np.testing.assert_allclose(b, u, rtol=1e-8, atol=0)  # step, time, conserved, T, potential, 8 bead potentials
    for bead in range(8):
        fb = ipi_arrays(tmp_path / "batched" / f"pimd.for_{bead}.extxyz")
        fu = ipi_arrays(tmp_path / "unbatched" / f"pimd.for_{bead}.extxyz")
        assert sorted(fb) == sorted(fu) == [0, 5, 10]
        for step in fb:
            # 1e-8 relative, plus one unit of the 8th decimal the ase format prints
            assert np.abs(fb[step] - fu[step]).max() <= 1e-8 * np.abs(fu[step]).max() + 1e-8, (bead, step)
    assert np.ptp(b[-1, 5:]) > 0  # the beads really differ: each got its own forces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_time_dependent_field_inside_the_model_over_inet(tiny_server, tmp_path):
    """--field with a frequency: step n of i-PI's NVE is computed at E(n dt), F(R, E) by the model itself
    (over TCP, with i-PI's unconsolidated message order)."""
    port = free_port()
    write_quartz(tmp_path)
    example_input("nve.xml", tmp_path, "127.0.0.1", [
        ("<total_steps> 200 </total_steps>", "<total_steps> 6 </total_steps>"),
        ("stride='50'", "stride='1'"),  # both trajectories
        # i-PI's older message order too: STATUS between POSDATA and GETFORCE, answered HAVEDATA
        ("<ffsocket name='macefield' mode='unix'>", f"<ffsocket name='macefield' mode='inet'><port> {port} </port>"
                                                    "<consolidate_messages> false </consolidate_messages>"),
    ])
    schedule = FieldSchedule((0.0, 0.2, 0.3), frequency_thz=40.0, phase=0.3)  # changes a lot from step to step
    ipi = IPIProcess(tmp_path)
    try:
        done = run_driver(tmp_path, "--host", "127.0.0.1", "--port", str(port), "--template", "quartz.xyz",
                          "--server", target(tiny_server), "--field", "0", "0.2", "0.3", "--field-frequency", "40",
                          "--field-phase", "0.3", "--timestep", "0.5", "--outputs", "--log", "driver.log")
        assert done.returncode == 0, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()
    log = np.loadtxt(tmp_path / "driver.log")
    assert np.array_equal(log[:, 2], np.arange(7)) and np.allclose(log[:, 3], 0.5 * np.arange(7))
    structures = ipi_structures(tmp_path / "nve.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "nve.for_0.extxyz")
    assert sorted(structures) == list(range(7))
    with Client(target(tiny_server), timeout=120) as client:
        for step, atoms in structures.items():
            field = schedule.at(0.5 * step)
            np.testing.assert_allclose(log[step, 4:7], field, rtol=1e-12, atol=1e-15)
            r = client.predict(atoms, electric_field=field, outputs=["energy", "forces", "dipole"])
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert log[step, 7] == pytest.approx(float(r.energy), rel=1e-8)  # geometry recorded to 1e-8 A
            at_zero = client.predict(atoms, outputs=["forces"]).forces
            assert np.abs(at_zero - r.forces).max() > 1e-3 * np.abs(r.forces).max()  # the field matters


# ------------------------------------------------------------------ robustness: restart, i-PI gone, bad input


def data_rows(path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line and not line.startswith("#"))
    except FileNotFoundError:
        return 0


def test_server_restart_is_ridden_out_and_ipi_closing_ends_the_driver(tiny_checkpoint, tmp_path):
    servers = [ServerProcess(["--model", str(tiny_checkpoint)])]
    port = servers[0].port
    run_dir = tmp_path / "restart"
    run_dir.mkdir()
    address = unique_name()
    write_quartz(run_dir)
    example_input("nve.xml", run_dir, address, [("<total_steps> 200 </total_steps>", "<total_steps> 30 </total_steps>")])
    ipi = IPIProcess(run_dir, address)
    driver = subprocess.Popen(driver_command("--unix", address, "--template", "quartz.xyz", "--server",
                                             f"127.0.0.1:{port}", "--retries", "40", "--log", "driver.log"),
                              cwd=run_dir, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: data_rows(run_dir / "driver.log") >= 5, timeout=120, what="5 force calls")
        servers[0].kill()  # SIGKILL mid-run: the stream drops
        time.sleep(0.5)
        servers.append(ServerProcess(["--model", str(tiny_checkpoint), "--port", str(port)]))
        _, err = driver.communicate(timeout=DRIVER_TIMEOUT)
        assert driver.returncode == 0, err
        assert "i-PI sent EXIT after 31 exchanges" in err, err
        assert int(re.search(r"(\d+) stream reconnects", err).group(1)) >= 1, err  # it did lose the server
        assert ipi.wait(120) == 0
        assert ipi_properties(run_dir / "nve.out").shape[0] == 31  # every step was computed
    finally:
        if driver.poll() is None:
            driver.kill()
        ipi.stop()

    # i-PI stopped mid-run (killed): the driver ends cleanly
    gone_dir = tmp_path / "gone"
    gone_dir.mkdir()
    address = unique_name()
    write_quartz(gone_dir)
    example_input("nve.xml", gone_dir, address, [("<total_steps> 200 </total_steps>", "<total_steps> 100000 </total_steps>")])
    ipi = IPIProcess(gone_dir, address)
    driver = subprocess.Popen(driver_command("--unix", address, "--template", "quartz.xyz", "--server",
                                             f"127.0.0.1:{port}", "--log", "driver.log"),
                              cwd=gone_dir, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: data_rows(gone_dir / "driver.log") >= 3, timeout=120, what="3 force calls")
        ipi.stop()
        _, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err
        assert "i-PI closed the connection" in err, err
    finally:
        if driver.poll() is None:
            driver.kill()
        ipi.stop()
        for server in servers:
            server.kill()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("macefield-ipi: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(tiny_server, tmp_path):
    import ase.io

    quartz = quartz_frame(0)
    write_quartz(tmp_path)
    write_quartz(tmp_path, "short.xyz", quartz[:-1])
    germania = quartz.copy()
    germania.numbers[germania.numbers == 14] = 32  # Ge: not an element of the served model
    write_quartz(tmp_path, "ge.xyz", germania)
    ase.io.write(tmp_path / "molecule.xyz", quartz[:6], format="xyz")  # no cell: not periodic
    server = target(tiny_server)

    # option errors: exit 2 before any connection
    done = run_driver(tmp_path, "--unix", "x", "--template", "molecule.xyz", "--server", server, "--outputs",
                      "polarization")
    assert done.returncode == 2 and "polarization needs a periodic template" in one_error_line(done.stderr)
    done = run_driver(tmp_path, "--template", "quartz.xyz", "--server", server)
    assert done.returncode == 2 and "--unix NAME, or --host H --port P" in done.stderr

    address = unique_name()
    example_input("nve.xml", tmp_path, address)
    ipi = IPIProcess(tmp_path, address)
    try:  # i-PI re-sends the structure to the next driver after each of these leaves
        done = run_driver(tmp_path, "--unix", address, "--template", "short.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        assert "i-PI sent 72 atoms, the template has 71" in one_error_line(done.stderr)
        done = run_driver(tmp_path, "--unix", address, "--template", "ge.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        line = one_error_line(done.stderr)
        assert "atomic_numbers" in line and "32" in line and "not in model" in line, line
    finally:
        ipi.stop()
    done = run_driver(tmp_path, "--unix", unique_name(), "--template", "quartz.xyz", "--server", server,
                      "--connect-wait", "1", timeout=120)
    assert done.returncode == 1 and "no i-PI listening at /tmp/ipi_" in one_error_line(done.stderr)
