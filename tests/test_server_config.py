"""Configuration files and command line, and which model a server serves by default."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_field_model

from macefield_server.serving import registry as registry_module
from macefield_server.batch_limits import AUTO_LIMITS
from macefield_server.serving.config import (BatchingConfig, ConfigError, LimitsConfig, ModelConfig, ServerConfig,
                                             load_config)
from macefield_server.engine import save_model
from macefield_server.cli.serve import build_config, parse_args

YAML = """
host: 0.0.0.0
port: 6000
metrics_port: -1
grace_s: 12.5
models:
  - {name: a, path: a.pt, dtype: float32, device: cpu, default_head: sio2}
  - {path: b.model, trust_pickle: true}
batching: {max_structures: 8, max_atoms: 500, max_edges: 9000, max_wait_ms: 3, max_queue: 50}
limits: {max_atoms_per_structure: 300, max_field: 0.2}
"""

TOML = """
host = "0.0.0.0"
port = 6000
metrics_port = -1
grace_s = 12.5

[[models]]
name = "a"
path = "a.pt"
dtype = "float32"
device = "cpu"
default_head = "sio2"

[[models]]
path = "b.model"
trust_pickle = true

[batching]
max_structures = 8
max_atoms = 500
max_edges = 9000
max_wait_ms = 3
max_queue = 50

[limits]
max_atoms_per_structure = 300
max_field = 0.2
"""

EXPECTED = ServerConfig(
    host="0.0.0.0",
    port=6000,
    metrics_port=-1,
    grace_s=12.5,
    models=[
        ModelConfig(path="a.pt", name="a", dtype="float32", device="cpu", default_head="sio2"),
        ModelConfig(path="b.model", trust_pickle=True),
    ],
    batching=BatchingConfig(max_structures=8, max_atoms=500, max_edges=9000, max_wait_ms=3, max_queue=50),
    limits=LimitsConfig(max_atoms_per_structure=300, max_field=0.2),
)


@pytest.mark.parametrize("suffix,text", [(".yaml", YAML), (".toml", TOML)], ids=["yaml", "toml"])
def test_yaml_and_toml_give_the_same_config(tmp_path, suffix, text):
    path = tmp_path / f"serve{suffix}"
    path.write_text(text)
    assert load_config(path) == EXPECTED


@pytest.mark.parametrize(
    "text,key",
    [
        ("batching: {max_wait: 3}", "batching.max_wait"),
        ("colour: blue", "colour"),
        ("batching: {max_queue: 0}", "batching.max_queue"),
        ("limits: {max_field: -1}", "limits.max_field"),
        ("models: [{name: x}]", "models[0].path"),
        ("models: [{path: a.pt, dtype: float16}]", "models[0].dtype"),
        ("models: [{path: a.pt, backend: jax}]", "models[0].backend"),
        ("backend: tensorflow", "backend"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(YAML)
    args = parse_args(["--config", str(path), "--port", "0", "--model", "x=one.pt", "--model", "two.model",
                       "--trust-pickle", "--dtype", "float64", "--insecure"])  # 0.0.0.0 in plaintext: explicit
    config = build_config(args)
    assert config.port == 0 and config.host == "0.0.0.0" and config.batching.max_queue == 50
    assert config.security.insecure
    assert config.models == [
        ModelConfig(path="one.pt", name="x", dtype="float64", trust_pickle=True),
        ModelConfig(path="two.model", name=None, dtype="float64", trust_pickle=True),
    ]


def test_builtin_default_is_declared_untrained(monkeypatch, tmp_path):
    monkeypatch.setattr(registry_module, "DEFAULT_MODEL", tmp_path / "absent.pt")
    served = registry_module.load_default_model()
    info = served.info()
    assert info.trained is False and info.source == "built-in" and "UNTRAINED" in info.description
    assert info.heads == ["sio2", "batio3"] and info.is_default
    assert set(info.atomic_numbers) >= {8, 14, 22, 56}
    again = registry_module.builtin_default_model()  # fixed seed: the same model every time
    for p, q in zip(served.model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_shipped_default_checkpoint_and_card_are_picked_up(monkeypatch, tmp_path):
    path = save_model(random_field_model(heads=("sio2", "batio3")), tmp_path / "default.pt")
    card = {"name": "macefield-default-v1", "description": "trained on quartz and BaTiO3", "default_head": "batio3"}
    (tmp_path / "default.card.json").write_text(json.dumps(card))
    monkeypatch.setattr(registry_module, "DEFAULT_MODEL", path)
    monkeypatch.setattr(registry_module, "DEFAULT_CARD", tmp_path / "default.card.json")
    served = registry_module.load_default_model()
    info = served.info()
    assert info.name == "macefield-default-v1" and info.trained is True
    assert info.default_head == "batio3" and info.source == str(path)
    assert json.loads(info.card_json) == card


def test_configured_model_card_and_name(tmp_path):
    path = save_model(random_field_model(), tmp_path / "quartz.pt")
    served = registry_module.load_configured_model(ModelConfig(path=str(path)))
    assert served.name == "quartz" and served.card_json == "" and served.trained
    (tmp_path / "quartz.card.json").write_text(json.dumps({"name": "q", "trained": False}))
    served = registry_module.load_configured_model(ModelConfig(path=str(path), name="mine"))
    assert served.name == "mine" and served.trained is False


def test_auto_batch_limits_depend_on_the_device(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("batching: {max_atoms: auto, max_edges: 5000}")
    batching = load_config(path).batching
    assert batching.max_atoms is None
    assert batching.limits_for("cpu") == (AUTO_LIMITS["cpu"][0], 5000)
    assert batching.limits_for("cuda") == (AUTO_LIMITS["cuda"][0], 5000)
    assert BatchingConfig().limits_for("cuda") == AUTO_LIMITS["cuda"]


def test_allocator_tuning_is_on_by_default_and_can_be_turned_off(tmp_path):
    assert ServerConfig().tune_cpu_allocator is True
    path = tmp_path / "serve.yaml"
    path.write_text("tune_cpu_allocator: false\n")
    assert load_config(path).tune_cpu_allocator is False
