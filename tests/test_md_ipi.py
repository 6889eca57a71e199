"""``macefield-ipi`` against the real i-PI (3.3) and a real server process on loopback.

Every i-PI run uses an example input of docs/md_engines.md (docs/examples/ipi/),
with its socket renamed so parallel runs never meet.  i-PI records forces,
positions and Born charges with ``format='ase'`` (8 decimals) and properties
with 9 significant digits; the server's own answer for the recorded geometry
is the reference.  Where a simulation cannot be made to show a case on
purpose (a step split over two batched exchanges), i-PI's own socket
forcefield is driven by the test (:class:`md_engines.IPIForceQueue`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import numpy as np
import pytest
from md_engines import (  # noqa: F401 - engine_server is a fixture
    EXAMPLES,
    IPIForceQueue,
    IPIProcess,
    assert_close,
    driver_command,
    engine_server,
    example_input,
    ipi_arrays,
    ipi_properties,
    ipi_structures,
    quartz_frame,
    rotated_triclinic_quartz,
    target,
    unique_name,
)
from serving import (
    ServerProcess,
    assert_torch_free,
    free_port,
    metric,
    save_tiny_model,
    torch_free_env,
    wait_for,
)

from macefield_client import Client
from macefield_client.fields import FieldSchedule, field_function
from macefield_client.ipi import BOHR, HARTREE, DriverInputError, IPIDriver, StepClock, Template, frame_rotation
from macefield_client.ipi_socket import DriverConnection, IPIProtocolError, parse_init

pytest.importorskip("ipi", reason="i-PI is not installed (pip install ipi): the i-PI driver tests need the real i-PI")
from ipi.utils.units import unit_to_internal  # noqa: E402


N_QUARTZ = 72
DRIVER_TIMEOUT = 600


def voigt_xx_yy_zz_xy_xz_yz(t):
    return np.array([t[0, 0], t[1, 1], t[2, 2], t[0, 1], t[0, 2], t[1, 2]])


def write_quartz(directory, name="quartz.xyz", atoms=None):
    import ase.io

    ase.io.write(directory / name, quartz_frame(0) if atoms is None else atoms, format="extxyz")
    return directory / name


def run_driver(directory, *args, timeout=DRIVER_TIMEOUT, env=None):
    return subprocess.run(driver_command(*args), cwd=directory, env=env, capture_output=True, text=True,
                          timeout=timeout)


def driver_log(path):
    """{column name: values} of a macefield-ipi log (names from its header, units dropped)."""
    lines = path.read_text().splitlines()
    names = [name.split("[")[0] for name in lines[1][1:].split()]
    values = np.atleast_2d(np.loadtxt(path))
    return {name: values[:, i] for i, name in enumerate(names)}


def assert_pressure_is_the_virial_plus_kinetic(props, columns, step, stress, volume, what):
    """i-PI's pressure_md (its own kinetic part, the driver's virial) = 2K/(3V) - tr(sigma)/3, eV/A^3."""
    kinetic, pressure = props[step, columns["kinetic"]], props[step, columns["pressure"]]
    expected = 2.0 * kinetic / (3.0 * volume) - np.trace(stress) / 3.0
    assert pressure == pytest.approx(expected, rel=1e-6, abs=1e-9), what


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint):
    """A small random float64 model, with batch limits wide enough for a ring polymer (the PIMD example config)."""
    proc = ServerProcess(["--model", str(tiny_checkpoint), "--config", str(EXAMPLES / "ipi" / "serve-md.yaml")])
    yield proc.wait_ready()
    proc.kill()


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


def test_step_clock_counts_structures_not_exchanges():
    """i-PI pads a short batch with copies of its last structure; beads may start collapsed; a step never spans
    two exchanges (checked against i-PI's own socket code in test_partial_batches_...)."""
    g, x, y = b"g", [b"x%d" % i for i in range(8)], [b"y%d" % i for i in range(8)]
    clock = StepClock(beads=8, first_step=0)
    # step 0: 8 collapsed beads sent as 3 + 5 (each padded to 8); step 1 as 5 + 3; step 2 whole
    steps = [clock.advance(batch) for batch in ([g] * 8, [g] * 8, x[:5] + [x[4]] * 3, x[5:] + [x[7]] * 5, y)]
    assert steps == [0, 0, 1, 1, 2] and clock.consistent
    clock.advance([b"z%d" % i for i in range(5)] + [b"z4"] * 3)  # step 3: 5 of 8 ...
    assert clock.consistent
    clock.advance([b"w%d" % i for i in range(8)])  # ... then 8 more: not one step of 8 beads
    assert not clock.consistent
    unbatched = StepClock(beads=2, first_step=5)
    assert [unbatched.advance([k]) for k in (g, g, b"a", b"b", b"c")] == [5, 5, 6, 6, 7]
    single = StepClock(beads=1)  # one structure padded to a batch of 4
    assert [single.advance([k] * 4) for k in (g, b"a", b"b")] == [0, 1, 2]


def test_a_killed_ipi_resetting_the_stream_ends_the_driver_as_closed():
    """A killed i-PI may reset the TCP stream (RST) instead of closing it: the driver reads that as i-PI gone."""
    import socket
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    ipi_side = socket.create_connection(listener.getsockname())
    driver_side, _ = listener.accept()
    listener.close()
    ipi_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
    ipi_side.close()
    connection = DriverConnection(driver_side)  # its first read meets ECONNRESET, not an end of stream
    assert connection.serve(lambda h, r: []) == "closed"
    connection.close()


def test_frame_rotation_is_the_one_ipi_applies(tmp_path):
    """i-PI turns a periodic ASE input upright (a along x, b in the xy plane): its own reader is the reference."""
    import ase.io
    from ipi.utils.io.backends.io_ase import read_ase

    crystal = rotated_triclinic_quartz()
    ase.io.write(tmp_path / "tri.xyz", crystal, format="extxyz")
    with open(tmp_path / "tri.xyz") as fh:
        _, h, q, names, _ = read_ase(fh)  # i-PI's own reader: h in Angstrom (columns), positions
    rotation = frame_rotation(np.asarray(crystal.cell), h.T)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0) and np.abs(rotation - np.eye(3)).max() > 0.3
    np.testing.assert_allclose(np.asarray(crystal.cell) @ rotation.T, h.T, atol=1e-9)
    np.testing.assert_allclose(crystal.positions @ rotation.T, q.reshape(-1, 3), atol=1e-9)
    assert names == crystal.get_chemical_symbols()
    np.testing.assert_allclose(frame_rotation(h.T, h.T), np.eye(3), atol=1e-15)  # already upright: untouched


