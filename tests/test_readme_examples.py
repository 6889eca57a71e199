"""The README's examples and the client examples run as written against the embedded default model, and what
they print is physically right (a wrong quartz structure would print confident nonsense).

Client-side scripts run torch-free (tests/serving.py ``run_torch_free``) against a real server on loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys


import numpy as np
import pytest
from conftest import REPO
from serving import run_torch_free, torch_free_env


EXAMPLES = REPO / "client" / "examples"


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def printed(stdout: str, label: str):
    """The numbers printed after ``label:`` on its line."""
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(label + ":")]
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:[eE][-+]?\d+)?", line.split(":", 1)[1])]


def comments_of(example: str):
    """{label: the comment after ``print("label: ...)``} of a README block: what the README says it prints."""
    return dict(re.findall(r'print\("([^"]+):.*#\s*(.*)$', example, re.M))


def test_in_process_example_runs_and_prints_quartz_physics():
    example = readme_block("README in-process example")
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert printed(out, "max force")[0] < 0.25  # eV/A
    eps = printed(out, "eps_inf diagonal")
    assert len(eps) == 3 and all(abs(e - 2.4) < 0.05 * 2.4 for e in eps), eps  # the README says 2.39 2.39 2.44
    z = printed(out, "Z*(Si) diagonal")
    assert len(z) == 3 and all(2.95 < x < 3.75 for x in z), z
    rule = printed(out, "sum rule")[0]
    assert rule < 1e-12  # acoustic sum rule: a float32 model, Born charges summed in float64
    assert comments_of(example)["sum rule"].startswith("~1e-15 e")  # what the README says: round-off of float64 sums
    # the numbers the README's comments state are the ones it prints
    comments = comments_of(example)
    assert comments["eps_inf diagonal"].startswith(" ".join(f"{e:.2f}" for e in eps))
    assert comments["Z*(Si) diagonal"].startswith(" ".join(f"{x:.2f}" for x in z))
    assert comments["max force"].startswith(f"{printed(out, 'max force')[0]:.2f} eV/A")


@pytest.fixture(scope="module")
def example_runs(default_served, tmp_path_factory) -> dict:
    """The README's client and asyncio examples as written (the address replaced) and ``nvt_quartz.py --field 0 0
    0.05``, each run once, torch-free and with ``-W always``: {name: (completed process, folder)}."""
    runs = {}
    scripts = {"client": readme_block("README client example"), "asyncio": readme_block("async def main")}
    assert scripts["client"].count("127.0.0.1:50051") == 3  # the comment, Client and the calculator
    for name, example in scripts.items():
        folder = tmp_path_factory.mktemp(name)
        script = folder / f"readme_{name}.py"
        script.write_text(example.replace("127.0.0.1:50051", default_served))
        runs[name] = (run_torch_free([sys.executable, "-W", "always", str(script)], torch_free_env(folder),
                                     timeout=300), folder)
    folder = tmp_path_factory.mktemp("nvt")
    runs["nvt"] = (run_torch_free([sys.executable, "-W", "always", str(EXAMPLES / "nvt_quartz.py"), "--server",
                                   default_served, "--steps", "30", "--log-every", "10", "--field", "0", "0", "0.05",
                                   "--trajectory", str(folder / "nvt.xyz")], torch_free_env(folder), timeout=300),
                   folder)
    return runs


def test_client_example_runs_as_written(example_runs):
    example = readme_block("README client example")
    out = example_runs["client"][0].stdout
    assert "heads: ['sio2', 'batio3']" in out
    eps = printed(out, "eps_inf diagonal")
    assert len(eps) == 3 and all(abs(e - 2.4) < 0.05 * 2.4 for e in eps), eps
    z = printed(out, "Z*(Si) trace/3")[0]
    assert 3.0 < z < 3.7
    temperature = printed(out, "T after 20 fs")[0]
    assert 60.0 < temperature < 300.0  # a stable crystal: from the lattice at 300 K, about half goes to potential
    comments = comments_of(example)
    assert comments["eps_inf diagonal"].startswith(" ".join(f"{e:.2f}" for e in eps))
    assert comments["Z*(Si) trace/3"].startswith(f"{z:.2f} e")


def test_nvt_example_keeps_quartz_at_temperature(example_runs):
    done, folder = example_runs["nvt"]
    rows = [line.split() for line in done.stdout.splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [0, 10, 20, 30]
    temperatures = [float(r[2]) for r in rows]
    assert all(50.0 < t < 600.0 for t in temperatures), temperatures  # the wrong quartz heated to 5000 K
    import ase.io

    frames = ase.io.read(folder / "nvt.xyz", index=":")
    assert len(frames) == 4 and len(frames[0]) == 72


def test_pe_sweep_example_gives_quartz_susceptibilities(default_served, tmp_path):
    table = tmp_path / "pe.csv"
    out = run_torch_free([sys.executable, str(EXAMPLES / "pe_sweep.py"), "--server", default_served, "--points", "3",
                          "--emax", "0.1", "--csv", str(table)], torch_free_env(tmp_path), timeout=300).stdout
    lines = table.read_text().splitlines()
    assert lines[0].startswith("E,Px,Py,Pz") and [float(x.split(",")[0]) for x in lines[1:]] == [0.0, 0.05, 0.1]
    chi0, chi_inf = (float(x) for x in re.findall(r"chi_0 = ([\d.]+).*chi_inf\(E=0\) = ([\d.]+)", out)[0])
    # quartz along c: eps_inf ~2.45 (DFT), static eps_0 ~4.6 (experiment): chi_inf ~1.45, chi_0 ~3.6
    assert 1.3 < chi_inf < 1.6 and 2.8 < chi0 < 4.5 and chi0 > chi_inf


def test_examples_loop_mode_and_csv(default_served, tmp_path):
    """The P-E loop path (0 -> +E -> -E -> 0) of the sweep example."""
    table = tmp_path / "loop.csv"
    run_torch_free([sys.executable, str(EXAMPLES / "pe_sweep.py"), "--server", default_served, "--points", "2",
                    "--emax", "0.1", "--loop", "--max-steps", "3", "--csv", str(table)], torch_free_env(tmp_path))
    assert [float(line.split(",")[0]) for line in table.read_text().splitlines()[1:]] == [0.0, 0.1, 0.0, -0.1, 0.0]


def test_readme_output_table_names_are_all_requestable():
    from macefield_client.results import OUTPUTS

    table = (REPO / "README.md").read_text().split("| output | definition |")[1].split("\n\n")[0]
    names = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(names) == sorted(OUTPUTS)


def test_info_shows_the_model_card_summary(default_served, tmp_path):
    out = run_torch_free([sys.executable, "-m", "macefield_client.cli", "info", "--server", default_served],
                         torch_free_env(tmp_path)).stdout
    card = json.loads((REPO / "server" / "macefield_server" / "weights" / "default.card.json").read_text())
    assert "model macefield-default (default)" in out and "ZBL repulsion: yes" in out
    assert "valid for:" in out and "alpha-quartz" in out
    assert "short range:" in out and "ZBL pair repulsion" in out
    assert "validation sio2-quartz (head sio2), 32 held-out frames:" in out
    assert "validation batio3 (head batio3), 9 held-out frames:" in out
    sio2 = card["validation"]["sio2-quartz"]  # the table prints the card's numbers with 4 significant digits
    assert re.search(r"forces MAE\s+" + re.escape(f"{sio2['forces_mae_meV_per_A']:.4g}") + r"\s+meV/A", out)
    assert re.search(r"Z\* MAE\s+" + re.escape(f"{sio2['born_charges_mae_e']:.4g}") + r"\s+e", out)


def test_readme_examples_run_without_warnings(example_runs):
    """The README's client and asyncio examples and ``nvt_quartz.py --field 0 0 0.05`` (perfect or thermal quartz,
    the head's own chemistry, a small field) print no warning: a warning there teaches users to ignore them.

    The extrapolation grade must not grow with the applied field for this to hold (the README's field of
    0.05 V/A once graded perfect quartz 3.7)."""
    assert set(example_runs) == {"client", "asyncio", "nvt"}
    for name, (proc, _) in example_runs.items():
        assert "Warning" not in proc.stderr and "extrapolat" not in proc.stderr.lower(), (name, proc.stderr)
        assert "extrapolation grade" not in proc.stdout, (name, proc.stdout)


def readme_command_and_output(marker: str) -> tuple[list[str], list[str]]:
    """The README's ``bash`` command line marked ``marker`` (its words, the comment cut) and the lines of the
    ``text`` block that follows it: what the README says the command prints."""
    text = (REPO / "README.md").read_text()
    (match,) = re.finditer(r"```bash\n([^\n]*" + re.escape(marker) + r"[^\n]*)\n```.*?```text\n(.*?)```", text, re.S)
    command = match.group(1).split("#", 1)[0].split()
    return command, [ln for ln in match.group(2).splitlines() if ln.strip()]


def assert_printed_as_in_readme(stdout: str, lines: list[str], rel: float, abs_: float) -> None:
    """Every README line is printed: the same words, and numbers within ``rel`` (relative) or ``abs_``; a README
    line cut with "..." is compared up to the cut."""
    for line in lines:
        label = line.split(":", 1)[0]
        (out,) = [ln for ln in stdout.splitlines() if ln.startswith(label + ":")]
        want = line.split(":", 1)[1].replace("...", "").replace(",", " ").replace("(", " ").replace(")", " ").split()
        got = out.split(":", 1)[1].replace(",", " ").replace("(", " ").replace(")", " ").split()[:len(want)]
        assert len(got) == len(want), (line, out)
        for w, g in zip(want, got):
            try:
                expected = float(w)
            except ValueError:
                assert g == w, (line, out)
                continue
            assert float(g) == pytest.approx(expected, rel=rel, abs=abs_), (line, out)


def _run_readme_command(command: list[str], default_served: str, tmp_path, **replace) -> str:
    assert command[0] == "macefield"
    args = [replace.get(word, word) for word in command[1:]]
    done = run_torch_free([sys.executable, "-m", "macefield_client.cli", *args, "--server", default_served],
                          torch_free_env(tmp_path), timeout=600, cwd=tmp_path)
    return done.stdout


def test_readme_workflow_phonons_prints_the_readme_numbers(default_served, tmp_path):
    """``macefield phonons alpha-quartz --relax``: the README's IR and Raman lines and eps tensors, to 1 %
    (0.002 absolute for small numbers): float32 round-off of a relaxation and a diagonalisation, nothing more."""
    command, lines = readme_command_and_output("README workflows: phonons")
    stdout = _run_readme_command(command, default_served, tmp_path)
    assert len(lines) == 4
    assert_printed_as_in_readme(stdout, lines, rel=0.01, abs_=0.002)
    assert (tmp_path / "quartz.json").is_file()


def test_readme_workflow_loop_prints_the_readme_numbers(default_served, tmp_path):
    """``macefield hysteresis batio3`` (0 K damped dynamics of the 135-atom cell under a cosine field along z,
    E0 = 0.3636 V/A, the paper's amplitude, in a 0.5 ps period: a fast loop, not the quasi-static one): the
    README's Pr, Ec and Ps to 5 % (dynamics through a switching event amplify float32 round-off, which differs
    with the number of threads), and P follows E through both signs with no jump of a polarization quantum."""
    from macefield_client.structures import perovskite_batio3

    command, lines = readme_command_and_output("README workflows: loop")
    stdout = _run_readme_command(command, default_served, tmp_path)
    assert len(lines) == 3
    assert_printed_as_in_readme(stdout, lines, rel=0.05, abs_=0.5)
    loop = json.loads((tmp_path / "loop.json").read_text())
    p, e = np.array(loop["polarization"]), np.array(loop["field"])
    assert loop["settings"]["record_every"] == 1 and e[0] == pytest.approx(36.36)
    assert e.min() == pytest.approx(-36.36, rel=1e-3)
    # switching: P negative around the field minimum, positive again at the end (the built-in cell is
    # centrosymmetric: P starts near zero and rises with the field, the virgin curve)
    at_min = np.abs(np.arange(len(e)) - np.argmin(e)) <= 5
    assert np.all(p[at_min] < -20) and p[-1] > 20
    assert loop["coercive_field_plus_MV_cm"] > 0 > loop["coercive_field_minus_MV_cm"]
    # continuous: the quantum of this cell along z is e c / Omega = 1602 / (a b) uC/cm^2 (11 for the 3x3x3
    # cell); P changes by up to ~5 uC/cm^2 per 2 fs step while it switches, smoothly: a wrong branch would be
    # a spike of a quantum in the second difference
    cell = perovskite_batio3(repeat=(3, 3, 3)).cell
    quantum = 1602.176634 / (cell[0, 0] * cell[1, 1])
    assert np.abs(np.diff(p, 2)).max() < quantum / 4
