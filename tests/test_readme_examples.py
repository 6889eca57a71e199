"""The README's in-process example runs as written and prints sane physics."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_in_process_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (example,) = [b for b in blocks if "README in-process example" in b]
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines() if ":" in line}
    eps = [float(x) for x in re.findall(r"[-0-9.e+]+", lines["eps_inf diagonal"].split(":")[1])]
    assert len(eps) == 3 and all(1.0 < e < 4.0 for e in eps)  # an insulator's electronic eps_inf
    assert float(lines["sum rule"].split(":")[1]) < 1e-4  # acoustic sum rule
