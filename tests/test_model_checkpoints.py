"""Checkpoints and upgrades: native round trip, pickles behind a trust flag, MACE -> FieldMACE."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import mace.modules.extensions as mace_extensions
import numpy as np
import pytest
import torch
from conftest import quartz_like, random_field_model, sio_molecule
from mace.modules.models import MACE, ScaleShiftMACE

from macefield_server.engine import (
    CheckpointError,
    FieldMACE,
    UntrustedPickleError,
    load_model,
    predict,
    save_model,
    upgrade_to_field,
)
from macefield_server.engine.architecture import describe_architecture, mace_kwargs
from macefield_server.engine.predict import prepare_batch

FIELDS = [np.zeros(3), np.array([0.2, -0.1, 0.05]), np.array([0.0, 0.0, 0.5])]


def plain_mace(cls=ScaleShiftMACE, heads=("Default",), seed=5):
    """A randomly initialised mace-torch model (no field) built like a foundation model."""
    arch = describe_architecture(random_field_model(heads=heads, seed=seed))
    kwargs = mace_kwargs(arch)
    if cls is MACE:
        kwargs.pop("atomic_inter_scale")
        kwargs.pop("atomic_inter_shift")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = cls(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    if hasattr(model, "scale_shift"):
        with torch.no_grad():
            model.scale_shift.scale.fill_(1.3)
            model.scale_shift.shift.fill_(-0.05)
    return model.double().eval()


def mace_reference(base, structures, heads=None):
    """Energy and forces from mace-torch's own forward on the same graphs."""
    for s, h in zip(structures, heads or [None] * len(structures)):
        s.head = h
    batch = prepare_batch(base, structures)
    data = {k: v.clone() for k, v in batch.tensors.items()}
    out = base(data, compute_force=True, training=False)
    return out["energy"].detach().numpy(), out["forces"].detach().numpy()


@pytest.mark.parametrize("cls,heads", [(ScaleShiftMACE, ("Default",)), (ScaleShiftMACE, ("a", "b")),
                                       (MACE, ("Default",))])
def test_upgraded_mace_equals_base_model_at_any_field(cls, heads):
    from macefield_server.engine import Structure

    base = plain_mace(cls, heads)
    upgraded = upgrade_to_field(base)
    assert isinstance(upgraded, FieldMACE)
    atoms = [quartz_like(seed=1), quartz_like(repeat=(1, 1, 2), seed=2), sio_molecule()]
    head_names = [heads[i % len(heads)] for i in range(len(atoms))]
    e_ref, f_ref = mace_reference(base, [Structure.from_atoms(a) for a in atoms], list(head_names))
    sizes = np.cumsum([0] + [len(a) for a in atoms])
    for field in FIELDS:
        out = predict(upgraded, atoms, electric_fields=field, heads=list(head_names), outputs="all")
        for g, r in enumerate(out):
            assert abs(r["energy"] - e_ref[g]) < 1e-12 * max(1.0, abs(e_ref[g]))
            assert np.abs(r["forces"] - f_ref[sizes[g] : sizes[g + 1]]).max() < 1e-12
            assert np.all(r["dipole"] == 0.0)
            assert np.all(r["born_charges"] == 0.0)
            assert np.all(r["polarizability"] == 0.0)
    # the field coupling is not dead: it can learn (field_feats keeps its init)
    assert any(p.abs().sum() > 0 for p in upgraded.field_feats.parameters())


def test_fieldmace_reproduces_mace_forward_energy_when_field_weights_zero():
    """Our enthalpy() must be exactly mace-torch's energy for the same parameters."""
    model = random_field_model(seed=9)
    with torch.no_grad():
        for p in model.field_linear.parameters():
            p.zero_()
    base = plain_mace(ScaleShiftMACE, seed=9)
    # the base's weights into the FieldMACE (it takes their contraction basis, whatever is installed)
    field = {k: v for k, v in model.state_dict().items() if k.startswith("field_")}
    model.load_state_dict({**base.state_dict(), **field}, strict=True)
    from macefield_server.engine import Structure

    atoms = quartz_like(seed=3)
    e_ref, f_ref = mace_reference(base, [Structure.from_atoms(atoms)])
    r = predict(model, atoms, electric_fields=[0.3, 0.3, 0.3], outputs="all")[0]
    assert abs(r["energy"] - e_ref[0]) < 1e-12 * abs(e_ref[0])
    assert np.abs(r["forces"] - f_ref).max() < 1e-12


