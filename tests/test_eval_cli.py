"""``macefield eval``: errors against the file's reference labels, with the model card's numbers.

Run torch-free against the embedded default model served on loopback, on the held-out validation frames of
both DFT data sets: the reported errors equal the card's (which the trainer computed in-process), the
conventions it chose are the ones the data README documents, and the output file keeps every input key.
"""

from __future__ import annotations

import json
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from serving import run_torch_free, torch_free_env


#: card metrics compared (all of them the card lists per data set)
METRICS = ("energy_mae_meV_per_atom", "forces_mae_meV_per_A", "forces_rmse_meV_per_A", "stress_mae_meV_per_A3",
           "born_charges_mae_e", "born_charges_rmse_e", "polarizability_rel_error", "eps_inf_rel_error_max",
           "polarization_folded_mae_e_per_A2")


@pytest.fixture(scope="module")
def served(default_model, default_served):
    return default_served, json.loads(default_model.card_json)


@pytest.mark.parametrize("dataset, file, head, first, options, expect", [
    # 'polarizability' holds extensive alpha here, but its values would pass as chi or eps_inf too: say it
    ("sio2-quartz", "sio2-quartz-md.xyz", "sio2", 129, ["--polarizability-unit", "extensive"],
     {"energy": ("total_energy", "total"), "polarization": ("polarization", "dipole"),
      "born_charges": ("born_charge", None), "polarizability": ("polarizability", "extensive")}),
    ("batio3", "batio3-md.xyz", "batio3", 38, [],
     {"energy": ("REF_energy", "total"), "polarization": ("REF_polarisation", "P"),
      "born_charges": ("REF_becs", None), "polarizability": ("REF_polarisability", "per_volume")}),
])
def test_eval_reproduces_the_card(served, shared_data, tmp_path, dataset, file, head, first, options, expect):
    target, card = served
    frames = ase.io.read(shared_data / file, index=f"{first}:")
    src, out = tmp_path / "valid.xyz", tmp_path / "out.xyz"
    ase.io.write(src, frames, format="extxyz")
    # BaTiO3's REF_electric_field (0.3 V/A) is a placeholder: the data were computed at zero field
    args = [sys.executable, "-m", "macefield_client.cli", "eval", str(src), "--server", target, "--head", head,
            "--json", "-o", str(out), "--field", "0", "0", "0", *options]
    report = json.loads(run_torch_free(args, torch_free_env(tmp_path), timeout=600).stdout)
    assert report["frames"] == len(frames) and report["head"] == head and report["model"] == "macefield-default"
    for quantity, (key, kind) in expect.items():
        assert (report["references"][quantity]["key"], report["references"][quantity]["kind"]) == (key, kind)
    errors, reference = report["errors"], card["validation"][dataset]
    for metric in METRICS:
        assert errors[metric] == pytest.approx(reference[metric], rel=2e-3, abs=1e-6), metric
    np.testing.assert_allclose(errors["eps_inf_pred_diag"], reference["eps_inf_pred_diag"], rtol=1e-4)
    # card: float32 volume
    np.testing.assert_allclose(errors["eps_inf_dft_diag"], reference["eps_inf_dft_diag"], rtol=1e-7)
    written = ase.io.read(out, index=":")
    assert len(written) == len(frames)
    for key in list(frames[0].info) + list(frames[0].arrays):  # every input key kept
        assert key in written[0].info or key in written[0].arrays, key
    assert "MACE_becs" in written[0].arrays and "MACE_eps_inf" in written[0].info


