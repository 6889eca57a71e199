"""The project's commands as a user meets them: found through the interpreter under test, quick and quiet to start.

* tests run ``macefield`` & co. through the interpreter under test (its scripts folder, else ``python -m``),
  never through PATH: ``make test PYTHON=venv/bin/python`` must pass without the venv's ``bin`` on PATH, and
  CI runs exactly that command;
* the server-side commands answer ``--help`` without importing torch;
* mace-torch's "cuequivariance ... not available" line is not printed on import or start.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from serving import COMMANDS, project_command

SERVER_COMMANDS = ("macefield-serve", "macefield-health", "macefield-train", "macefield-calibrate",
                   "macefield-convert")


def _blocking_env(tmp_path, *blocked: str) -> dict:
    """An environment whose interpreter cannot import ``blocked`` (as on a machine where they are not installed)."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
        sys.meta_path.insert(0, _Block())
    """))
    path = os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def test_no_test_runs_a_project_command_found_on_path():
    """A process started with a project command's bare name, anywhere in tests/, would run whatever PATH finds."""
    starters = {"run", "Popen", "check_call", "check_output", "call", "run_torch_free"}
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.List)):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0].elts[0] if node.args[0].elts else None
            if name in starters and isinstance(first, ast.Constant) and first.value in COMMANDS:
                offenders.append(f"{path.name}:{node.lineno}: {first.value}")
    assert not offenders, "use serving.project_command(name): " + ", ".join(offenders)


def test_project_commands_run_without_the_interpreters_folder_on_path(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    for name in ("macefield", "macefield-serve"):
        argv = project_command(name)
        assert os.path.isabs(argv[0])  # the interpreter under test or its own scripts folder, not a PATH lookup
        proc = subprocess.run([*argv, "--version"], env=env, capture_output=True, text=True, timeout=120)
        expected = "macefield-client" if name == "macefield" else name
        assert proc.returncode == 0 and proc.stdout.startswith(expected), proc.stderr


def test_ci_runs_the_readme_command_as_written():
    run = (REPO / ".ci" / "run").read_text()
    code = [line for line in run.splitlines() if not line.lstrip().startswith("#")]
    assert not any("PATH=" in line for line in code), "CI must not put the venv on PATH: users do not"
    assert 'make test PYTHON="$VENV/bin/python"' in run
    assert "make test PYTHON=venv/bin/python" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("name", SERVER_COMMANDS)
def test_server_commands_answer_help_without_torch(tmp_path, name):
    env = _blocking_env(tmp_path, "torch")
    proc = subprocess.run([sys.executable, "-m", COMMANDS[name], "--help"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


def test_missing_cuequivariance_is_not_announced_on_import_or_help(tmp_path):
    env = _blocking_env(tmp_path, "cuequivariance", "cuequivariance_torch", "cuequivariance_ops_torch")
    script = ("import logging, macefield_server.engine, macefield_server.serving.registry; "
              "from macefield_server.engine.cueq import cueq_import_error; print('cueq', cueq_import_error() is None)")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cueq False" and "cuequivariance" not in proc.stderr
    helped = subprocess.run([sys.executable, "-m", "macefield_server.cli.serve", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "not available" not in helped.stdout + helped.stderr


def test_every_bench_script_imports():
    """The benchmark scripts are run by hand, months apart: each must at least import against today's code (one
    interpreter imports them all, without running their main)."""
    scripts = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
    assert "short_range" in scripts and "extrapolation_methods" in scripts
    code = ("import importlib, sys\n"
            f"sys.path[:0] = [{str(REPO / 'bench')!r}, {str(REPO / 'tests')!r}]\n"
            f"for name in {scripts!r}:\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
