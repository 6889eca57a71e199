"""``macefield-train`` end to end on a tiny config: checkpoint, card, resume, config errors."""

from __future__ import annotations

import json
import warnings
from typing import Dict

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, SHARED_DATA

from macefield_server.engine import load_model, predict
from macefield_server.training import config_from_dict
from macefield_server.cli.train import main
from macefield_server.training.config import ConfigError, load_config
from macefield_server.engine.graph import Structure
from macefield_server.training.data import load_all, read_frames
from macefield_server.training.short_range import pair_types, shortest_distances

DEFAULT_CONFIG = REPO / "server" / "macefield_server" / "weights" / "default.stage1.yaml"


def tiny_config(tmp_path, **optim):
    """The shipped default config, shrunk: 2 frames per split and dataset, a tiny model."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["model"].update(channels=4, max_ell=1, correlation=2, radial_MLP=[8], mlp_channels=4, r_max=3.5)
    for ds in cfg["datasets"]:
        ds["max_frames"] = 2
        ds["path"] = str(SHARED_DATA / ds["path"].split("/")[-1])
    cfg["optim"].update({"max_epochs": 1, "batch_size": 2, "max_minutes": None, **optim})
    cfg["run"].update(workdir=str(tmp_path / "run"), progress=False)
    cfg["export"].update(path=str(tmp_path / "out" / "tiny.pt"), command=None, card_frames=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("shared_data")  # trains on (or checks) the DFT labels
def test_train_tiny_end_to_end_then_resume(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert main(["--config", str(config), "--no-progress"]) == 0
    out = tmp_path / "out" / "tiny.pt"
    model = load_model(out)
    assert list(model.heads) == ["sio2", "batio3"]
    card = json.loads((tmp_path / "out" / "tiny.card.json").read_text())
    assert model.metadata["card"] == card
    assert set(card["validation"]) == {"sio2-quartz", "batio3"}
    assert card["validation"]["sio2-quartz"]["frames"] == 2
    assert "born_charges_mae_e" in card["validation"]["batio3"]
    assert (tmp_path / "out" / "tiny.card.md").read_text().startswith("# ")
    goals = {(g["dataset"], g["metric"]): g for g in card["goals"]}
    z = goals[("sio2-quartz", "born_charges_mae_e")]
    assert z["value"] == card["validation"]["sio2-quartz"]["born_charges_mae_e"]
    assert z["met"] is (z["value"] <= 0.05)
    assert card["training"]["command"].startswith("macefield-train --config ")
    first = metrics(tmp_path)
    assert [m["epoch"] for m in first] == [1]
    assert {"energy", "forces", "born_charges", "polarizability", "polarization", "stress"} <= set(first[0]["train"])
    # the exported model predicts everything for a training-like frame
    from ase.io import read

    atoms = read(SHARED_DATA / "sio2-quartz-md.xyz", index=0)
    res = predict(model, atoms, heads="sio2", outputs=["born_charges", "polarizability"])[0]
    assert res["born_charges"].shape == (72, 3, 3)

    # resume: a second invocation continues from state.pt at epoch 1
    state_before = (tmp_path / "run" / "state.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--config", str(config), "--no-progress", "--max-epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "after epoch 1" in err
    second = metrics(tmp_path)
    assert [m["epoch"] for m in second] == [1, 2]
    assert second[1]["step"] == 2 * second[0]["step"]
    assert (tmp_path / "run" / "state.pt").stat().st_mtime_ns > state_before
    # nothing left to do: resuming a finished run trains no further epoch
    assert main(["--config", str(config), "--no-progress", "--max-epochs", "2"]) == 0
    assert len(metrics(tmp_path)) == 2
    # --export-only re-exports the best checkpoint; the card keeps the command that started the run
    (tmp_path / "out" / "tiny.pt").unlink()
    assert main(["--config", str(config), "--no-progress", "--export-only"]) == 0
    card = json.loads((tmp_path / "out" / "tiny.card.json").read_text())
    assert card["training"]["command"] == f"macefield-train --config {config} --no-progress"
    assert card["training"]["epochs"] == 2 and card["training"]["stop_reason"] == "max_epochs"
    assert card["training"]["exported"] == "best"
    assert card["training"]["exported_epoch"] == card["training"]["best_epoch"]
    assert len(metrics(tmp_path)) == 2
    # --export-checkpoint last exports last.pt's weights (the latest validated epoch) and the card says so
    assert main(["--config", str(config), "--no-progress", "--export-only", "--export-checkpoint", "last"]) == 0
    card = json.loads((tmp_path / "out" / "tiny.card.json").read_text())
    assert card["training"]["exported"] == "last" and card["training"]["exported_epoch"] == 2
    last, exported = load_model(tmp_path / "run" / "last.pt"), load_model(tmp_path / "out" / "tiny.pt")
    for (ka, va), (kb, vb) in zip(last.state_dict().items(), exported.state_dict().items()):
        assert ka == kb and (va == vb).all(), ka
    assert "the EMA weights after epoch 2, the last validated one" in (tmp_path / "out" / "tiny.card.md").read_text()
    # --refresh-card recomputes the validation block with the same weights and keeps the training facts; a config
    # naming export.command replaces the command the card cites
    before = card
    assert main(["--config", str(config), "--no-progress", "--refresh-card", str(tmp_path / "out" / "tiny.pt")]) == 0
    card = json.loads((tmp_path / "out" / "tiny.card.json").read_text())
    assert card["training"] == before["training"]
    assert card["validation"]["sio2-quartz"]["forces_mae_meV_per_A"] == pytest.approx(
        before["validation"]["sio2-quartz"]["forces_mae_meV_per_A"], rel=1e-5)
    cited = yaml.safe_load(config.read_text())
    cited["export"]["command"] = "macefield-train --config tiny.yaml --workdir /tmp/tiny"
    config.write_text(yaml.safe_dump(cited))
    assert main(["--config", str(config), "--no-progress", "--refresh-card", str(tmp_path / "out" / "tiny.pt")]) == 0
    card = json.loads((tmp_path / "out" / "tiny.card.json").read_text())
    assert card["training"]["command"] == "macefield-train --config tiny.yaml --workdir /tmp/tiny"
    assert card["training"]["epochs"] == before["training"]["epochs"]
    assert load_model(tmp_path / "out" / "tiny.pt").metadata["card"] == card


@pytest.mark.usefixtures("shared_data")  # trains on (or checks) the DFT labels
def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    """1 epoch + resume for a 2nd gives the same weights as 2 epochs in one go."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ca, cb = tiny_config(a), tiny_config(b)
    assert main(["--config", str(ca), "--no-progress", "--max-epochs", "2"]) == 0
    assert main(["--config", str(cb), "--no-progress", "--max-epochs", "1"]) == 0
    assert main(["--config", str(cb), "--no-progress", "--max-epochs", "2"]) == 0
    ma, mb = load_model(a / "run" / "last.pt"), load_model(b / "run" / "last.pt")
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb
        assert (va == vb).all(), ka


