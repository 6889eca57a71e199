"""docs/md_engines.md shows every example file of docs/examples unchanged, each one is run by a test,
and its preparation snippet writes the real quartz frame."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
from conftest import REPO
from md_engines import EXAMPLES, quartz_frame

DOC = REPO / "docs" / "md_engines.md"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def shown_examples():
    """{path relative to the repo: the fenced block after its ``<!-- example: path -->`` marker}."""
    text = DOC.read_text()
    found = re.findall(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", text, re.S)
    return {path: block for path, block in found}


def test_every_example_file_is_shown_unchanged_and_run_by_a_test():
    shown = shown_examples()
    files = {str(p.relative_to(REPO)): p for p in EXAMPLE_FILES}
    assert sorted(shown) == sorted(files), (sorted(shown), sorted(files))
    for rel, path in files.items():
        assert shown[rel] == path.read_text(), f"{rel}: the page differs from the file"
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_md_*.py"))
    for path in files.values():
        assert f'"{path.name}"' in tests, f"{path.name}: no test runs it"


def test_preparation_snippet_writes_the_quartz_frame(tmp_path):
    """The page builds its structure in code: it runs on a clone without any data file."""
    import ase.io

    (snippet,) = re.findall(r"```bash\npython - <<'EOF'\n(.*?)EOF\n```", DOC.read_text(), re.S)
    assert "shared/data" not in DOC.read_text()
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reference = quartz_frame(0)
    for name, fmt in (("quartz.xyz", "extxyz"), ("quartz.data", "lammps-data")):
        kwargs = {"atom_style": "atomic"} if fmt == "lammps-data" else {}
        atoms = ase.io.read(tmp_path / name, format=fmt, **kwargs)
        np.testing.assert_allclose(atoms.positions, reference.positions, atol=1e-7)  # lammps-data: 8 decimals
        np.testing.assert_allclose(atoms.cell[:], reference.cell[:], atol=1e-9)
        assert atoms.get_chemical_formula() == "O48Si24"
    data = (tmp_path / "quartz.data").read_text()
    assert re.search(r"^\s*1\s+28\.08", data, re.M) and re.search(r"^\s*2\s+15\.99", data, re.M)  # type 1 Si, 2 O


def test_stated_retry_budget_and_ipi_sum_rule_threshold_are_the_real_ones():
    """The page's numbers for the driver's default patience and i-PI's acoustic-sum-rule check."""
    import pytest

    from macefield_client import RetryPolicy

    text = " ".join(DOC.read_text().split())
    retries, low, high = map(int, re.search(r"the default, (\d+) retries with backoff, waits (\d+)-(\d+) s in all",
                                            text).groups())
    policy = RetryPolicy()
    shortest, longest = policy.budget()
    assert retries == policy.attempts - 1 and low == round(shortest) and high == round(longest), policy.budget()

    driven = pytest.importorskip("ipi.inputs.motion.driven_dynamics", reason="i-PI is not installed")
    default = driven.InputDrivenDynamics.fields["asr_threshold"][1]["default"]
    stated = float(re.search(r"`<asr_threshold>` in `<driven_dynamics>`, default ([0-9.e-]+)\)", text).group(1))
    assert stated == default
