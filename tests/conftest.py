"""Shared fixtures: small random FieldMACE models and test structures (float64)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from macefield_client.structures import alpha_quartz, sio_molecule  # noqa: E402,F401

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
#: the DFT data (``$MACEFIELD_SHARED_DATA`` overrides the location)
SHARED_DATA = Path(os.environ.get("MACEFIELD_SHARED_DATA") or REPO.parent / "shared" / "data")
#: the DFT data files tests read (never in the repository); only tests that need DFT labels use them
DATA_FILES = ("sio2-quartz-md.xyz", "batio3-md.xyz")
#: set to 1 (``.ci/run`` does) to make a missing ../shared/data a failure instead of a skip
REQUIRE_DATA_ENV = "MACEFIELD_REQUIRE_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip with one reason when it is absent (a user's clone), and fail
    when ``$MACEFIELD_REQUIRE_DATA=1`` (CI, which has the data and must run them)."""
    missing = [name for name in DATA_FILES if not (SHARED_DATA / name).is_file()]
    if missing:
        reason = (f"needs DFT reference labels that are not part of the repository: {', '.join(missing)} (the public "
                  f"data of arXiv:2508.17870) in {SHARED_DATA}, or $MACEFIELD_SHARED_DATA naming their folder")
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{reason}, and ${REQUIRE_DATA_ENV}=1 requires it")
        pytest.skip(reason)
    return SHARED_DATA


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
    from macefield_server.engine import build_field_mace, default_architecture

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
    """alpha-quartz (experimental cell, Si3O6 per cell; tests/test_structures.py checks it) with a small random displacement."""
    return alpha_quartz(repeat=repeat, rattle=rattle, seed=seed)


@pytest.fixture(scope="session")
def field_model():
    return random_field_model()


@pytest.fixture(scope="session")
def two_head_model():
    return random_field_model(heads=("sio2", "other"), seed=3)
