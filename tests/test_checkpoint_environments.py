"""Every checkpoint loads and gives the same numbers whether or not cuequivariance is installed.

mace-torch 0.3.16 builds the symmetric-contraction U matrices in another
basis as soon as cuequivariance is importable (model/contraction_basis.py).
A stored basis is adopted only if it is a basis of the architecture's own
polynomials (tests at the end).  Checkpoints are written in this process (whatever is installed: CI installs
cuequivariance) and evaluated in two child processes (tests/checkpoint_worker.py): one with what is installed,
one where every ``cuequivariance*`` import fails (--block-cueq).
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
from checkpoint_worker import cueq_importable
from conftest import REPO, quartz_like, random_field_model
from test_model_checkpoints import plain_mace, save_reference_pickle

from macefield_server.engine import CheckpointError, build_field_mace, load_model, predict, save_model
from macefield_server.engine.architecture import describe_architecture

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
    """Each checkpoint evaluated in two fresh processes, one where cuequivariance cannot be imported: the same
    numbers to 1e-13 (bitwise for the float32 default model).  Both sides are fresh processes on purpose: in a
    process that has already run a model many times, TorchScript's profiling executor has optimised e3nn's
    scripted code, whose round-off differs from a first evaluation's."""
    specs, base = checkpoints
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    outs = {flag: tmp_path / f"{flag or 'plain'}.npz" for flag in ("", "--block-cueq")}
    procs = {flag: subprocess.Popen([sys.executable, str(WORKER), *([flag] if flag else []), str(out)]
                                    + [f"{n}={p}" for n, p in specs],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for flag, out in outs.items()}
    try:
        for proc in procs.values():
            _, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    here, blocked = (dict(np.load(out)) for out in outs.values())
    assert bool(here.pop("cueq_importable")) == cueq_importable()
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


# ---------------------------------------------------------------- a stored basis must fit its architecture
#: the contraction of the first product onto 1o: its U_matrix_2 is (3, features, features, basis vectors)
CONTRACTION = "products.0.symmetric_contractions.contractions.1"


def rewritten(tmp_path, edit):
    """A native checkpoint of a small model whose state dict ``edit`` changed; (model, path)."""
    model = random_field_model(seed=7)
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"])
    torch.save(payload, path)
    return model, path


def test_another_basis_of_the_same_polynomials_loads_and_gives_the_same_numbers(tmp_path):
    """U M (one more, dependent basis vector) with weights pinv(M) w: another basis, the same function."""
    generator = torch.Generator().manual_seed(1)

    def edit(state):
        u, w = state[f"{CONTRACTION}.U_matrix_2"], state[f"{CONTRACTION}.weights_max"]
        mix = torch.randn(u.shape[-1], u.shape[-1] + 1, generator=generator, dtype=u.dtype)
        state[f"{CONTRACTION}.U_matrix_2"] = u @ mix
        state[f"{CONTRACTION}.weights_max"] = torch.einsum("jk,ekc->ejc", torch.linalg.pinv(mix), w)

    model, path = rewritten(tmp_path, edit)
    loaded = load_model(path)
    assert loaded.get_buffer(f"{CONTRACTION}.U_matrix_2").shape[-1] == model.get_buffer(
        f"{CONTRACTION}.U_matrix_2").shape[-1] + 1
    atoms = [quartz_like(seed=4)]
    outputs = ["energy", "forces", "born_charges"]
    (a,), (b,) = (predict(m, atoms, electric_fields=[0.1, 0.0, -0.1], outputs=outputs) for m in (model, loaded))
    for key in outputs:
        assert np.allclose(b[key], a[key], rtol=1e-10, atol=1e-12), key


def _wider_features(state):
    u = state[f"{CONTRACTION}.U_matrix_2"]
    state[f"{CONTRACTION}.U_matrix_2"] = torch.zeros(u.shape[0], u.shape[1], u.shape[2] + 1, u.shape[3], dtype=u.dtype)


def _more_weights_than_basis_vectors(state):
    w = state[f"{CONTRACTION}.weights_max"]
    state[f"{CONTRACTION}.weights_max"] = torch.cat([w, w[:, :1]], dim=1)


def _other_polynomials(state):
    u = state[f"{CONTRACTION}.U_matrix_2"]
    state[f"{CONTRACTION}.U_matrix_2"] = torch.randn(u.shape, generator=torch.Generator().manual_seed(2), dtype=u.dtype)


@pytest.mark.parametrize("edit,message", [
    (_wider_features, r"U_matrix_2: shape .* does not fit the architecture's .*only the number of basis vectors"),
    (_more_weights_than_basis_vectors, r"weights_max: shape .* does not fit the architecture and U_matrix_2"),
    (_other_polynomials,
     r"U_matrix_2: the stored coupling tensor spans other polynomials .* contradicts its architecture"),
])
def test_a_checkpoint_contradicting_its_architecture_fails_to_load(tmp_path, edit, message):
    _, path = rewritten(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
