"""The quickstart's ``make`` targets install once and then only start or test (``make serve`` must not
reinstall the packages on every run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from conftest import REPO


def dry_run(workdir, target, **variables):
    args = ["make", "-n", target, f"PYTHON={sys.executable}"] + [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=60, check=True).stdout


def test_make_installs_once_per_interpreter_and_again_after_a_pyproject_change(tmp_path):
    for name in ("Makefile", "client/pyproject.toml", "server/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert "pip install" in dry_run(tmp_path, "serve")  # a fresh clone installs first
    # install with a pip that does nothing: the stamp records it
    subprocess.run(["make", "install", f"PYTHON={sys.executable}", "PIP=true"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    again = dry_run(tmp_path, "serve")
    assert "pip" not in again and "macefield_server.cli.serve" in again  # the second run only starts the server
    assert "pip install" in dry_run(tmp_path, "test")  # the test extras are another install
    time.sleep(0.01)
    later = time.time() + 2
    os.utime(tmp_path / "server" / "pyproject.toml", (later, later))
    assert "pip install" in dry_run(tmp_path, "serve")  # a changed pyproject.toml installs again


def test_lammps_install_message_says_tests_skip_here_but_ci_requires_them():
    """.ci/run makes a LAMMPS that cannot start a failure; the Makefile's message must not promise a skip there."""
    assert "MACEFIELD_REQUIRE_LAMMPS=1" in (REPO / ".ci" / "run").read_text()
    (line,) = [x for x in (REPO / "Makefile").read_text().splitlines() if "LAMMPS could not be installed" in x]
    assert "skip here" in line and "MACEFIELD_REQUIRE_LAMMPS=1" in line and "fail" in line, line


def test_make_test_runs_whole_files_in_three_workers_unless_told_otherwise():
    """``make test`` (and so CI) runs the suite in three pytest-xdist workers, each test file whole in one worker
    (module-scoped servers and order-dependent tests stay together), the files in collection order (the longest
    first); ``TEST_WORKERS=0`` runs it in one process.  The child pytest runs of tests/test_ci_setup.py must not
    spawn workers: the options are on the command line, not in pytest.ini."""
    (line,) = [x for x in dry_run(REPO, "test").splitlines() if " -m pytest " in x]
    assert " -n 3 --dist loadfile --no-loadscope-reorder tests" in line, line
    (line,) = [x for x in dry_run(REPO, "test", TEST_WORKERS=0).splitlines() if " -m pytest " in x]
    assert " -n 0 --dist loadfile --no-loadscope-reorder tests" in line, line
    ini = (REPO / "pytest.ini").read_text()
    assert not re.search(r"(^|\s)(-n\s*\d|--numprocesses|--dist|-p\s*xdist)", ini), ini
