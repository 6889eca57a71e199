"""Shared fixtures: small random FieldMACE models and test structures (float64)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# servers started by the tests keep their memory measurements here, not in the user's ~/.cache (removed at exit)
if "MACEFIELD_CACHE_DIR" not in os.environ:
    os.environ["MACEFIELD_CACHE_DIR"] = tempfile.mkdtemp(prefix="macefield-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MACEFIELD_CACHE_DIR"], ignore_errors=True)

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


# ------------------------------------------------------------------------------------------------- test tiers
#: every test file's tier (the markers are declared in pytest.ini; ``make test-fast`` runs ``-m unit``):
#:
#: * ``unit``: in-process, no server (no gRPC server, no server process), fast: the whole tier stays well
#:   under 90 s on a loaded 2-CPU machine, so a file whose tests take tens of seconds goes to integration
#:   even when it starts no server;
#: * ``integration``: a real server on loopback (in-process ``BackgroundServer`` or a child process), or
#:   slow in-process work (model conversion, training, child worker processes);
#: * ``system``: processes stopped or killed on purpose, replicas and proxies, containers and Kubernetes or
#:   Slurm files, i-PI, LAMMPS, the GPU suite.
#:
#: A test file missing here stops the run (pytest.UsageError): give a new file its tier.
TIERS = {
    "unit": (
        "test_batcher_unit.py",  # Batcher over a fake backend, injected clock
        "test_core_repulsion.py",  # the learned part handed over to ZBL below the inner distances (small models)
        "test_dispatcher_unit.py",  # admission and neighbour-list budget, fake backend
        "test_request_parsing.py",  # parse_request against a tiny model's registry (never evaluated)
        "test_status_mapping.py",  # exceptions -> gRPC status codes, Predict with a fake call context
        "test_md_docs.py",
        "test_makefile.py",
        "test_model_physics.py",
        "test_neighbour_lists.py",
        "test_precision.py",
        "test_proto_stubs.py",
        "test_response_encoding.py",  # PredictResponse from numpy arrays against protobuf's field-by-field API
        "test_server_config.py",
        "test_structures.py",
        "test_training_losses.py",
        "test_training_short_range.py",  # hinge, synthetic pair scans, ZBL against its formula (small models)
        "test_training_widen.py",  # max_ell raised with the function kept (the shipped model, small cells)
        "test_workflows_spectra.py",  # spectra and fluctuation eps_0 of synthetic series (numpy)
    ),
    "integration": (
        "test_checkpoint_environments.py",  # no server, but two child processes evaluating checkpoints (~1 min)
        "test_ci_setup.py",  # child pytest runs
        "test_client.py",
        "test_client_connect.py",
        "test_client_core.py",
        "test_cli_frames.py",  # macefield predict/eval against a real server: fields from files, trust summary
        "test_command_lines.py",  # the project's commands found through the interpreter under test
        "test_head_choice.py",  # the head chosen from the elements, refusals of unseen elements
        "test_workflows_harmonic.py",  # phonons of quartz through a real server
        "test_workflows_md.py",  # ensemble MD through a real server (small model); hysteresis of a DFT frame file
        "test_workflows_md_cli.py",  # macefield md / spectrum STRUCTURE: quartz IR bands at the harmonic modes
        "test_workflows_eps_md.py",  # fluctuation eps_0 of a 20 K quartz ensemble = the harmonic eps_0
        "test_cueq_backend.py",  # no server, but ~30 s of model conversions
        "test_default_model.py",
        "test_eval_cli.py",
        "test_extrapolation.py",
        "test_hardening.py",
        "test_limits_fuzz.py",
        "test_memory_budget.py",
        "test_memory_cache.py",  # the warm-up memory measurement kept between two starts of a real server
        "test_model_checkpoints.py",  # no server, but ~1 min of checkpoint conversions (CLI child processes)
        "test_readme_examples.py",
        "test_security.py",
        "test_server_backends.py",
        "test_server_concurrency.py",
        "test_server_flow.py",
        "test_server_validation.py",
        "test_prep_processes.py",  # neighbour lists in worker processes vs threads, a killed worker
        "test_short_distances.py",
        "test_short_range.py",  # the default model along 7 pair scans in float64 (~30 s)
        "test_training_cli.py",  # trains small models
    ),
    "system": (
        "test_client_restart.py",  # the server killed and restarted under a client
        "test_workflows_md_failure.py",  # macefield md writes its records when its server is killed mid-run
        "test_deploy_files.py",  # Dockerfile, compose, container smoke test
        "test_faults.py",  # injected faults, servers killed
        "test_gpu_suite.py",  # bench/gpu_suite.py --smoke with its servers
        "test_k8s_manifests.py",
        "test_md_ipi.py",
        "test_md_lammps.py",
        "test_scale_out.py",  # replicas and a proxy
        "test_server_process.py",  # SIGTERM drain of a real process
        "test_server_stop.py",  # stopping a real process
        "test_slurm_example.py",
    ),
}
_TIER_OF = {name: tier for tier, names in TIERS.items() for name in names}


#: the test files that take longest (a few minutes each on two cores), run first: ``make test``'s workers
#: (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``) take files in collection order, and a long file
#: started last would leave one worker running it alone at the end
SLOW_FIRST = ("test_short_range.py", "test_scale_out.py", "test_gpu_suite.py", "test_workflows_eps_md.py",
              "test_readme_examples.py", "test_workflows_md_cli.py", "test_training_cli.py", "test_md_ipi.py",
              "test_extrapolation.py", "test_faults.py", "test_client_restart.py", "test_server_stop.py")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its file's tier (:data:`TIERS`); a test file without one stops the run.  Then the
    files of :data:`SLOW_FIRST` go first, in that order (the order within a file is kept)."""
    untiered = set()
    for item in items:
        name = item.path.name
        tier = _TIER_OF.get(name)
        if tier is None:
            untiered.add(name)
        else:
            item.add_marker(getattr(pytest.mark, tier))
    if untiered:
        raise pytest.UsageError(
            f"test file(s) {sorted(untiered)} have no tier: add each to TIERS in tests/conftest.py "
            "(unit, integration or system; see the comment there)")
    unknown = set(SLOW_FIRST) - set(_TIER_OF)
    if unknown:
        raise pytest.UsageError(f"SLOW_FIRST in tests/conftest.py names no test file: {sorted(unknown)}")
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise


