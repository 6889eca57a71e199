"""The thin client against a real server on loopback: Client, AsyncClient, ASE calculator, CLI, examples.

Reference numbers come from direct in-process evaluation of an identical
model (``macefield_server.engine.predict``).  Every subprocess (the
``macefield`` command, the examples, the torch-free check) runs with a
``sitecustomize`` that makes ``import torch`` (and macefield_server, e3nn,
mace) fail, so they also prove the client needs no torch.
"""

from __future__ import annotations

import ast
import asyncio
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from conftest import REPO, quartz_like, random_field_model, sio_molecule
from serving import project_command, run_torch_free, torch_free_env

from macefield_client import (
    AsyncClient,
    Client,
    InvalidRequest,
    RetryPolicy,
    ServerUnavailable,
)
from macefield_client.ase import MACEFieldCalculator
from macefield_client.results import DEFAULT_OUTPUTS
from macefield_server.serving.background import BackgroundServer
from macefield_server.serving.config import ServerConfig
from macefield_server.engine import predict
from macefield_server.serving.registry import ServedModel

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


CLIENT_DIR = REPO / "client"
FIELD = np.array([0.01, -0.02, 0.05])
#: the `macefield` command of the interpreter under test
MACEFIELD = project_command("macefield")
RTOL, ATOL = 1e-9, 1e-10

def same_model():
    """The served model and an identical one for direct evaluation (same seed: same weights)."""
    return random_field_model(heads=("sio2", "other"), seed=3)


@pytest.fixture(scope="module")
def served():
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    with BackgroundServer(config, [ServedModel("tiny", same_model(), "sio2")]) as srv:
        yield f"127.0.0.1:{srv.port}"


@pytest.fixture(scope="module")
def model():
    return same_model()


@pytest.fixture(scope="module")
def client(served):
    with Client(served, timeout=60) as c:
        yield c


@pytest.fixture
def torch_free(tmp_path):
    """Environment for a subprocess in which torch cannot be imported; returns (env, report path)."""
    return torch_free_env(tmp_path)