def assert_same_model(a, b, atoms, field=(0.1, -0.2, 0.3)):
    """Same numbers from both models (the batched second-derivative pass is not bitwise
    reproducible run to run, at the 1e-19 level, so outputs get a tiny tolerance)."""
    ra = predict(a, atoms, electric_fields=field, outputs="all")[0]
    rb = predict(b, atoms, electric_fields=field, outputs="all")[0]
    assert ra.keys() == rb.keys()
    for key in ra:
        assert np.allclose(ra[key], rb[key], rtol=1e-13, atol=1e-15), key


def test_native_round_trip_is_bit_exact(tmp_path, two_head_model):
    path = save_model(two_head_model, tmp_path / "m.pt", metadata={"name": "test", "trained": False})
    loaded = load_model(path)
    assert isinstance(loaded, FieldMACE)
    assert loaded.heads == two_head_model.heads
    sa, sb = two_head_model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert loaded.metadata["name"] == "test"
    assert_same_model(two_head_model, loaded, quartz_like(seed=4))


def test_native_file_holds_no_code(tmp_path, field_model):
    """The native file opens with the restricted unpickler (weights_only=True)."""
    path = save_model(field_model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "macefield-native"
    assert isinstance(payload["architecture"], str)


def test_load_casts_dtype(tmp_path, field_model):
    path = save_model(field_model, tmp_path / "m.pt")
    m32 = load_model(path, dtype="float32")
    assert next(m32.parameters()).dtype == torch.float32
    r = predict(m32, quartz_like(seed=1), electric_fields=[0.1, 0, 0], outputs="all")[0]
    assert r["forces"].dtype == np.float64 and np.all(np.isfinite(r["forces"]))


def test_pickle_needs_trust_flag(tmp_path):
    base = plain_mace()
    path = tmp_path / "foundation.model"
    torch.save(base, path)
    with pytest.raises(UntrustedPickleError, match="trust_pickle"):
        load_model(path)
    upgraded = load_model(path, trust_pickle=True)
    assert isinstance(upgraded, FieldMACE)
    assert_same_model(upgrade_to_field(base), upgraded, quartz_like(seed=6))


def _pickle_under(source, module, class_name, path, monkeypatch, extra_module: bool = False):
    """``source`` pickled as an instance of ``module.class_name`` (a stand-in, removed afterwards: the fork that
    defines it is not installed when the file is loaded)."""
    stand_in = type(class_name, (FieldMACE,), {})
    stand_in.__module__ = module.__name__
    monkeypatch.setattr(module, class_name, stand_in, raising=False)
    fake = source.__class__.__new__(stand_in)
    fake.__dict__.update(source.__dict__)
    del fake.__dict__["arch_config"]  # a reference object carries no description of ours
    if extra_module:  # a layout MACEField does not have: the field enters through another module
        fake._modules = dict(fake._modules)
        fake._modules["field_embedding"] = torch.nn.Linear(3, 8, dtype=torch.float64)
        del fake._modules["field_linear"]
    torch.save(fake, path)
    monkeypatch.delattr(module, class_name)
    with zipfile.ZipFile(path) as archive:
        pickled = b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    assert module.__name__.encode() in pickled and class_name.encode() in pickled
    return path


def save_reference_pickle(source, path, monkeypatch):
    """Pickle ``source`` as the reference fork's ``mace.modules.extensions.MACEField`` object."""
    return _pickle_under(source, mace_extensions, "MACEField", path, monkeypatch)


def test_reference_macefield_pickle_loads_without_the_fork(tmp_path, monkeypatch):
    """A pickle whose class path is mace.modules.extensions.MACEField maps onto FieldMACE."""
    source = random_field_model(seed=21)
    path = _pickle_under(source, mace_extensions, "MACEField", tmp_path / "reference.model", monkeypatch)
    with pytest.raises(UntrustedPickleError):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert type(loaded) is FieldMACE
    assert_same_model(source, loaded, quartz_like(seed=8), field=(0.3, 0.0, -0.2))


def test_legacy_scaleshiftfieldmace_pickle_loads_when_its_layout_matches(tmp_path, monkeypatch):
    import mace.modules.models as mace_models

    source = random_field_model(seed=23)
    path = _pickle_under(source, mace_models, "ScaleShiftFieldMACE", tmp_path / "legacy.model", monkeypatch)
    loaded = load_model(path, trust_pickle=True)
    assert type(loaded) is FieldMACE and loaded.metadata["legacy_class"] == "mace.modules.models.ScaleShiftFieldMACE"
    assert_same_model(source, loaded, quartz_like(seed=9), field=(0.1, -0.2, 0.3))


def test_legacy_pickle_with_another_layout_is_refused_with_what_to_do(tmp_path, monkeypatch):
    import mace.modules.models as mace_models

    path = _pickle_under(random_field_model(seed=24), mace_models, "ScaleShiftFieldMACE",
                         tmp_path / "legacy-other.model", monkeypatch, extra_module=True)
    with pytest.raises(CheckpointError) as info:
        load_model(path, trust_pickle=True)
    message = str(info.value)
    assert "legacy mace.modules.models.ScaleShiftFieldMACE" in message
    assert "field_embedding" in message and "field_linear" in message  # what does not match
    assert "macefield-convert" in message and "MACEField" in message  # what to do
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_checkpoint_gives_one_clear_error(tmp_path, field_model, damage):
    path = save_model(field_model, tmp_path / "m.pt")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_model(path)


def test_state_dict_alone_is_refused(tmp_path, field_model):
    path = tmp_path / "weights.pt"
    torch.save(field_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a MACE-Field checkpoint"):
        load_model(path)


def test_convert_cli(tmp_path):
    base = plain_mace(heads=("x", "y"))
    src = tmp_path / "foundation.model"
    torch.save(base, src)
    dst = tmp_path / "out.pt"
    cli = [sys.executable, "-m", "macefield_server.cli.convert"]
    refused = subprocess.run(cli + [str(src), str(dst)], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "--trust-pickle" in refused.stderr and not dst.exists()
    done = subprocess.run(cli + ["--trust-pickle", str(src), str(dst)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    converted = load_model(dst)
    assert converted.heads == ["x", "y"]
    assert_same_model(upgrade_to_field(base), converted, quartz_like(seed=2))


def test_zbl_pair_repulsion_of_a_checkpoint_is_kept_and_reported(tmp_path):
    """A checkpoint with mace-torch's ZBL pair repulsion keeps it (native round trip, served, reported)."""
    from macefield_server.engine import build_field_mace
    from macefield_server.serving.registry import ServedModel

    arch = describe_architecture(random_field_model(seed=31))
    arch["pair_repulsion"] = True
    torch.manual_seed(31)
    zbl = build_field_mace(arch, dtype=torch.float64).eval()
    without = dict(arch, pair_repulsion=False)
    torch.manual_seed(31)
    bare = build_field_mace(without, dtype=torch.float64).eval()
    bare.load_state_dict({k: v for k, v in zbl.state_dict().items() if k in bare.state_dict()})
    loaded = load_model(save_model(zbl, tmp_path / "zbl.pt"))
    assert hasattr(loaded, "pair_repulsion_fn") and describe_architecture(loaded)["pair_repulsion"]
    assert (ServedModel("zbl", loaded, "").info().pair_repulsion
            and not ServedModel("bare", bare, "").info().pair_repulsion)

    def dimer(r):
        from ase import Atoms

        return Atoms("SiO", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, r]])

    far, near = dimer(3.0), dimer(0.6)
    e = {name: [float(predict(m, [a], outputs=["energy"])[0]["energy"]) for a in (far, near)]
         for name, m in (("zbl", loaded), ("bare", bare))}
    # the same learned part; the ZBL term adds the screened nuclear repulsion, over 10 eV at 0.6 A for Si-O
    assert e["zbl"][0] == pytest.approx(e["bare"][0], abs=1e-9)  # no repulsion beyond the covalent radii
    extra = (e["zbl"][1] - e["zbl"][0]) - (e["bare"][1] - e["bare"][0])
    assert extra > 10.0
    r = predict(loaded, [near], outputs=["forces"])[0]
    assert np.all(np.isfinite(r["forces"])) and r["forces"][1, 2] > 10.0  # pushes O away from Si
