"""Backends as served: configuration, --backend, ListModels and /metrics, and a cueq model over real gRPC."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from conftest import REPO, quartz_like, random_field_model, sio_molecule
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb
from macefield_client.proto.macefield.v1 import macefield_pb2_grpc as rpc
from serving import assert_matches, metric, request_for

from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import BACKENDS, BatchingConfig, ConfigError, ModelConfig, ServerConfig
from macefield_server.engine import ENGINE_OUTPUTS as OUTPUTS, predict, save_model
from macefield_client.contract import GRADE_OUTPUTS
from macefield_server.engine import cueq as cueq_module
from macefield_server.serving.registry import load_configured_model, load_default_model
from macefield_server.cli.serve import build_config, parse_args


def test_backend_names_agree():
    assert BACKENDS == cueq_module.BACKENDS


def test_auto_on_cpu_is_decided_by_the_device_alone(monkeypatch):
    def no_import():
        raise AssertionError("resolve_backend('auto', cpu) must not import cuequivariance")

    monkeypatch.setattr(cueq_module, "cueq_import_error", no_import)
    monkeypatch.setattr(cueq_module, "cueq_kernels_available", no_import)
    assert cueq_module.resolve_backend("auto", torch.device("cpu")) == ("e3nn", "auto: not on CUDA")
    assert cueq_module.resolve_backend(None, "cpu") == ("e3nn", "auto: not on CUDA")
    assert cueq_module.resolve_backend("e3nn", "cuda") == ("e3nn", "asked for")


@pytest.mark.parametrize("import_error,kernels,expected", [
    (None, True, ("cueq", "auto: CUDA with cuEquivariance kernels")),
    (None, False, ("e3nn", "auto: cuequivariance_ops_torch (CUDA kernels) not importable")),
    ("ImportError: no cuequivariance", False, ("e3nn", "auto: cuequivariance-torch not importable "
                                                       "(ImportError: no cuequivariance)")),
])
def test_auto_on_cuda(monkeypatch, import_error, kernels, expected):
    """The CUDA branches of auto and cueq (no GPU needed: only the device's type is read)."""
    monkeypatch.setattr(cueq_module, "cueq_import_error", lambda: import_error)
    monkeypatch.setattr(cueq_module, "cueq_kernels_available", lambda: kernels)
    cuda = torch.device("cuda")
    assert cueq_module.resolve_backend("auto", cuda) == expected
    if import_error is not None:
        with pytest.raises(ValueError, match="backend: cueq needs cuequivariance"):
            cueq_module.resolve_backend("cueq", cuda)
    elif kernels:
        assert cueq_module.resolve_backend("cueq", cuda) == ("cueq", "asked for")
    else:
        backend, reason = cueq_module.resolve_backend("cueq", cuda)
        assert backend == "cueq" and "pure-PyTorch fallback on the GPU" in reason


def test_backend_error_names_the_setting_that_asked(monkeypatch, tmp_path):
    """A configured model: models[i].backend; the embedded default model (no models list): the top-level backend
    (docs/serving.md quotes both)."""
    monkeypatch.setattr(cueq_module, "cueq_import_error", lambda: "ImportError: blocked")
    with pytest.raises(ConfigError) as default:
        load_default_model(backend="cueq")
    assert str(default.value).startswith("backend: cueq needs cuequivariance and cuequivariance-torch")
    path = save_model(random_field_model(), tmp_path / "m.pt")
    with pytest.raises(ConfigError) as configured:
        load_configured_model(ModelConfig(path=str(path), backend="cueq"), where="models[0].")
    assert str(configured.value).startswith("models[0].backend: cueq needs cuequivariance and cuequivariance-torch")
    docs = (REPO / "docs" / "serving.md").read_text()
    assert "`" + str(default.value).split(" (pip install")[0] in docs
    assert "`" + str(configured.value).split(" (pip install")[0].replace("[0]", "[i]") in docs


def test_command_line_backend_applies_to_every_model(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("models: [{path: a.pt, backend: cueq}, {path: b.pt}]\n")
    config = build_config(parse_args(["--config", str(path)]))
    assert config.backend == "auto" and [m.backend for m in config.models] == ["cueq", None]
    config = build_config(parse_args(["--config", str(path), "--backend", "e3nn"]))
    assert config.backend == "e3nn" and [m.backend for m in config.models] == ["e3nn", "e3nn"]
    config = build_config(parse_args(["--model", "x.pt", "--backend", "cueq"]))
    assert config.models == [ModelConfig(path="x.pt", backend="cueq")]


def test_cueq_without_cuequivariance_fails_at_load_naming_the_key(tmp_path):
    """A server asked for cueq where cuequivariance is not installed exits 1 with the reason."""
    path = save_model(random_field_model(), tmp_path / "m.pt")
    code = (
        "import sys; sys.path.insert(0, 'tests'); import checkpoint_worker as w; "
        "sys.meta_path.insert(0, w._BlockCueq()); "
        "from macefield_server.cli.serve import main; "
        f"sys.exit(main(['--port', '0', '--metrics-port', '-1', '--model', {str(path)!r}, '--backend', 'cueq']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "models[0].backend: cueq needs cuequivariance" in done.stderr
    assert "pip install 'macefield-server[cueq]'" in done.stderr


@pytest.mark.skipif(cueq_module.cueq_import_error() is not None, reason="cuequivariance-torch not installed")
def test_cueq_model_served_over_grpc_equals_e3nn(tmp_path):
    """backend: cueq in the config: ListModels and /metrics say so, and the full response equals e3nn's
    (cuEquivariance's pure-PyTorch fallback on CPU; a mixed batch of two structures)."""
    model = random_field_model(heads=("sio2", "other"), seed=5)
    path = save_model(model, tmp_path / "quartz.pt")
    config = ServerConfig(port=0, metrics_port=0, batching=BatchingConfig(max_wait_ms=30_000, max_structures=2),
                          models=[ModelConfig(path=str(path), name="q", backend="cueq"),
                                  ModelConfig(path=str(path), name="plain")])
    cases = [(quartz_like(seed=2), (0.1, 0.0, -0.2), "other"), (sio_molecule(), (0.0, 0.2, 0.1), "sio2")]
    with BackgroundServer(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = rpc.MaceFieldStub(channel)
        infos = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
        assert infos["q"].backend == "cueq" and infos["plain"].backend == "e3nn"  # auto on CPU: e3nn
        assert metric(srv.metrics_port, "macefield_model_info", name="q", backend="cueq") == 1
        assert metric(srv.metrics_port, "macefield_model_info", name="plain", backend="e3nn") == 1
        calls = [stub.Predict.future(request_for(a, field=f, head=h, model="q", request_id=str(i),
                                                 outputs=sorted(OUTPUTS - GRADE_OUTPUTS)),  # not calibrated
                                     timeout=120)
                 for i, (a, f, h) in enumerate(cases)]
        responses = [c.result() for c in calls]
    assert max(r.timing.batch_structures for r in responses) == 2  # computed together
    for (atoms, field, head), response in zip(cases, responses):
        reference = predict(model, atoms, electric_fields=field, heads=head, outputs="all")[0]
        assert np.abs(reference["born_charges"]).max() > 1e-4  # non-zero: the comparison means something
        assert_matches(response, reference, rtol=1e-10, atol=1e-12)