def test_eval_text_table_and_conventions(served, shared_data, tmp_path):
    target, _ = served
    src = tmp_path / "two.xyz"
    ase.io.write(src, ase.io.read(shared_data / "batio3-md.xyz", index="40:42"), format="extxyz")
    env = torch_free_env(tmp_path)
    base = [sys.executable, "-m", "macefield_client.cli", "eval", str(src), "--server", target, "--head", "batio3"]
    text = run_torch_free(base, env).stdout
    assert "electric field: info REF_electric_field = [0.3, 0.3, 0.3] V/A in 2 frame(s)" in text  # shown, not hidden
    assert "reference polarizability: 'REF_polarisability' as per_volume" in text
    assert "forces MAE" in text and "Z* MAE" in text and "eps_inf diag (model | reference)" in text
    # a convention given on the command line is used as given: the wrong one makes the alpha error ~100%
    wrong = json.loads(run_torch_free(base + ["--json", "--field", "0", "0", "0", "--polarizability-unit", "extensive",
                                              "--energy-key", "none"], env).stdout)
    assert wrong["references"]["polarizability"]["kind"] == "extensive" and "energy" not in wrong["references"]
    assert wrong["errors"]["polarizability_rel_error"] > 100.0
    # an unknown key, an output folder that does not exist: one line, exit 2, nothing computed
    cases = [
        (base + ["--forces-key", "nope"], f"macefield: --forces-key 'nope': no frame of {src} has it"),
        (base + ["-o", str(tmp_path / "no" / "such" / "out.xyz")], "macefield: output folder not found"),
        (base + ["--tls-ca", str(tmp_path / "missing.pem")], "macefield: --tls-ca: file not found"),
    ]
    for args, message in cases:
        bad = subprocess.run(args, env=env[0], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.strip().startswith(message), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_eval_skips_an_ambiguous_quantity_and_evaluates_the_rest(served, shared_data, tmp_path):
    """Quartz's 'polarizability' could be extensive alpha, chi or eps_inf: it is skipped with one line saying how to
    include it; energy, forces, stress, P and Z* are evaluated; exit 0."""
    target, _ = served
    sio2 = tmp_path / "sio2.xyz"
    ase.io.write(sio2, ase.io.read(shared_data / "sio2-quartz-md.xyz", index="140:142"), format="extxyz")
    env = torch_free_env(tmp_path)
    proc = run_torch_free([sys.executable, "-m", "macefield_client.cli", "eval", str(sio2), "--server", target], env)
    (line,) = [x for x in proc.stderr.splitlines() if "polarizability" in x]
    assert line.startswith("macefield: skipped polarizability: cannot tell the convention of 'polarizability'")
    assert "--polarizability-unit" in line
    assert "forces MAE" in proc.stdout and "Z* MAE" in proc.stdout and "stress MAE" in proc.stdout
    assert "P MAE (folded)" in proc.stdout and "alpha rel. error" not in proc.stdout
    report = json.loads(run_torch_free([sys.executable, "-m", "macefield_client.cli", "eval", str(sio2), "--server",
                                        target, "--json"], env).stdout)
    assert "polarizability" not in report["references"] and {"energy", "forces", "born_charges"} <= set(
        report["references"])
    assert len(report["skipped"]) == 1 and "--polarizability-unit" in report["skipped"][0]


def test_eval_of_molecules_reports_the_dipole(served, tmp_path):
    """Molecules have no volume: their dipole reference is compared directly (no folding), alpha as extensive."""
    from macefield_client.structures import sio_molecule

    target, _ = served
    frames = [sio_molecule(direction=d) for d in ((0, 0, 1), (1, 0, 0), (0.3, 0.5, 0.81))]
    for a, d in zip(frames, (0.5, -0.2, 0.1)):
        a.info["REF_dipole"] = np.array([d, 0.0, 0.0])
    src = tmp_path / "mol.xyz"
    ase.io.write(src, frames, format="extxyz")
    report = json.loads(run_torch_free([sys.executable, "-m", "macefield_client.cli", "eval", str(src), "--server",
                                        target, "--json"], torch_free_env(tmp_path)).stdout)
    assert report["references"]["polarization"]["kind"] == "dipole"
    # the reported MAE is the mean |model dipole - reference| over components and frames
    out = tmp_path / "check.xyz"
    run_torch_free([sys.executable, "-m", "macefield_client.cli", "predict", str(src), "--server", target, "-o",
                    str(out)], torch_free_env(tmp_path))
    model = np.array([a.info["MACE_dipole"] for a in ase.io.read(out, index=":")])
    reference = np.array([a.info["REF_dipole"] for a in frames])
    assert report["errors"]["dipole_mae_e_A"] == pytest.approx(np.abs(model - reference).mean(), rel=1e-6)
