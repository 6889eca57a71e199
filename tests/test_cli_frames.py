"""``macefield predict`` / ``eval`` and the ASE calculator on a user's files: a field read from a file is announced,
a trust summary comes by default when structures extrapolate, and the small things a command line must get right
(standard output, comma lists, --quiet, a closed pipe, Ctrl-C, warnings pointing at the user's line).

Torch-free commands against the embedded default model served on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import ase.io
import numpy as np
import pytest
from serving import interruptible, run_torch_free, torch_free_env

from macefield_client.structures import alpha_quartz, perovskite_batio3

CLI = [sys.executable, "-m", "macefield_client.cli"]
FIELD_LINE = ("macefield: WARNING: applying the electric field read from the input file: info['REF_electric_field'] = "
              "[0.3, 0.3, 0.3] V/A (|E| = 0.52 V/A) in 2 of 2 frame(s)")



@pytest.fixture(scope="module")
def target(default_served):
    return default_served


@pytest.fixture
def placeholder_file(tmp_path):
    """Two BaTiO3 frames whose file carries a placeholder field, written as a user's file has it (with commas)."""
    frames = [perovskite_batio3(repeat=(2, 2, 2)), perovskite_batio3(repeat=(2, 2, 2))]
    frames[1].positions[0] += 0.05
    for a in frames:
        a.info["REF_energy"] = -100930.0 / 135 * len(a)  # the data's energy per atom
    path = tmp_path / "bto.xyz"
    ase.io.write(path, frames, format="extxyz")
    text = path.read_text().replace('Properties=', 'REF_electric_field="0.3, 0.3, 0.3" Properties=')
    path.write_text(text)
    assert np.allclose(ase.io.read(path).info["REF_electric_field"], 0.3)
    return path


def test_a_field_from_the_file_is_announced_and_the_trust_summary_comes_by_default(target, placeholder_file, tmp_path):
    env = torch_free_env(tmp_path)
    out = tmp_path / "out.xyz"
    proc = run_torch_free([*CLI, "predict", str(placeholder_file), "--server", target, "-o", str(out)], env)
    assert FIELD_LINE in proc.stderr and "--field 0 0 0 evaluates at zero field" in proc.stderr
    np.testing.assert_allclose(ase.io.read(out).info["MACE_electric_field"], 0.3)  # applied (and said)
    trust = [line for line in proc.stderr.splitlines() if line.startswith("macefield: TRUST:")]
    assert any("the field of 2 structure(s), |E| up to 0.52 V/A, is outside what the model was trained to describe"
               in line for line in trust), proc.stderr
    # eval says the same without --extrapolation, on stderr and in its report
    text = run_torch_free([*CLI, "eval", str(placeholder_file), "--server", target], env)
    assert FIELD_LINE in text.stderr and "TRUST:" in text.stdout and "TRUST:" in text.stderr
    # at zero field, on the structure the head was trained for: nothing to say
    quiet = run_torch_free([*CLI, "predict", str(placeholder_file), "--server", target, "-o", str(out),
                            "--field", "0", "0", "0", "--head", "batio3"], env)
    assert "WARNING" not in quiet.stderr
    quartz = tmp_path / "quartz.xyz"
    ase.io.write(quartz, [alpha_quartz(cell="pbe")], format="extxyz")
    clean = run_torch_free([*CLI, "predict", str(quartz), "--server", target, "-o", str(out)], env)
    assert "TRUST" not in clean.stderr and "WARNING" not in clean.stderr


def test_trust_summary_counts_extrapolating_structures(target, tmp_path):
    env = torch_free_env(tmp_path)
    frames = [alpha_quartz(cell="pbe"), alpha_quartz(cell="pbe", rattle=0.3, seed=1), alpha_quartz(cell="pbe")]
    src = tmp_path / "q.xyz"
    ase.io.write(src, frames, format="extxyz")
    proc = run_torch_free([*CLI, "predict", str(src), "--server", target, "-o", str(tmp_path / "o.xyz")], env)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("macefield: TRUST:")]
    assert line.startswith("macefield: TRUST: 1 of 3 structure(s) extrapolating (grade > 1; worst ")
    assert "in frame 1)" in line