def test_console_script_declared_and_help(capsys):
    import tomllib

    project = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["macefield-train"] == "macefield_server.cli.train:main"
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--config" in capsys.readouterr().out


def test_config_errors(tmp_path):
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    bad = json.loads(json.dumps(base))
    bad["optim"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["datasets"][0]["keys"]["dipole"] = "polarization"
    with pytest.raises(ConfigError, match="dipole"):
        config_from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["datasets"][1]["valid"] = [0.8, 1.2]
    with pytest.raises(ConfigError):
        config_from_dict(bad)
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: 0.1}\n")
    assert main(["--config", str(path)]) == 2  # no datasets


@pytest.mark.usefixtures("shared_data")  # trains on (or checks) the DFT labels
def test_shipped_config_parses_and_points_at_the_data():
    from macefield_server.training import load_config

    cfg = load_config(DEFAULT_CONFIG)
    assert [d.head for d in cfg.datasets] == ["sio2", "batio3"]
    for ds in cfg.datasets:
        assert cfg.resolve_path(ds.path).is_file()
        assert ds.train == (0.0, 0.8) and ds.valid == (0.8, 1.0) and ds.max_frames is None


@pytest.mark.usefixtures("shared_data")  # trains on (or checks) the DFT labels
def test_response_every_k_is_an_unbiased_estimate_of_the_full_gradient(tmp_path):
    """With response_every = k, the Z*/alpha terms enter every k-th step with weight k: the
    gradients of k consecutive steps on one batch average to the full-loss gradient, and the
    other steps do not touch the Z*/alpha labels at all."""
    from macefield_server.training.config import load_config
    from macefield_server.training.trainer import Trainer

    k = 3
    cfg = load_config(tiny_config(tmp_path, response_every=k))
    trainer = Trainer(cfg, resume=False)
    chunk = trainer.train_samples[:2]
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grad(loss):
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    steps = []
    for step in range(k):
        trainer.step = step
        loss, terms = trainer.step_loss(chunk)
        assert ("born_charges" in terms) is (step == 0) and ("polarizability" in terms) is (step == 0)
        assert {"energy", "forces", "stress", "polarization"} <= set(terms)
        steps.append(grad(loss))
    cfg_full = load_config(tiny_config(tmp_path))
    trainer.cfg = cfg_full
    full = grad(trainer.step_loss(chunk)[0])
    mean = torch.stack(steps).mean(0)
    assert torch.allclose(mean, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))
    # a cheap step and a full step really differ (the response terms carry gradient)
    assert not torch.allclose(steps[0], steps[1], rtol=1e-3)

    # end to end: one epoch of single-frame steps; each term is averaged over the steps that had it
    assert main(["--config", str(tiny_config(tmp_path, response_every=2, batch_size=1)), "--no-progress"]) == 0
    first = metrics(tmp_path)[0]
    assert first["step"] == 4
    assert {"energy", "forces", "born_charges", "polarizability"} <= set(first["train"])


