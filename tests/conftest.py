"""Shared fixtures: small random FieldMACE models and test structures (float64)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def random_field_model(
    atomic_numbers=(8, 14),
    heads=("Default",),
    channels: int = 8,
    seed: int = 0,
    field_scale: float = 0.3,
    dtype=torch.float64,
    r_max: float = 4.0,
    max_ell: int = 2,
):
    """A small FieldMACE with non-zero random field weights and per-head E0s."""
    from macefield_server.model import build_field_mace, default_architecture

    rng = np.random.default_rng(seed)
    energies = rng.normal(-5.0, 2.0, size=(len(heads), len(atomic_numbers))).tolist()
    arch = default_architecture(
        atomic_numbers,
        heads=heads,
        channels=channels,
        max_L=1,
        r_max=r_max,
        max_ell=max_ell,
        correlation=2,
        radial_MLP=(16, 16),
        mlp_channels=8,
        avg_num_neighbors=8.0,
        atomic_energies=energies,
    )
    torch.manual_seed(seed)
    model = build_field_mace(arch, dtype=dtype)
    with torch.no_grad():
        for p in list(model.field_linear.parameters()) + list(model.field_feats.parameters()):
            p.normal_(0.0, field_scale)
        # make scale/shift per head distinct so head mix-ups show
        shape = model.scale_shift.scale.shape
        model.scale_shift.scale.copy_(torch.linspace(0.8, 1.2, len(heads), dtype=dtype).reshape(shape))
        model.scale_shift.shift.copy_(torch.linspace(-0.1, 0.1, len(heads), dtype=dtype).reshape(shape))
    return model.eval()


def quartz_like(repeat=(1, 1, 1), rattle: float = 0.05, seed: int = 0):
    """alpha-quartz (P3_121, Si3O6, Si-O 1.605/1.614 A) with a small random displacement."""
    from ase.spacegroup import crystal

    atoms = crystal(
        ["Si", "O"],
        basis=[(0.4697, 0.0, 1.0 / 3.0), (0.4135, 0.2669, 0.1191 + 2.0 / 3.0)],
        spacegroup=152,
        cellpar=[4.916, 4.916, 5.405, 90, 90, 120],
    ) * repeat
    atoms.rattle(rattle, seed=seed)
    return atoms


def water_like():
    """A finite 'molecule' made of O and Si (elements of the test model)."""
    from ase import Atoms

    return Atoms(
        numbers=[8, 14, 14, 8],
        positions=[[0.0, 0.0, 0.0], [1.6, 0.1, 0.0], [-0.5, 1.5, 0.2], [2.2, 1.4, 0.9]],
        pbc=False,
    )


@pytest.fixture(scope="session")
def field_model():
    return random_field_model()


@pytest.fixture(scope="session")
def two_head_model():
    return random_field_model(heads=("sio2", "other"), seed=3)
