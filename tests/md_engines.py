"""Helpers for the MD-engine tests: the real quartz frame, the documented example inputs, i-PI processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from conftest import REPO, SHARED_DATA

QUARTZ_MD = SHARED_DATA / "sio2-quartz-md.xyz"  #: real 72-atom alpha-quartz frames (DFT MD at 300 K)
EXAMPLES = REPO / "docs" / "examples"
DEFAULT_MODEL = REPO / "server" / "macefield_server" / "models" / "default.pt"


def quartz_frame(index: int = 0):
    """Frame ``index`` of the quartz MD data as a plain periodic Atoms (no stored labels)."""
    import ase
    import ase.io

    a = ase.io.read(QUARTZ_MD, index)
    return ase.Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=True)


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
