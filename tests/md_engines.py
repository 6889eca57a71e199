"""Helpers for the MD-engine tests: the real quartz frame, the documented example inputs, i-PI processes,
i-PI's own socket forcefield driven by a test, a small calibrated model served for the engines."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from conftest import REPO, md_test_model, quartz_like
from serving import ServerProcess

EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory):
    """A small untrained model served in float64 by a server process, for tests of engine protocol, not physics:
    conftest's ``md_test_model`` (float64, ZBL pair repulsion) with field weights of standard deviation 3 (Born
    charges up to ~0.4 e; P of the quartz frame changes by ~1e-5 e/A^2 at 0.06 V/A), with extrapolation statistics
    for head sio2 from 12 rattled quartz cells (the quartz frame grades up to ~3.5, about half its atoms above 1).
    sio2, the first head, is the server's default head.  The random surface hardly holds the crystal (forces ~0.04
    eV/A RMS on the quartz frame): in 200 NVE steps at 300 K atoms move up to ~1.3 A; the ZBL term keeps every pair
    above ~1.2 A (without it atoms pass within 0.5 A, which the server refuses)."""
    from macefield_server.engine import save_model
    from macefield_server.engine.extrapolation import attach
    from macefield_server.training.calibration import calibrate

    model = md_test_model(field_scale=3.0)
    reference = [quartz_like(rattle=0.05, seed=s) for s in range(12)]
    model = attach(model, calibrate(model, reference, "sio2", reference={"what": "12 rattled quartz cells"}))
    path = save_model(model, tmp_path_factory.mktemp("engine") / "engine.pt")
    proc = ServerProcess(["--model", str(path), "--dtype", "float64"])
    yield proc.wait_ready()
    proc.kill()


def target(server) -> str:
    return f"127.0.0.1:{server.port}"


def assert_close(got, want, rel, what=""):
    """|got - want| <= rel * (|want| + max |want|): relative to each value and to the array's scale."""
    want = np.asarray(want, dtype=float)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max(), err_msg=what)


def quartz_frame(index: int = 0):
    """72-atom alpha-quartz as docs/md_engines.md builds it (no data file): the orthorhombic 2x1x2 cell of the
    default model's DFT data at its PBE lattice constants, atoms displaced by 0.05 A (standard deviation) with
    seed ``index`` (0: the documented initial configuration)."""
    from ase.build import make_supercell

    from macefield_client.structures import alpha_quartz

    quartz = make_supercell(alpha_quartz(cell="pbe"), [[2, 0, 0], [1, 2, 0], [0, 0, 2]])
    quartz.rattle(0.05, seed=index)
    return quartz


def triclinic_quartz():
    """(the quartz frame, the same crystal in a triclinic cell of its lattice: a, a + b, b + c; atoms wrapped)."""
    atoms = quartz_frame(0)
    a, b, c = np.asarray(atoms.cell)
    tri = atoms.copy()
    tri.set_cell([a, a + b, b + c], scale_atoms=False)
    tri.wrap()
    return atoms, tri


def rotated_triclinic_quartz():
    """The triclinic quartz turned away from every axis (i-PI turns such a cell upright when it reads it)."""
    _, tri = triclinic_quartz()
    tri.rotate(35.0, "z", rotate_cell=True)
    tri.rotate(-20.0, (1.0, 1.0, 0.0), rotate_cell=True)
    return tri


def unique_name(prefix: str = "mf") -> str:
    """A socket name no parallel test run uses (i-PI's unix sockets all live in /tmp)."""
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def ipi_executable() -> str:
    found = Path(sysconfig.get_path("scripts")) / "i-pi"
    return str(found) if found.exists() else (shutil.which("i-pi") or "i-pi")


def example_input(name: str, directory: Path, address: str, replace: Sequence[Tuple[str, str]] = ()) -> Path:
    """Copy docs/examples/ipi/``name`` into ``directory`` as input.xml with the socket ``address``.

    ``replace``: further (old, new) text substitutions (every occurrence), each of which must occur.
    """
    text = (EXAMPLES / "ipi" / name).read_text()
    text, n = re.subn(r"<address>\s*macefield\s*</address>", f"<address> {address} </address>", text)
    assert n == 1, f"{name}: no <address> macefield </address>"
    for old, new in replace:
        assert old in text, f"{name}: {old!r} not found"
        text = text.replace(old, new)
    path = Path(directory) / "input.xml"
    path.write_text(text)
    return path