def test_response_every_must_be_positive(tmp_path):
    cfg = yaml.safe_load(tiny_config(tmp_path, response_every=0).read_text())
    with pytest.raises(ConfigError, match="optim.response_every"):
        config_from_dict(cfg)


@pytest.mark.usefixtures("shared_data")  # trains on (or checks) the DFT labels
def test_pair_repulsion_and_short_range_hinge_fine_tuning_and_resume(tmp_path, capsys):
    """ZBL and the core repulsion added to an init_from model without them (no frame of the data changes); the
    hinge reported in metrics; resume reproduces the run."""
    base = tmp_path / "base"
    base.mkdir()
    assert main(["--config", str(tiny_config(base)), "--no-progress"]) == 0
    start = base / "out" / "tiny.pt"
    assert not hasattr(load_model(start), "pair_repulsion_fn")

    def fine_tune_config(where):
        path = tiny_config(where, lr=1e-3)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"].update(init_from=str(start), pair_repulsion=True, e0s="keep", scale_shift="none",
                            core_repulsion={"width": 0.5})
        cfg["loss"]["short_range"] = {"weight": 1.0, "points": 3, "scans_per_step": 1, "seed": 3,
                                      "valid_step": 0.3}
        path.write_text(yaml.safe_dump(cfg))
        return path

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    capsys.readouterr()
    assert main(["--config", str(fine_tune_config(a)), "--no-progress", "--max-epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "added the ZBL pair repulsion" in err and "moved into the shift" in err
    model = load_model(a / "out" / "tiny.pt")
    assert hasattr(model, "pair_repulsion_fn") and model.arch_config["pair_repulsion"] is True
    # the core's inner distances are the shortest of each pair in the frames the run read (a subset of the file:
    # never below the file's shortest), with a covalent-radius estimate for pairs a head's data lacks
    assert "core repulsion (model.core_repulsion)" in err
    core = model.core_repulsion.spec()
    assert core["width"] == 0.5 and set(core["inner"]) == {"sio2", "batio3"}
    cfg = yaml.safe_load(fine_tune_config(a).read_text())
    read: Dict[str, list] = {}
    for ds in cfg["datasets"]:
        frames = [Structure.from_atoms(x, head=ds["head"]) for x in read_frames(ds["path"])]
        whole = shortest_distances(frames, pair_types(frames[0].numbers))
        for (x, y), d in whole.items():
            assert d - 1e-9 <= core["inner"][ds["head"]][f"{x}-{y}"] < d + 0.3, (ds["head"], x, y)
        read[ds["head"]] = frames
    assert {"Ba-O", "Ti-O", "Ba-Si"} <= set(core["inner"]["sio2"])  # estimated: SiO2 data has no Ba or Ti
    # the card says so (JSON as ListModels returns it, and the markdown)
    card = json.loads((a / "out" / "tiny.card.json").read_text())
    assert card["architecture"]["core_repulsion"] == core and card["architecture"]["pair_repulsion"] is True
    assert "- Core repulsion: below each pair's inner distance" in (a / "out" / "tiny.card.md").read_text()
    # and it changes nothing on the frames the run read: F and forces with and without it are the same
    inside = [s for samples in (d["train"] + d["valid"] for d in load_all(load_config(fine_tune_config(a))).values())
              for s in [x.structure for x in samples]]
    with_core = predict(model.double(), inside, outputs=["energy", "forces"])
    model.set_core_repulsion(None)
    without = predict(model, inside, outputs=["energy", "forces"])
    for x, y in zip(with_core, without):
        assert float(x["energy"]) == pytest.approx(float(y["energy"]), rel=1e-12)
        np.testing.assert_allclose(x["forces"], y["forces"], atol=1e-10)
    rows = metrics(a)
    for row in rows:
        hinge = row["train"]["short_range"]
        assert hinge >= 0.0 and hinge == hinge
        scans = row["valid"]["short_range"]
        names = set(scans["min_energy_rel_start_eV"])
        assert {"sio2-quartz:Si-O", "sio2-quartz:O-O", "batio3:Ti-O", "batio3:Ba-Ti"} <= names
        assert all(abs(v) < 1e6 for v in scans["min_energy_rel_start_eV"].values())  # finite numbers, eV
        assert scans["hinge"] >= 0.0
        # steps where F does not rise although ZBL does, per scan
        assert set(scans["falls"]) == names and all(isinstance(n, int) and n >= 0 for n in scans["falls"].values())
    # one epoch, then a resumed second: the same scans are drawn, the same weights result
    assert main(["--config", str(fine_tune_config(b)), "--no-progress", "--max-epochs", "1"]) == 0
    assert main(["--config", str(fine_tune_config(b)), "--no-progress", "--max-epochs", "2"]) == 0
    assert [r["train"]["short_range"] for r in metrics(b)] == [r["train"]["short_range"] for r in rows]
    ma, mb = load_model(a / "run" / "last.pt"), load_model(b / "run" / "last.pt")
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb and (va == vb).all(), ka

    # fine-tuning with a wider max_ell: widened once (same function at the start), resumed as the wider model
    c = tmp_path / "c"
    c.mkdir()
    wide = fine_tune_config(c)
    cfg = yaml.safe_load(wide.read_text())
    cfg["model"]["widen_max_ell"] = 2
    wide.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    # the tiny model has correlation 2: the last block reads its new l = 2 messages only quadratically
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        assert main(["--config", str(wide), "--no-progress", "--max-epochs", "1"]) == 0
    assert any("['interactions.1: 2e'] never receive a gradient" in str(w.message) for w in caught)
    err = capsys.readouterr().err
    assert "raised max_ell 1 -> 2" in err
    assert main(["--config", str(wide), "--no-progress", "--max-epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "raised max_ell" not in err and "resum" in err.lower()
    assert load_model(c / "out" / "tiny.pt").arch_config["max_ell"] == 2
    assert [r["epoch"] for r in metrics(c)] == [1, 2]