def assert_result_matches(result, reference):
    assert sorted(result) == sorted(reference), (sorted(result), sorted(reference))
    for key, value in reference.items():
        np.testing.assert_allclose(result[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


# ----------------------------------------------------------------------------- Client


def test_predict_matches_direct_evaluation_with_units(client, model):
    atoms = quartz_like(seed=1)
    r = client.predict(atoms, electric_field=FIELD, outputs="all")
    ref = predict(model, [atoms], electric_fields=FIELD, heads="sio2", outputs="all")[0]
    assert_result_matches(r, ref)
    assert r.model == "tiny" and r.head == "sio2" and r.n_atoms == len(atoms)
    assert r.born_charges.shape == (9, 3, 3) and r.polarizability.shape == (3, 3) and r.chi.shape == (3, 3)
    assert r.units["polarizability"] == "e*A^2/V" and r.units["chi"] == "dimensionless"
    assert r.units["forces"] == "eV/A" and r.units["polarization"] == "e/A^2"

    # another head, a mapping of arrays instead of Atoms, the server's default outputs
    arrays = {"numbers": atoms.numbers, "positions": atoms.positions, "cell": np.asarray(atoms.cell), "pbc": True}
    r = client.predict(arrays, electric_field=FIELD, head="other")
    ref = predict(model, [atoms], electric_fields=FIELD, heads="other", outputs=DEFAULT_OUTPUTS)[0]
    assert DEFAULT_OUTPUTS == ("energy", "forces", "stress", "dipole", "polarization")
    assert r.head == "other"
    assert_result_matches(r, ref)


def test_molecule_has_no_periodic_outputs(client, model):
    mol = sio_molecule()
    r = client.predict(mol, electric_field=FIELD, outputs="all")
    ref = predict(model, [mol], electric_fields=FIELD, heads="sio2", outputs="all")[0]
    assert_result_matches(r, ref)
    for key in ("stress", "polarization", "polarization_quantum", "chi", "eps_inf", "volume"):
        assert key not in r and getattr(r, key) is None
    assert r.dipole.shape == (3,) and r.polarizability.shape == (3, 3)


def test_predict_many_per_structure_fields_and_progress(client, model, capsys):
    structures = [quartz_like(seed=i) for i in range(4)] + [sio_molecule()]
    fields = np.array([[0.0, 0.0, 0.01 * i] for i in range(len(structures))])
    results = client.predict_many(structures, electric_field=fields, outputs=["forces", "dipole"], batch_size=2,
                                  progress=True)
    refs = predict(model, structures, electric_fields=fields, heads="sio2", outputs=["forces", "dipole"])
    assert len(results) == len(refs)
    for r, ref in zip(results, refs):
        assert_result_matches(r, ref)
    assert "5/5" in capsys.readouterr().err  # the progress bar reached the end


def test_session_keeps_one_stream_and_matches(client, model):
    atoms = quartz_like(seed=2)
    with client.session(outputs=["forces", "polarization"]) as session:
        for step in range(3):
            atoms.positions[0, 0] += 0.01
            r = session.predict(atoms, electric_field=FIELD * step)
            ref = predict(model, [atoms], electric_fields=FIELD * step, outputs=["forces", "polarization"])[0]
            assert_result_matches(r, ref)
            assert r.request_id == f"s{step}"
        assert session.reconnects == 0
        with pytest.raises(InvalidRequest, match="head"):  # ends that stream ...
            session.predict(atoms, head="nope")
        r = session.predict(atoms, electric_field=FIELD)  # ... and the next call opens a new one
        ref = predict(model, [atoms], electric_fields=FIELD, outputs=["forces", "polarization"])[0]
        assert_result_matches(r, ref)


def test_async_client(served, model):
    atoms = quartz_like(seed=3)
    ref = predict(model, [atoms], electric_fields=FIELD, outputs=["forces", "born_charges"])[0]

    async def main():
        async with AsyncClient(served, timeout=60) as c:
            info = await c.list_models()
            one = await c.predict(atoms, electric_field=FIELD, outputs=["forces", "born_charges"])
            many = await c.predict_many([atoms, atoms], electric_field=FIELD, outputs=["forces", "born_charges"],
                                        batch_size=1)
            async with c.session(outputs=["forces", "born_charges"]) as s:
                streamed = [await s.predict(atoms, electric_field=FIELD)]
                try:
                    await s.predict(atoms, head="nope")
                except InvalidRequest as exc:
                    assert "head" in str(exc)
                else:
                    raise AssertionError("an unknown head was accepted")
                streamed.append(await s.predict(atoms, electric_field=FIELD))
            return info, [one, *many, *streamed]

    info, results = asyncio.run(main())
    assert [m.name for m in info.models] == ["tiny"] and info.models[0].heads == ["sio2", "other"]
    assert info.models[0].backend == "e3nn"
    for r in results:
        assert_result_matches(r, ref)


def test_invalid_request_names_the_field_and_token_is_accepted(served):
    with Client(served, token="not-checked-yet", timeout=60) as c:
        with pytest.raises(InvalidRequest, match="head") as info:
            c.predict(quartz_like(), head="nope")
        assert served in str(info.value)
        assert c.predict(quartz_like()).forces.shape == (9, 3)  # the bearer metadata does not break calls


def test_unreachable_server_raises_one_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    with Client(target, timeout=10, retry=RetryPolicy(attempts=3, initial_backoff=0.05)) as c:
        with pytest.raises(ServerUnavailable, match=target) as info:
            c.predict(quartz_like())
        assert "3 attempts" in str(info.value) and isinstance(info.value, ConnectionError)
        with c.session() as s, pytest.raises(ServerUnavailable, match=target):
            s.predict(quartz_like())


# ------------------------------------------------------------------------------- ASE


def test_nve_md_conserves_enthalpy_and_matches_direct_evaluation(served, model):
    atoms = quartz_like(rattle=0.02, seed=4)
    calc = MACEFieldCalculator(served, electric_field=FIELD, timeout=60)
    atoms.calc = calc
    thermalize_momenta(atoms, 300.0, rng=np.random.default_rng(1))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    frames, totals = [], []

    def record():
        frames.append((atoms.copy(), atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(),
                       calc.get_property("polarization", atoms)))
        totals.append(atoms.get_total_energy())

    dyn.attach(record, interval=1)
    dyn.run(50)
    assert len(frames) == 51
    drift = (max(totals) - min(totals)) / len(atoms)
    assert drift < 1e-3, f"total energy drift {drift} eV/atom"
    assert atoms.get_temperature() > 50  # the atoms really moved

    refs = predict(model, [f[0] for f in frames], electric_fields=FIELD, outputs=["energy", "forces", "stress",
                                                                                  "polarization"])
    for (_, energy, forces, stress, polarization), ref in zip(frames, refs):
        assert energy == pytest.approx(float(ref["energy"]), rel=RTOL, abs=ATOL)
        np.testing.assert_allclose(forces, ref["forces"], rtol=RTOL, atol=ATOL)
        s = ref["stress"]  # ASE Voigt order xx yy zz yz xz xy
        np.testing.assert_allclose(stress, [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(polarization, ref["polarization"], rtol=RTOL, atol=ATOL)
    assert calc._session.reconnects == 0
    calc.close()


def test_field_response_is_born_charges_to_first_order_and_field_changes_invalidate(served, model):
    atoms = quartz_like(seed=5)
    calc = MACEFieldCalculator(served, electric_field=(0.0, 0.0, 0.0), timeout=60)
    atoms.calc = calc
    becs = calc.get_property("becs", atoms)
    assert becs.shape == (9, 9)
    z = becs.reshape(9, 3, 3)  # Z*[k, i, j] = d dipole_i / d R_kj
    f0 = atoms.get_forces()
    p0 = calc.get_property("polarization", atoms)

    e = np.array([0.004, -0.003, 0.005])
    calc.electric_field = e  # same atoms, no move: cached results must be discarded
    assert calc.results == {}
    f_plus = atoms.get_forces()
    p_plus = calc.get_property("polarization", atoms)
    calc.electric_field = -e
    f_minus = atoms.get_forces()

    predicted = np.einsum("kij,i->kj", z, e)  # (Z*^T E) per atom
    assert np.abs(predicted).max() > 1e-8  # the model couples to the field
    # one-sided: first order (error O(E^2)); central: third order.  Z* (not Z*^T) contracted with E
    # would miss both by percents.
    np.testing.assert_allclose(f_plus - f0, predicted, rtol=0, atol=1e-3 * np.abs(predicted).max())
    np.testing.assert_allclose((f_plus - f_minus) / 2, predicted, rtol=0, atol=1e-6 * np.abs(predicted).max())
    assert not np.allclose(f_plus, f0, rtol=0, atol=1e-12)
    assert not np.allclose(p_plus, p0, rtol=0, atol=1e-14)
    ref = predict(model, [atoms], electric_fields=e, outputs=["forces", "polarization"])[0]
    np.testing.assert_allclose(f_plus, ref["forces"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(p_plus, ref["polarization"], rtol=RTOL, atol=ATOL)
    calc.close()


def test_field_from_atoms_info_and_results_like_the_reference(served, model):
    atoms = quartz_like(seed=6)
    calc = MACEFieldCalculator(served, timeout=60, use_session=False)  # no field argument: atoms.info decides
    atoms.calc = calc

    def check(field):
        ref = predict(model, [atoms], electric_fields=field, outputs="all")[0]
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(calc.get_property("polarizability", atoms), ref["chi"].reshape(9), rtol=RTOL,
                                   atol=ATOL)
        np.testing.assert_allclose(calc.get_property("becs", atoms), ref["born_charges"].reshape(-1, 9), rtol=RTOL,
                                   atol=ATOL)
        np.testing.assert_allclose(calc.get_property("dipole", atoms), ref["dipole"], rtol=RTOL, atol=ATOL)
        assert calc.get_property("free_energy", atoms) == atoms.get_potential_energy()
        np.testing.assert_array_equal(calc.field_used, field)

    check(np.zeros(3))
    atoms.info["REF_electric_field"] = np.array([0.0, 0.03, 0.0])
    check(atoms.info["REF_electric_field"])  # a changed info field is a change of state
    atoms.info["electric_field"] = np.array([0.02, 0.0, 0.0])
    check(atoms.info["electric_field"])  # electric_field wins over REF_electric_field
    calc.electric_field = (0.0, 0.0, -0.04)
    check(np.array([0.0, 0.0, -0.04]))  # the calculator's field wins over both

    mol = sio_molecule()
    mol.calc = calc
    ref = predict(model, [mol], electric_fields=[0.0, 0.0, -0.04], outputs="all")[0]
    np.testing.assert_allclose(calc.get_property("molecular_polarizability", mol), ref["polarizability"], rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(calc.get_property("becs", mol), ref["born_charges"].reshape(len(mol), 9), rtol=RTOL,
                               atol=ATOL)
    # the unambiguous names: Z* (N, 3, 3), alpha (3, 3) e*A^2/V for any structure, eps_inf only with a volume
    np.testing.assert_allclose(calc.get_born_charges(mol), ref["born_charges"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(calc.get_alpha(mol), ref["polarizability"], rtol=RTOL, atol=ATOL)
    for name in ("polarization", "polarizability", "stress", "eps_inf"):
        with pytest.raises(PropertyNotImplementedError):
            calc.get_property(name, mol)
    crystal = quartz_like(seed=11)
    crystal.calc = calc
    ref = predict(model, [crystal], electric_fields=[0.0, 0.0, -0.04], outputs="all")[0]
    np.testing.assert_allclose(calc.get_eps_inf(crystal), ref["eps_inf"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(calc.get_alpha(crystal), ref["polarizability"], rtol=RTOL, atol=ATOL)
    # reference: chi
    np.testing.assert_allclose(calc.get_polarizability(crystal), ref["chi"].reshape(9), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(calc.get_eps_inf(crystal), np.eye(3) + calc.get_polarizability(crystal).reshape(3, 3),
                               rtol=1e-12, atol=1e-12)
    calc.close()


# --------------------------------------------------- torch-free: import, CLI, examples


def test_client_source_never_imports_torch():
    files = sorted((CLIENT_DIR / "macefield_client").rglob("*.py")) + sorted((CLIENT_DIR / "examples").glob("*.py"))
    assert len(files) > 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "macefield_server", "e3nn", "mace"), f"{path}: {name}"


def test_client_imports_and_runs_without_torch(served, model, torch_free):
    atoms = quartz_like(seed=7)
    expected = float(predict(model, [atoms], electric_fields=FIELD, outputs=["energy"])[0]["energy"])
    script = textwrap.dedent(
        f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch is importable: the guard is not active")
        import numpy as np
        from ase.io import read
        import macefield_client, macefield_client.ase, macefield_client.cli
        from macefield_client import Client
        atoms = read(sys.argv[1])
        with Client({served!r}, timeout=60) as c:
            r = c.predict(atoms, electric_field={FIELD.tolist()!r}, outputs="all")
        assert abs(float(r.energy) - {expected!r}) <= 1e-9 * abs({expected!r}), (float(r.energy), {expected!r})
        calc = macefield_client.ase.MACEFieldCalculator({served!r}, electric_field={FIELD.tolist()!r})
        atoms.calc = calc
        assert abs(atoms.get_potential_energy() - {expected!r}) <= 1e-9 * abs({expected!r})
        print("ok", float(r.energy))
        """
    )
    path = Path(torch_free[1]).with_name("quartz.xyz")
    ase.io.write(path, atoms, format="extxyz")
    proc = run_torch_free([sys.executable, "-c", script, str(path)], torch_free)
    assert proc.stdout.startswith("ok")
    assert "'torch'" in torch_free[1].read_text().split("refused=")[1]  # the probe import really was refused


def test_cli_info_and_predict(served, model, torch_free, tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    proc = run_torch_free([*MACEFIELD, "info", "--server", served], torch_free)
    assert "model tiny" in proc.stdout and "sio2 (default), other" in proc.stdout and "O Si" in proc.stdout
    assert "polarizability e*A^2/V" in proc.stdout

    frames = [quartz_like(seed=i) for i in range(3)] + [sio_molecule()]
    frames[1].info["REF_electric_field"] = np.array([0.0, 0.0, 0.03])
    frames[2].info["electric_field"] = np.array([0.02, 0.0, 0.0])
    # reference labels the output file must keep: info, arrays and a calculator's results
    frames[0].info["REF_energy"] = -123.25
    frames[0].arrays["REF_forces"] = np.full((len(frames[0]), 3), 0.125)
    frames[0].calc = SinglePointCalculator(frames[0], energy=-99.5, forces=np.full((len(frames[0]), 3), -0.25),
                                           stress=np.arange(6.0))
    src, out, out2, out3 = (tmp_path / f"{name}.xyz" for name in ("in", "out", "out2", "out3"))
    ase.io.write(src, frames, format="extxyz")

    # one field for all frames, another head, every output
    run_torch_free([*MACEFIELD, "predict", str(src), "--field", "0.01", "-0.02", "0.05", "--head", "other",
                    "-o", str(out), "--server", served, "--batch-size", "3", "--progress", "--outputs", "all"],
                   torch_free)
    got = ase.io.read(out, index=":")
    refs = predict(model, frames, electric_fields=FIELD, heads="other", outputs="all")
    assert len(got) == len(frames)
    for a, ref in zip(got, refs):
        assert a.info["MACE_energy"] == pytest.approx(float(ref["energy"]), rel=1e-9)
        np.testing.assert_allclose(a.arrays["MACE_forces"], ref["forces"], rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(a.arrays["MACE_becs"], ref["born_charges"].reshape(len(a), 9), rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(a.info["MACE_dipole"], ref["dipole"], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(a.info["MACE_alpha"], ref["polarizability"].reshape(9), rtol=1e-7, atol=1e-12)
        if a.pbc.all():
            np.testing.assert_allclose(a.info["MACE_polarization"], ref["polarization"], rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(a.info["MACE_polarizability"], ref["chi"].reshape(9), rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(a.info["MACE_eps_inf"], ref["eps_inf"].reshape(9), rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(a.info["MACE_stress"], ref["stress"], rtol=1e-7, atol=1e-10)
        else:
            assert not {"MACE_polarization", "MACE_polarizability", "MACE_eps_inf"} & set(a.info)
            np.testing.assert_allclose(a.info["MACE_molecular_polarizability"], ref["polarizability"].reshape(9),
                                       rtol=1e-7, atol=1e-12)
    # every input key survived
    first = got[0]
    assert first.info["REF_energy"] == -123.25 and np.all(first.arrays["REF_forces"] == 0.125)
    assert first.get_potential_energy() == -99.5 and np.all(first.get_forces() == -0.25)
    np.testing.assert_array_equal(first.get_stress(), np.arange(6.0))

    # no --field: each frame's own field (electric_field, then REF_electric_field, then zero)
    run_torch_free([*MACEFIELD, "predict", str(src), "--outputs", "energy", "forces", "-o", str(out2),
                    "--server", served], torch_free)
    fields = [np.zeros(3), [0.0, 0.0, 0.03], [0.02, 0.0, 0.0], np.zeros(3)]
    refs = predict(model, frames, electric_fields=np.array(fields, dtype=float), outputs=["energy", "forces"])
    for a, ref, field in zip(ase.io.read(out2, index=":"), refs, fields):
        assert a.info["MACE_energy"] == pytest.approx(float(ref["energy"]), rel=1e-9)
        np.testing.assert_allclose(a.info["MACE_electric_field"], field)
        assert "MACE_becs" not in a.arrays

    # no --outputs: the same default as the Python client (first derivatives only)
    run_torch_free([*MACEFIELD, "predict", str(src), "-o", str(out3), "--server", served], torch_free)
    a = ase.io.read(out3, index=0)
    assert {"MACE_energy", "MACE_stress", "MACE_dipole", "MACE_polarization"} <= set(a.info)
    assert "MACE_forces" in a.arrays and "MACE_becs" not in a.arrays and "MACE_alpha" not in a.info


def test_cli_bad_input_is_one_line_and_exit_2(served, torch_free, tmp_path):
    env, _ = torch_free
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\na structure file\n")
    for args in (["predict", str(tmp_path / "missing.xyz"), "-o", str(tmp_path / "o.xyz")],
                 ["eval", str(tmp_path / "missing.xyz")],
                 ["predict", str(garbage), "-o", str(tmp_path / "o.xyz")]):
        proc = subprocess.run([*MACEFIELD, *args, "--server", served], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("macefield: "), proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_unreachable_server_exits_with_message(torch_free):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env, _ = torch_free
    proc = subprocess.run([*MACEFIELD, "info", "--server", f"127.0.0.1:{port}", "--timeout", "10", "--retries", "1"],
                          env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port} is unavailable" in proc.stderr and "Traceback" not in proc.stderr