def test_ase_calculator_announces_a_field_from_atoms_info_at_the_users_line(target):
    from macefield_client import FieldFromFileWarning
    from macefield_client.ase import MACEFieldCalculator

    atoms = perovskite_batio3(repeat=(2, 2, 2))
    atoms.info["REF_electric_field"] = np.array([0.3, 0.3, 0.3])
    calc = MACEFieldCalculator(target)
    atoms.calc = calc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.get_potential_energy()  # the line the warnings must name
        line = sys._getframe().f_lineno - 1
    found = {type(w.message).__name__: w for w in caught}
    field = found["FieldFromFileWarning"]
    assert "atoms.info['REF_electric_field']" in str(field.message) and "0.52 V/A" in str(field.message)
    assert issubclass(field.category, FieldFromFileWarning)
    for w in caught:  # the field warning and the extrapolation warning both point here, not into ASE
        assert (w.filename, w.lineno) == (__file__, line), (w.filename, w.lineno)
    atoms.positions[0] += 0.01
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        atoms.get_potential_energy()
    assert not [w for w in again if issubclass(w.category, FieldFromFileWarning)]  # once per calculator and key
    calc.close()


def test_predict_to_stdout_comma_outputs_and_quiet(target, tmp_path):
    env = torch_free_env(tmp_path)
    src = tmp_path / "q.xyz"
    ase.io.write(src, [alpha_quartz(cell="pbe")] * 2, format="extxyz")
    proc = run_torch_free([*CLI, "predict", str(src), "--server", target, "-o", "-", "--outputs",
                           "energy,extrapolation", "--quiet"], env)
    assert proc.stderr == ""
    path = tmp_path / "stdout.xyz"
    path.write_text(proc.stdout)
    got = ase.io.read(path, index=":")
    assert len(got) == 2 and "MACE_extrapolation" in got[0].arrays and "MACE_forces" not in got[0].arrays
    mixed = run_torch_free([*CLI, "predict", str(src), "--server", target, "-o", str(tmp_path / "o.xyz"),
                            "--outputs", "energy,forces", "dipole"], env)
    assert "wrote 2 structure(s)" in mixed.stderr
    written = ase.io.read(tmp_path / "o.xyz")
    assert "MACE_forces" in written.arrays and "MACE_dipole" in written.info and "MACE_stress" not in written.info
    bad = subprocess.run([*CLI, "predict", str(src), "-o", "-", "--outputs", "energy,nope"], env=env[0],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown output nope" in bad.stderr


def test_a_closed_pipe_and_ctrl_c_end_without_a_traceback(target, tmp_path):
    env = torch_free_env(tmp_path)[0]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (macefield info | head -0)
    proc = subprocess.run([*CLI, "info", "--server", target], env=env, stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=60)
    os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr

    src = tmp_path / "q.xyz"
    ase.io.write(src, [alpha_quartz()], format="extxyz")
    with socket.socket() as reserved:  # bound, never listening: connections are refused and nobody else takes it
        reserved.bind(("127.0.0.1", 0))
        nobody = "127.0.0.1:%d" % reserved.getsockname()[1]
        waiting = subprocess.Popen(interruptible([*CLI, "predict", str(src), "--server", nobody, "-o",
                                                  str(tmp_path / "o.xyz"), "--retries", "50"]),
                                   env=env, stderr=subprocess.PIPE, text=True)
        first = waiting.stderr.readline()  # the first "waiting for server" line: it is waiting now
        assert "waiting for server" in first, first
        time.sleep(0.3)
        waiting.send_signal(signal.SIGINT)
        rest = waiting.stderr.read()
        assert waiting.wait(timeout=60) == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "macefield: interrupted", rest


def test_client_docstrings_say_what_the_methods_do():
    from macefield_client import AsyncClient, Client
    from macefield_client.contract import DEFAULT_OUTPUTS

    doc = Client.predict.__doc__
    assert "energy, forces, stress, dipole, polarization" in doc and list(DEFAULT_OUTPUTS) == [
        "energy", "forces", "stress", "dipole", "polarization"]
    assert "allow_unseen_elements" in doc
    for method in (Client.close, AsyncClient.close, Client.predict_many, Client.session):
        assert method.__doc__ and len(method.__doc__.strip()) > 20, method