class IPIProcess:
    """``i-pi input.xml`` running in ``directory`` (output to ipi.log there)."""

    def __init__(self, directory: Path, address: Optional[str] = None, input_name: str = "input.xml"):
        self.directory = Path(directory)
        self.address = address
        self._log = open(self.directory / "ipi.log", "w")
        self.proc = subprocess.Popen([sys.executable, ipi_executable(), input_name], cwd=self.directory,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def log(self) -> str:
        self._log.flush()
        return (self.directory / "ipi.log").read_text()

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self._log.close()
        if self.address:
            try:
                os.unlink(f"/tmp/ipi_{self.address}")
            except FileNotFoundError:
                pass


def driver_command(*args: str) -> list:
    """``macefield-ipi ARGS`` run as a module of this interpreter."""
    return [sys.executable, "-m", "macefield_client.ipi", *args]


def ipi_properties(path: Path) -> np.ndarray:
    """An i-PI properties file as a (steps, columns) array."""
    return np.atleast_2d(np.loadtxt(path))


def _ipi_trajectory(path: Path):
    import ase.io

    for atoms in ase.io.read(path, index=":"):
        comment = atoms.info["ipi_comment"]
        step = int(re.search(r"Step:\s*(\d+)", comment).group(1))
        name = re.search(r"(\w+)\{", comment.split("Bead:")[1]).group(1)
        yield step, name, atoms


def ipi_structures(path: Path):
    """{step: Atoms} of an i-PI ``positions`` trajectory written with format='ase' (Angstrom)."""
    frames = {}
    for step, name, atoms in _ipi_trajectory(path):
        assert name == "positions", f"{path}: {name} trajectory"
        frames[step] = atoms
    return frames


def ipi_arrays(path: Path) -> Dict[int, np.ndarray]:
    """{step: (N, 3)} of an i-PI per-atom trajectory (forces, becx, ...) written with format='ase'."""
    frames = {}
    for step, name, atoms in _ipi_trajectory(path):
        if atoms.calc is not None and name in atoms.calc.results:  # ASE moves "forces" to a calculator
            frames[step] = np.asarray(atoms.calc.results[name])
        else:
            frames[step] = np.asarray(atoms.arrays[name])
    return frames


class IPIForceQueue:
    """i-PI's own socket forcefield (``FFSocket`` on an ``InterfaceSocket``), its requests queued and polled here.

    In a simulation i-PI queues the beads of a step one by one while its poll thread dispatches whatever
    is queued, so a batched exchange may hold part of a step padded with copies; :meth:`compute` makes
    that happen on purpose: the structures given to one call go out together, padded by i-PI's code.
    """

    def __init__(self, address: str, batch_size: int):
        from ipi.engine.forcefields import FFSocket
        from ipi.interfaces.sockets import InterfaceSocket

        self.address = address
        # as an <ffsocket mode="unix"> with <batch_size> and the input's default timeout (0: none)
        self.ff = FFSocket(interface=InterfaceSocket(address=address, mode="unix", timeout=0.0, batch_size=batch_size),
                           dopbc=False, threaded=True)  # threaded: queue() leaves polling to us
        self.ff.socket.open()

    def compute(self, cell: np.ndarray, positions: Sequence[np.ndarray], alive=lambda: True, timeout=120.0) -> List:
        """[energy (Hartree), forces, virial, extras] of each structure (ASE cell and positions in Angstrom)."""
        from ipi.engine.atoms import Atoms as IPIAtoms
        from ipi.engine.cell import Cell

        from macefield_client.ipi import BOHR

        requests = []
        for x in positions:
            atoms = IPIAtoms(len(x))
            atoms.q[:] = (np.asarray(x) / BOHR).reshape(-1)
            requests.append(self.ff.queue(atoms, Cell(np.asarray(cell).T / BOHR), reqid=len(requests)))
        end = time.monotonic() + timeout
        while any(r["status"] != "Done" for r in requests):
            if not alive() or time.monotonic() > end:
                raise RuntimeError("the driver left (or timed out) before answering")
            self.ff.poll()
            time.sleep(0.001)
        results = [r["result"] for r in requests]
        for r in requests:
            self.ff.release(r)
        return results

    def close(self) -> None:
        self.ff.socket.close()
        try:
            os.unlink(f"/tmp/ipi_{self.address}")
        except FileNotFoundError:
            pass
