"""The warm-up memory measurement kept on disk between starts (serving/memory_cache.py).

A key covers weights, module structure, dtype, device, head and the measuring code; a stored entry gives back
exactly the measured coefficients; broken or foreign files are misses, never errors; a real server process
writes the entry at its first start and reads it at the next.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import random_field_model
from serving import ServerProcess, save_tiny_model

from macefield_server.cli.serve import build_config, parse_args
from macefield_server.serving import memory_cache
from macefield_server.serving.config import ConfigError, ServerConfig
from macefield_server.serving.memory_measure import measure
from macefield_server.serving.registry import ServedModel


def served(seed=3, dtype=torch.float64, head=""):
    model = random_field_model(heads=("sio2", "other"), seed=seed).to(dtype)
    return ServedModel(name="m", model=model, default_head=head)


def test_key_follows_what_the_measurement_depends_on():
    base = memory_cache.measurement_key(served())
    assert base == memory_cache.measurement_key(served())  # same weights and structure: same key
    assert base != memory_cache.measurement_key(served(seed=4))  # other weights
    assert base != memory_cache.measurement_key(served(dtype=torch.float32))
    assert base != memory_cache.measurement_key(served(head="other"))
    nudged = served()
    with torch.no_grad():
        next(nudged.model.parameters()).view(-1)[0] += 1e-6
    assert base != memory_cache.measurement_key(nudged)


def test_round_trip_gives_the_measured_coefficients(tmp_path):
    s = served()
    key = memory_cache.measurement_key(s)
    assert memory_cache.load(tmp_path, key) is None  # nothing stored yet: a miss
    measured = measure(s)
    memory_cache.store(tmp_path, key, measured)
    loaded = memory_cache.load(tmp_path, key)
    assert loaded is not None
    assert loaded.per_edge == measured.per_edge and loaded.per_atom == measured.per_atom
    assert loaded.source.endswith("; cached")
    for tier in (0, 1, 2):
        assert loaded.estimate(tier, 5000, 300) == measured.estimate(tier, 5000, 300)
    assert [p.name for p in tmp_path.iterdir()] == [f"memory-{key}.json"]  # no temporary file left behind


def entry(**changes):
    fields = {"format": memory_cache.FORMAT, "key": "K", "per_edge": [1e3, 2e3, 3e3], "per_atom": [0, 0, 0],
              "source": "s"}
    return json.dumps({**fields, **changes})


@pytest.mark.parametrize("content", ["{not json", entry(key="other"), entry(format=999), entry(per_edge=[1, 2]),
                                     entry(per_edge=[-1, 2, 3]), entry(per_atom=[0, -1, 0])])
def test_a_broken_or_foreign_entry_is_a_miss(tmp_path, content):
    assert memory_cache.load(tmp_path, "K") is None
    (tmp_path / "memory-K.json").write_text(entry())
    assert memory_cache.load(tmp_path, "K") is not None  # the well-formed entry is read
    (tmp_path / "memory-K.json").write_text(content)
    assert memory_cache.load(tmp_path, "K") is None


def test_an_unwritable_directory_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be: mkdir fails
    s = served()
    with caplog.at_level(logging.WARNING, logger="macefield.memory"):
        memory_cache.store(blocker / "cache", "K", measure(s))
    assert "cannot write" in caplog.text


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("MACEFIELD_CACHE_DIR", str(tmp_path / "explicit"))
    assert memory_cache.resolve_cache_dir("auto") == tmp_path / "explicit"
    monkeypatch.delenv("MACEFIELD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert memory_cache.resolve_cache_dir("auto") == tmp_path / "xdg" / "macefield"
    assert memory_cache.resolve_cache_dir("") is None
    assert memory_cache.resolve_cache_dir(str(tmp_path / "d")) == tmp_path / "d"
    with pytest.raises(ConfigError, match="cache_dir"):
        ServerConfig(cache_dir=None).validate()  # type: ignore[arg-type]


def test_a_restarted_server_reads_its_measurement(tmp_path):
    checkpoint = save_tiny_model(tmp_path / "tiny.pt")
    cache = tmp_path / "cache"
    logs = []
    for _ in range(2):
        server = ServerProcess(["--model", str(checkpoint), "--cache-dir", str(cache)]).wait_ready()
        server.terminate()
        server.wait(60)
        logs.append(server.stderr())
        entries = sorted(os.listdir(cache))
        assert len(entries) == 1 and entries[0].startswith("memory-"), entries
    first, second = ([line for line in log.splitlines() if "memory per pass" in line] for log in logs)
    assert len(first) == 1 and "cached" not in first[0], logs[0]
    assert len(second) == 1 and "; cached)" in second[0], logs[1]
    def coefficients(line):  # the text between "memory per pass: " and the source in brackets
        return line.split("memory per pass: ")[1].split(" (")[0]

    assert coefficients(first[0]) == coefficients(second[0])
    # `--cache-dir ""` turns the cache off (resolve_cache_dir("") is None: measured at every start)
    assert build_config(parse_args(["--cache-dir", ""])).cache_dir == ""
    assert build_config(parse_args(["--cache-dir", str(cache)])).cache_dir == str(cache)
    assert build_config(parse_args([])).cache_dir == "auto"