def _reset_torch_process_state() -> None:
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    if not torch._C._get_graph_executor_optimize():  # pylint: disable=protected-access
        torch._C._set_graph_executor_optimize(True)  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def _torch_process_state():
    """Every test starts and ends with one torch thread and TorchScript's optimising executor on (main thread),
    as the test process began: in-process training (``Trainer``) sets ``run.threads`` for the process and
    ``run.jit_optimize`` for its thread, and a float32 model's round-off changes with the thread count, which
    would make later tests in the same process depend on which tests ran before them."""
    _reset_torch_process_state()
    yield
    _reset_torch_process_state()


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (``ServedModel``: the model and its card), loaded once per test process."""
    from macefield_server.serving.registry import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def default_server(default_model):
    """One in-process server (``BackgroundServer``, default configuration, metrics on a free port) on the embedded
    default model for the whole test process: loading and warming up the model once, not once per module.
    Tests that use it compare its metrics only as differences."""
    from macefield_server.serving.background import BackgroundServer
    from macefield_server.serving.config import ServerConfig

    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0)
    with BackgroundServer(config, [default_model]) as srv:
        yield srv


@pytest.fixture(scope="session")
def default_served(default_server) -> str:
    """The address ``127.0.0.1:PORT`` of :func:`default_server`."""
    return f"127.0.0.1:{default_server.port}"


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


def md_test_model(field_scale: float = 0.3):
    """The small model the MD tests run: ``random_field_model`` (float64, 8 channels, r_max 4 A, O and Si, heads
    sio2 and other, seed 3) with mace-torch's ZBL pair repulsion, since its weak random surface alone lets 300 K
    atoms collide within ~100 fs.  ``field_scale`` is the standard deviation of the random field weights."""
    from macefield_server.engine.architecture import add_pair_repulsion

    return add_pair_repulsion(random_field_model(heads=("sio2", "other"), seed=3, field_scale=field_scale))


def grade_round_off(model_a, model_b, structures_a, structures_b):
    """How far round-off in the field-free features lets the grade move between two evaluations of the same atoms.

    ``structures_b`` (``Structure``, heads set) are ``structures_a`` seen
    differently (rotated, or by another backend's ``model_b``), atom for
    atom.  Returns ``(bound, feature_error)``:
    per atom, the statistics' Lipschitz constant times the norm of the
    features' difference (an upper bound on the grades' difference), and the
    largest difference of an atom's features relative to their norm.
    """
    from macefield_server.engine.extrapolation import latent_features, statistics_of
    from macefield_server.engine.predict import prepare_batch

    graphs = [prepare_batch(m, s).tensors for m, s in ((model_a, structures_a), (model_b, structures_b))]
    x_a, x_b = (latent_features(m, g).double() for m, g in zip((model_a, model_b), graphs))
    difference = torch.linalg.vector_norm(x_b - x_a, dim=1)
    graph = graphs[0]
    steepest = statistics_of(model_a).lipschitz(model_a, graph["node_attrs"], graph["head"][graph["batch"]])
    feature_error = float((difference / torch.linalg.vector_norm(x_a, dim=1).clamp(min=1e-300)).max())
    return (steepest * difference).numpy(), feature_error


def quartz_like(repeat=(1, 1, 1), rattle: float = 0.05, seed: int = 0):
    """alpha-quartz (experimental cell, Si3O6 per cell; tests/test_structures.py checks it) with a small random
    displacement."""
    return alpha_quartz(repeat=repeat, rattle=rattle, seed=seed)


@pytest.fixture(scope="session")
def field_model():
    return random_field_model()


@pytest.fixture(scope="session")
def two_head_model():
    return random_field_model(heads=("sio2", "other"), seed=3)