def test_every_extra_in_atomic_units_and_duplicates_computed_once(tiny_server):
    """The driver's answer for i-PI's input (atomic units, h with lattice vectors as columns) is the server's."""
    atoms = quartz_frame(3)
    rattled = atoms.copy()
    rattled.positions[0] += 0.05
    h = np.asarray(atoms.cell).T / BOHR
    cells = np.stack([h, h, h])
    positions = np.stack([atoms.positions, rattled.positions, atoms.positions]) / BOHR
    field = FieldSchedule((0.0, 0.1, 0.05))
    with Client(target(tiny_server), timeout=120) as client:
        driver = IPIDriver(client, Template.from_atoms(atoms),
                           extras=("dipole", "BEC", "polarization", "polarizability"), field=field)
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
            # fixed conversion factors (not the driver's own constants): 1 e/Bohr^2 = 3.57106 e/A^2,
            # 1 e^2*Bohr^2/Hartree = 0.0102909 e*A^2/V
            assert_close(np.array(extras["polarization"]) * 3.57106, r.polarization, 2e-6)
            assert_close(np.array(extras["polarizability"]) * 0.0102909, r.polarizability, 1e-5)
        driver.close()


def test_periodicity_comes_per_axis_from_the_template_or_is_asked_for(tiny_server):
    """A slab template (pbc T T F) is computed as a slab; a template without a cell refuses i-PI's cell unless
    told --pbc (a crystal in i-PI's cell) or --molecule."""
    crystal = quartz_frame(0)
    slab = crystal.copy()
    slab.cell[2] *= 3.0  # vacuum along c
    slab.pbc = (True, True, False)
    h = np.asarray(slab.cell).T[None] / BOHR
    x = slab.positions[None] / BOHR
    bare = Template.from_atoms(slab)
    bare.cell, bare.pbc = None, np.zeros(3, bool)  # what ASE reads from a plain or i-PI-format xyz
    with Client(target(tiny_server), timeout=120) as client:
        def energy(template, **kwargs):
            driver = IPIDriver(client, template, extras=(), **kwargs)
            try:
                (answer,) = driver.compute(h, x)
                return answer
            finally:
                driver.close()

        def reference(pbc):
            atoms = slab.copy()
            atoms.pbc = pbc
            return float(client.predict(atoms, outputs=["energy"]).energy) / HARTREE

        as_slab = energy(Template.from_atoms(slab))
        assert as_slab.energy == pytest.approx(reference((True, True, False)), rel=1e-12)
        assert not np.any(as_slab.virial)  # no stress unless periodic in all three directions
        assert abs(reference((True, True, False)) - reference(False)) > 1e-4  # the images matter
        with pytest.raises(DriverInputError, match="--pbc .* or --molecule"):
            energy(bare)
        assert energy(bare, pbc=(True, True, True)).energy == pytest.approx(reference(True), rel=1e-12)
        assert energy(bare, pbc=(False, False, False)).energy == pytest.approx(reference(False), rel=1e-12)


