"""Every checkpoint loads and gives the same numbers whether or not cuequivariance is installed.

mace-torch 0.3.16 builds the symmetric-contraction U matrices in another
basis as soon as cuequivariance is importable (model/contraction_basis.py).
Checkpoints are written and evaluated in this process (whatever is installed:
CI installs cuequivariance) and evaluated again in a child process where every
``cuequivariance*`` import fails (tests/checkpoint_worker.py --block-cueq).
With cuequivariance installed here, the mace-torch pickle is written in the
reduced basis, so the child really loads a basis its environment cannot build.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoint_worker import cueq_importable, evaluate_checkpoints
from conftest import REPO, random_field_model
from test_model_checkpoints import plain_mace, save_reference_pickle

from macefield_server.model import build_field_mace, save_model
from macefield_server.model.architecture import describe_architecture

WORKER = REPO / "tests" / "checkpoint_worker.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("checkpoints")
    native = save_model(random_field_model(heads=("sio2", "other"), seed=3), folder / "native.pt")
    base = plain_mace(heads=("a", "b"))
    foundation = folder / "foundation.model"
    torch.save(base, foundation)
    reference = save_reference_pickle(random_field_model(seed=21), folder / "reference.model", monkeypatch)
    monkeypatch.undo()
    specs = [("default", "-"), ("native", str(native)), ("foundation", str(foundation)), ("reference", str(reference))]
    return specs, base


def test_checkpoints_give_the_same_numbers_without_cuequivariance(checkpoints, tmp_path):
    specs, base = checkpoints
    here = evaluate_checkpoints(specs)
    out = tmp_path / "blocked.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(WORKER), "--block-cueq", str(out)] + [f"{n}={p}" for n, p in specs],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    blocked = dict(np.load(out))
    assert not bool(blocked.pop("cueq_importable"))
    assert blocked.keys() == here.keys()
    for key, value in here.items():
        assert np.allclose(blocked[key], value, rtol=1e-13, atol=0), key
    for name, _ in specs:  # every checkpoint answered with the full response
        assert f"{name}/born_charges/0" in here and f"{name}/polarizability/1" in here
    if cueq_importable():  # the pickle really holds the basis the blocked child cannot build
        original = build_field_mace(describe_architecture(base))
        assert u_shapes(base) != u_shapes(original)


def u_shapes(model):
    return [tuple(b.shape) for name, b in model.named_buffers() if ".U_matrix_" in name]