# ------------------------------------------------------------------ NVE, driven dynamics (small calibrated model)


def test_nve_quartz_conserves_energy_and_ipi_records_the_servers_forces(engine_server, tmp_path):
    """docs/examples/ipi/nve.xml: 200 steps at 0.5 fs; the driver runs without torch."""
    address = unique_name()
    write_quartz(tmp_path)
    example_input("nve.xml", tmp_path, address)
    env, report = torch_free_env(tmp_path)
    ipi = IPIProcess(tmp_path, address)
    try:
        done = run_driver(tmp_path, "--unix", address, "--template", "quartz.xyz", "--server", target(engine_server),
                          "--log", "driver.log", env=env)
        assert done.returncode == 0, done.stderr
        assert "i-PI sent EXIT after 201 MD steps: 201 exchanges" in done.stderr, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()
    assert_torch_free(report)

    # step, time (ps), conserved (eV), T (K), kinetic (eV), potential (eV), pressure (eV/A^3),
    # virial_md xx yy zz xy xz yz (eV/A^3)
    props = ipi_properties(tmp_path / "nve.out")
    assert props.shape == (201, 13) and props[-1, 0] == 200 and props[-1, 1] == pytest.approx(0.1)
    drift = np.abs(props[:, 2] - props[0, 2]).max() / N_QUARTZ
    print(f"i-PI NVE: conserved quantity drifts {drift * 1e3:.2g} meV/atom")  # docs/md_engines.md quotes it
    assert drift < 1e-3, f"conserved quantity drifts {drift * 1e3:.3f} meV/atom"
    assert np.ptp(props[:, 5]) > 100 * N_QUARTZ * drift  # the atoms really moved on the model's surface

    structures = ipi_structures(tmp_path / "nve.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "nve.for_0.extxyz")
    assert sorted(structures) == sorted(forces) == [0, 50, 100, 150, 200]
    log = driver_log(tmp_path / "driver.log")
    assert np.array_equal(log["step"], np.arange(201)) and np.all(log["server"] > 0) and np.all(log["batch"] == 1)
    with Client(target(engine_server), timeout=120) as client:
        for step, atoms in structures.items():
            r = client.predict(atoms, outputs=["energy", "forces", "stress"])
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert_close(props[step, 7:13], -voigt_xx_yy_zz_xy_xz_yz(r.stress), 1e-6, f"virial at step {step}")
            assert_pressure_is_the_virial_plus_kinetic(props, {"kinetic": 4, "pressure": 6}, step, r.stress,
                                                       atoms.get_volume(), f"pressure at step {step}")
            # i-PI printed eV with its own 8-digit constant: compare in Hartree, what the driver sent
            assert unit_to_internal("energy", "electronvolt", props[step, 5]) == pytest.approx(
                float(r.energy) / HARTREE, rel=1e-8)
            # the extrapolation grade (the served head has statistics) reaches the log
            assert log["extrapolation_max"][step] == pytest.approx(float(r.extrapolation_max), rel=1e-5)
            assert log["extrapolating_atoms"][step] == int((r.extrapolation > 1.0).sum())


def test_driven_dynamics_gets_the_servers_born_charges(engine_server, tmp_path):
    """docs/examples/ipi/driven.xml: eda-nve with a field pulse; i-PI takes Z* from the driver (--bec)."""
    address = unique_name()
    write_quartz(tmp_path)
    example_input("driven.xml", tmp_path, address)
    ipi = IPIProcess(tmp_path, address)
    try:
        done = run_driver(tmp_path, "--unix", address, "--template", "quartz.xyz", "--server", target(engine_server),
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
    with Client(target(engine_server), timeout=120) as client:
        for step, atoms in structures.items():
            r = client.predict(atoms, outputs=["forces", "dipole", "born_charges"])  # zero field: i-PI adds Z*.E
            # i-PI's BEC row 3k+j, column i is Z*[k, i, j]: becx[k, j] = Z*[k, x, j]
            z_ipi = np.stack([b[step] for b in bec], axis=1)
            assert_close(z_ipi, r.born_charges, 1e-6, f"Born charges at step {step}")
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert_close(props[step, 7:10], r.dipole, 1e-6, f"dipole at step {step}")  # sent as e*Bohr


def test_rotated_triclinic_crystal_field_in_the_templates_frame(engine_server, tmp_path):
    """A triclinic cell turned away from the axes: i-PI holds it upright, the driver finds that rotation, applies
    --field (given for the template) turned with it, and i-PI's forces, virial and pressure are the server's for
    the triclinic cell it recorded."""
    crystal = rotated_triclinic_quartz()
    address = unique_name()
    write_quartz(tmp_path, atoms=crystal)
    example_input("nve.xml", tmp_path, address, [("<total_steps> 200 </total_steps>", "<total_steps> 4 </total_steps>"),
                                                 ("stride='50'", "stride='2'")])
    field = np.array([0.0, 0.05, 0.03])  # V/A, in the template's frame
    ipi = IPIProcess(tmp_path, address)
    try:
        done = run_driver(tmp_path, "--unix", address, "--template", "quartz.xyz", "--server", target(engine_server),
                          "--field", *map(str, field), "--log", "driver.log")
        assert done.returncode == 0, done.stderr
        assert "rotated from the template's frame" in done.stderr, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()

    props = ipi_properties(tmp_path / "nve.out")
    structures = ipi_structures(tmp_path / "nve.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "nve.for_0.extxyz")
    assert sorted(structures) == [0, 2, 4]
    upright = np.asarray(structures[0].cell)
    assert np.allclose(upright[np.triu_indices(3, 1)], 0.0, atol=1e-6)  # i-PI's frame: a along x, b in xy
    rotation = np.linalg.solve(np.asarray(crystal.cell), upright).T  # i-PI's cell = template cell @ R^T
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-7)
    assert np.abs(rotation - np.eye(3)).max() > 0.3
    log = driver_log(tmp_path / "driver.log")
    applied = np.stack([log[k] for k in ("Ex", "Ey", "Ez")], axis=1)
    np.testing.assert_allclose(applied, np.tile(rotation @ field, (5, 1)), atol=1e-8)
    with Client(target(engine_server), timeout=120) as client:
        for step, atoms in structures.items():
            assert abs(atoms.cell[1, 0]) > 1.0 and abs(atoms.cell[2, 1]) > 1.0  # triclinic
            r = client.predict(atoms, electric_field=rotation @ field, outputs=["energy", "forces", "stress", "dipole"])
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert_close(props[step, 7:13], -voigt_xx_yy_zz_xy_xz_yz(r.stress), 1e-6, f"virial at step {step}")
            assert abs(r.stress[0, 1]) > 1e-3 * np.abs(r.stress).max()  # off-diagonal stress: a real check
            assert_pressure_is_the_virial_plus_kinetic(props, {"kinetic": 4, "pressure": 6}, step, r.stress,
                                                       atoms.get_volume(), f"pressure at step {step}")
        # the same physics as the template in its own frame with the field as given
        r = client.predict(crystal, electric_field=field, outputs=["energy", "dipole"])
        assert log["energy"][0] == pytest.approx(float(r.energy), rel=1e-9)
        dipole = np.array([log[k][0] for k in ("dipole_x", "dipole_y", "dipole_z")])
        assert_close(dipole, rotation @ r.dipole, 1e-7, "dipole in i-PI's frame")


# ------------------------------------------------------------------ batched PIMD, field inside the model (tiny model)


def run_pimd(directory, server, batched: bool):
    directory.mkdir()
    address = unique_name()
    write_quartz(directory)
    replace = () if batched else (("<batch_size> 8 </batch_size>", ""),)
    example_input("pimd.xml", directory, address, replace)
    ipi = IPIProcess(directory, address)
    try:
        done = run_driver(directory, "--unix", address, "--template", "quartz.xyz", "--server", target(server),
                          "--beads", "8", "--log", "driver.log")
        assert done.returncode == 0, done.stderr
        assert ipi.wait(120) == 0, ipi.log()[-3000:]
    finally:
        ipi.stop()
    return done.stderr, driver_log(directory / "driver.log")


def test_batched_pimd_matches_unbatched_and_reaches_the_server_as_batches_of_8(tiny_server, tmp_path):
    """docs/examples/ipi/pimd.xml (8 beads, batch_size 8) against the same input without batching."""
    port = tiny_server.metrics_port

    def batches(le):
        return metric(port, "macefield_batch_structures_bucket", le=le)

    def batch_calls():
        return metric(port, "macefield_requests_total", method="PredictBatch", code="OK")

    before = {le: batches(le) for le in ("4.0", "8.0", "+Inf")}
    calls_before = batch_calls()
    said, log = run_pimd(tmp_path / "batched", tiny_server, batched=True)
    after = {le: batches(le) for le in ("4.0", "8.0", "+Inf")}
    calls = batch_calls() - calls_before
    assert "after 11 MD steps:" in said, said  # 10 steps + the initial forces
    # i-PI usually sends a step's 8 beads in one exchange (the first: 8 identical beads, computed once), but its
    # poll thread may catch a step half queued: count from the driver's log what went to the server
    exchanges = np.unique(log["exchange"])
    unique = np.array([log["computed"][log["exchange"] == e].sum() for e in exchanges])
    assert unique.sum() >= 81 and np.sum(unique == 8) >= 1, unique
    for e, u in zip(exchanges, unique):
        assert np.all(log["batch"][log["exchange"] == e] == u), (e, u)  # each exchange was one engine pass
    assert calls == np.sum(unique > 1)  # one PredictBatch per exchange of several structures
    assert after["8.0"] - after["4.0"] - (before["8.0"] - before["4.0"]) == np.sum(unique > 4)
    assert after["+Inf"] - after["8.0"] == before["+Inf"] - before["8.0"]

    said, _ = run_pimd(tmp_path / "unbatched", tiny_server, batched=False)
    assert "after 11 MD steps: 88 exchanges (88 structures, 88 computed," in said, said

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


@pytest.fixture(scope="module")
def limited_server(tiny_checkpoint, tmp_path_factory):
    """The tiny model on a server that takes at most 3 structures per request."""
    config = tmp_path_factory.mktemp("limited") / "serve.yaml"
    config.write_text("limits:\n  max_structures_per_request: 3\n")
    proc = ServerProcess(["--model", str(tiny_checkpoint), "--config", str(config)])
    yield proc.wait_ready()
    proc.kill()


def test_partial_batches_keep_the_field_clock_and_batches_respect_the_servers_limit(limited_server, tmp_path):
    """i-PI's own socket forcefield with batch_size 8 sends steps split over exchanges, padded with copies (what its
    poll thread does when it catches a step half queued): a time-dependent field stays on the MD step, batches
    above the server's 3 structures per request are split, and a count that crosses a step stops the driver."""
    crystal = quartz_frame(0)
    write_quartz(tmp_path)
    schedule = FieldSchedule((0.0, 0.2, 0.3), frequency_thz=40.0, phase=0.3)  # changes a lot from step to step
    rng = np.random.default_rng(7)

    def beads(n):
        return [crystal.positions + rng.normal(0.0, 0.02, crystal.positions.shape) for _ in range(n)]

    # (step, structures of one exchange): step 0 = 8 collapsed beads as 3 + 5, step 1 as 5 + 3, step 2 whole
    first, second = beads(8), beads(8)
    plan = [(0, [crystal.positions] * 3), (0, [crystal.positions] * 5), (1, first[:5]), (1, first[5:]), (2, second)]
    address = unique_name()
    batch_calls_before = metric(limited_server.metrics_port, "macefield_requests_total", method="PredictBatch",
                                code="OK")
    forcefield = IPIForceQueue(address, batch_size=8)
    driver = subprocess.Popen(driver_command("--unix", address, "--template", "quartz.xyz", "--server",
                                             target(limited_server), "--field", "0", "0.2", "0.3", "--field-frequency",
                                             "40", "--field-phase", "0.3", "--timestep", "0.5", "--beads", "8",
                                             "--outputs", "--log", "driver.log"),
                              cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        answers = [forcefield.compute(crystal.cell, structures, alive=lambda: driver.poll() is None)
                   for _, structures in plan]
        # step 3: 5 beads, then 8 more before the step could end: --beads 8 cannot be right
        forcefield.compute(crystal.cell, beads(5), alive=lambda: driver.poll() is None)
        with pytest.raises(RuntimeError, match="driver left"):
            forcefield.compute(crystal.cell, beads(8), alive=lambda: driver.poll() is None)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        forcefield.close()
    assert driver.returncode == 1
    assert "step 3: i-PI sent more structures than --beads 8" in err, err

    log = driver_log(tmp_path / "driver.log")
    assert np.array_equal(np.unique(log["exchange"]), np.arange(6))
    assert [int(log["step"][log["exchange"] == e][0]) for e in range(6)] == [0, 0, 1, 1, 2, 3]
    # 5 + 3 + 8 + 5 distinct structures went as PredictBatch messages of at most 3: 2 + 1 + 3 + 2
    assert metric(limited_server.metrics_port, "macefield_requests_total", method="PredictBatch",
                  code="OK") - batch_calls_before == 8
    with Client(target(limited_server), timeout=120) as client:
        for (step, structures), results in zip(plan, answers):
            assert len(results) == len(structures)  # i-PI dropped its padding
            field = schedule.at(0.5 * step)
            expected = client.predict_many([dict(numbers=crystal.numbers, positions=x, cell=crystal.cell, pbc=True)
                                            for x in structures], electric_field=field, outputs=["energy"])
            for (energy, *_), r in zip(results, expected):
                assert energy * HARTREE == pytest.approx(float(r.energy), rel=1e-10), f"step {step}"


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
    log = driver_log(tmp_path / "driver.log")
    assert np.array_equal(log["step"], np.arange(7)) and np.allclose(log["time"], 0.5 * np.arange(7))
    assert np.all(np.isnan(log["extrapolation_max"])) and np.all(log["extrapolating_atoms"] == -1)  # no statistics
    applied = np.stack([log[k] for k in ("Ex", "Ey", "Ez")], axis=1)
    structures = ipi_structures(tmp_path / "nve.pos_0.extxyz")
    forces = ipi_arrays(tmp_path / "nve.for_0.extxyz")
    assert sorted(structures) == list(range(7))
    with Client(target(tiny_server), timeout=120) as client:
        for step, atoms in structures.items():
            field = schedule.at(0.5 * step)
            np.testing.assert_allclose(applied[step], field, rtol=1e-12, atol=1e-15)
            r = client.predict(atoms, electric_field=field, outputs=["energy", "forces", "dipole"])
            assert_close(forces[step], r.forces, 1e-6, f"forces at step {step}")
            assert log["energy"][step] == pytest.approx(float(r.energy), rel=1e-8)  # geometry recorded to 1e-8 A
            at_zero = client.predict(atoms, outputs=["forces"]).forces
            assert np.abs(at_zero - r.forces).max() > 1e-3 * np.abs(r.forces).max()  # the field matters


# ------------------------------------------------------------------ robustness: restart, i-PI gone, bad input


def data_rows(path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line and not line.startswith("#"))
    except FileNotFoundError:
        return 0


def start_md(directory, port, *driver_args):
    """i-PI running the NVE example without end (100000 steps) and the driver on the server at ``port``."""
    directory.mkdir()
    address = unique_name()
    write_quartz(directory)
    example_input("nve.xml", directory, address,
                  [("<total_steps> 200 </total_steps>", "<total_steps> 100000 </total_steps>")])
    ipi = IPIProcess(directory, address)
    driver = subprocess.Popen(driver_command("--unix", address, "--template", "quartz.xyz", "--server",
                                             f"127.0.0.1:{port}", "--log", "driver.log", *driver_args),
                              cwd=directory, stderr=subprocess.PIPE, text=True)
    return ipi, driver


def test_server_restart_is_ridden_out_and_ipi_closing_ends_the_driver(tiny_checkpoint, tmp_path):
    servers = [ServerProcess(["--model", str(tiny_checkpoint)])]
    port = servers[0].port
    run_dir = tmp_path / "restart"
    ipi, driver = start_md(run_dir, port, "--retries", "40")
    try:
        wait_for(lambda: data_rows(run_dir / "driver.log") >= 5, timeout=120, what="5 force calls")
        servers[0].kill()  # SIGKILL mid-run: the stream drops
        time.sleep(0.5)
        servers.append(ServerProcess(["--model", str(tiny_checkpoint), "--port", str(port)]))
        resumed = data_rows(run_dir / "driver.log")
        wait_for(lambda: data_rows(run_dir / "driver.log") >= resumed + 5, timeout=120,
                 what="5 force calls from the new server")
        (run_dir / "EXIT").touch()  # i-PI's soft exit: it stops at the end of the step
        _, err = driver.communicate(timeout=DRIVER_TIMEOUT)
        assert driver.returncode == 0, err
        assert re.search(r"i-PI (sent EXIT|closed the connection) after \d+ MD steps", err), err
        assert int(re.search(r"(\d+) stream reconnects", err).group(1)) >= 1, err  # it did lose the server
        assert ipi.wait(120) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
        ipi.stop()
    steps = driver_log(run_dir / "driver.log")["step"]
    assert np.array_equal(steps, np.arange(len(steps))) and len(steps) >= resumed + 5  # every step once, in order
    recorded = ipi_properties(run_dir / "nve.out")[:, 0]
    assert np.array_equal(recorded, np.arange(len(recorded))) and len(recorded) >= len(steps) - 1

    # i-PI stopped mid-run (killed): the driver ends cleanly
    gone_dir = tmp_path / "gone"
    ipi, driver = start_md(gone_dir, port)
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


def write_ipi_xyz(path, atoms):
    """``atoms`` in i-PI's own xyz format (the cell in a ``# CELL(abcABC)`` comment, which ASE does not read)."""
    a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
    lines = [str(len(atoms)), f"# CELL(abcABC): {a:.10f} {b:.10f} {c:.10f} {alpha:.6f} {beta:.6f} {gamma:.6f}  "
             "Step: 0  Bead: 0 positions{angstrom}  cell{angstrom}"]
    lines += [f"{s:2s} {x:.10f} {y:.10f} {z:.10f}"
              for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    path.write_text("\n".join(lines) + "\n")


def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(tiny_server, tmp_path):
    import ase.io

    quartz = quartz_frame(0)
    write_quartz(tmp_path)
    write_quartz(tmp_path, "short.xyz", quartz[:-1])
    germania = quartz.copy()
    germania.numbers[germania.numbers == 14] = 32  # Ge: not an element of the served model
    write_quartz(tmp_path, "ge.xyz", germania)
    write_quartz(tmp_path, "reordered.xyz", quartz[np.argsort(quartz.numbers, kind="stable")])  # O first
    ase.io.write(tmp_path / "molecule.xyz", quartz[:6], format="xyz")  # no cell: not periodic
    write_ipi_xyz(tmp_path / "ipi.xyz", quartz)
    server = target(tiny_server)

    # option errors: exit 2 before any connection
    done = run_driver(tmp_path, "--unix", "x", "--template", "molecule.xyz", "--server", server, "--outputs",
                      "polarization")
    assert done.returncode == 2
    assert "polarization needs a cell periodic in all three directions" in one_error_line(done.stderr)
    done = run_driver(tmp_path, "--template", "quartz.xyz", "--server", server)
    assert done.returncode == 2 and "--unix NAME, or --host H --port P" in done.stderr
    done = run_driver(tmp_path, "--unix", "x", "--template", "quartz.xyz", "--server", server, "--field-frequency",
                      "20", "--field-sigma", "4")
    assert done.returncode == 2 and "--field-frequency, --field-sigma shape(s) the field of --field" in done.stderr

    address = unique_name()
    example_input("nve.xml", tmp_path, address,
                  [("<total_steps> 200 </total_steps>", "<total_steps> 3 </total_steps>")])
    ipi = IPIProcess(tmp_path, address)
    try:  # i-PI re-sends the structure to the next driver after each of these leaves
        done = run_driver(tmp_path, "--unix", address, "--template", "short.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        assert "i-PI sent 72 atoms, the template has 71" in one_error_line(done.stderr)
        done = run_driver(tmp_path, "--unix", address, "--template", "reordered.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        line = one_error_line(done.stderr)
        assert re.search(r"i-PI's first structure is not the template: atom \d+ lies [\d.]+ A from the template's "
                         r"\(\d+ atoms differ\)", line), line
        done = run_driver(tmp_path, "--unix", address, "--template", "ge.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        line = one_error_line(done.stderr)
        assert "atomic_numbers" in line and "32" in line and "not in model" in line, line
        # i-PI's own xyz format: ASE reads no cell, i-PI sends one: periodic only when told so
        done = run_driver(tmp_path, "--unix", address, "--template", "ipi.xyz", "--server", server, timeout=120)
        assert done.returncode == 1
        assert "the template has no cell, but i-PI sends one" in one_error_line(done.stderr)
        done = run_driver(tmp_path, "--unix", address, "--template", "ipi.xyz", "--pbc", "--server", server,
                          "--log", "driver.log", timeout=120)
        assert done.returncode == 0 and "i-PI sent EXIT after 4 MD steps" in done.stderr, done.stderr
        assert ipi.wait(60) == 0
    finally:
        ipi.stop()
    with Client(server, timeout=120) as client:  # the first step went as the crystal, not as a molecule in a box
        assert driver_log(tmp_path / "driver.log")["energy"][0] == pytest.approx(
            float(client.predict(ase.io.read(tmp_path / "quartz.xyz"), outputs=["energy"]).energy), rel=1e-9)
    done = run_driver(tmp_path, "--unix", unique_name(), "--template", "quartz.xyz", "--server", server,
                      "--connect-wait", "1", timeout=120)
    assert done.returncode == 1 and "no i-PI listening at /tmp/ipi_" in one_error_line(done.stderr)
