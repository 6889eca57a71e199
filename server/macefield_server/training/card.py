"""Model card: machine-readable JSON (what ListModels returns) and markdown.

The JSON is also embedded in the checkpoint's metadata under ``card``.
Validation numbers are recomputed from the exported model on every
validation frame of every dataset; the first ``export.card_frames`` frames
of each validation split are listed one by one, so that a test can
recompute them quickly and compare.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, cast

import torch

from ..engine.architecture import describe_architecture
from ..engine.checkpoint import save_model
from .metrics import compact_frame, frame_errors, summarise


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(threads: int) -> str:
    return f"{cpu_name()}, {threads} CPU thread(s), {os.cpu_count()} logical CPUs on the machine, no GPU"


def check_goals(goals: Dict, validation: Dict) -> List[Dict]:
    """Compare validation metrics with targets: {dataset: {metric: max allowed value}}."""
    rows = []
    for name, targets in (goals or {}).items():
        for metric, target in targets.items():
            value = validation.get(name, {}).get(metric)
            rows.append(
                {
                    "dataset": name,
                    "metric": metric,
                    "target_max": target,
                    "value": value,
                    "met": None if value is None else bool(value <= target),
                }
            )
    return rows


def time_full_response(model, sample, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time (s) of one full-response evaluation (all outputs) of one frame."""
    import time

    from ..engine.predict import predict

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(model, sample.structure, outputs="all")
        best = min(best, time.perf_counter() - t0)
    return best


def validate(model, cfg, valid: Dict[str, List]) -> tuple:
    """(validation summary per data set, the card's per-frame rows) of ``model`` on the validation samples."""
    validation = {}
    frames: List[Dict] = []
    for ds in cfg.datasets:
        samples = valid.get(ds.name) or []
        rows = frame_errors(model, samples)
        summary: Dict[str, Any] = summarise(rows)
        summary["head"] = ds.head
        summary["frames_in_file"] = [s.index for s in samples[:1]] + [s.index for s in samples[-1:]]
        validation[ds.name] = summary
        frames += [compact_frame(r) for r in rows[: cfg.export.card_frames]]
    return validation, frames


def build_card(model, trainer, *, fit_summary: Dict, command: str) -> Dict:
    cfg = trainer.cfg
    arch = describe_architecture(model)
    validation, frames = validate(model, cfg, trainer.valid)
    n_params = sum(p.numel() for p in model.parameters())
    card = dict(cfg.export.card_info)
    goals = card.pop("goals", None)
    timing = {}
    first_valid = [s for ds in cfg.datasets for s in (trainer.valid.get(ds.name) or [])[:1]]
    for s in first_valid:
        timing[f"{s.dataset} ({s.n_atoms} atoms)"] = round(time_full_response(model, s), 3)
    card.update(
        {
            "heads": list(model.heads),
            "elements": [int(z) for z in model.atomic_numbers],
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "parameters": int(n_params),
            "architecture": {
                "channels": cfg.model.channels,
                "max_L": cfg.model.max_L,
                "hidden_irreps": arch["hidden_irreps"],
                "num_interactions": arch["num_interactions"],
                "max_ell": arch["max_ell"],
                "correlation": arch["correlation"],
                "r_max": arch["r_max"],
                "num_bessel": arch["num_bessel"],
                "radial_MLP": arch["radial_MLP"],
                "MLP_irreps": arch["MLP_irreps"],
                "avg_num_neighbors": arch["avg_num_neighbors"],
                "atomic_energies_eV": {
                    h: dict(zip(map(str, arch["atomic_numbers"]), e))
                    for h, e in zip(arch["heads"], arch["atomic_energies"])
                },
                "scale": dict(zip(arch["heads"], arch["atomic_inter_scale"])),
                "shift": dict(zip(arch["heads"], arch["atomic_inter_shift"])),
                # mace-torch's ZBL term (through the per-head scale), and the core repulsion: below each pair's
                # inner distance (A, per head) the learned part fades out over width_A and universal ZBL fades in
                "pair_repulsion": bool(arch.get("pair_repulsion", False)),
                "core_repulsion": arch.get("core_repulsion"),
            },
            "training": {
                "command": command,
                "datasets": [
                    {
                        "name": ds.name,
                        "file": ds.path,
                        "head": ds.head,
                        "train_fraction": list(ds.train),
                        "valid_fraction": list(ds.valid),
                        "train_frames": len(trainer.data[ds.name]["train"]),
                        "valid_frames": len(trainer.data[ds.name]["valid"]),
                        "keys": {q: {"key": k.key, "kind": k.kind, "scale": k.scale} for q, k in ds.keys.items()},
                    }
                    for ds in cfg.datasets
                ],
                "loss": {
                    "weights": {
                        q: getattr(cfg.loss, q)
                        for q in ("energy", "forces", "stress", "polarization", "born_charges", "polarizability")
                    },
                    "scales": trainer.scales,
                    "huber_delta": cfg.loss.huber_delta,
                },
                "optim": dict(vars(cfg.optim)),
                "seed": cfg.run.seed,
                "epochs": fit_summary.get("epochs"),
                "best_epoch": fit_summary.get("best_epoch"),
                "exported": fit_summary.get("exported", "best"),
                "exported_epoch": fit_summary.get("exported_epoch", fit_summary.get("best_epoch")),
                "stop_reason": fit_summary.get("stop_reason"),
                "wall_time_minutes": round(fit_summary.get("elapsed_seconds", 0.0) / 60.0, 1),
                "hardware": hardware(int(cfg.run.threads or torch.get_num_threads())),
                "torch": torch.__version__,
            },
            "validation": validation,
            "goals": check_goals(goals, validation),
            "inference_seconds_full_response": {
                "threads": torch.get_num_threads(),
                "note": "one evaluation of energy, forces, stress, dipole, P, Z*, alpha at the end of training, "
                "best of 3, on the training hardware (training.hardware), whose cores other work may have shared",
                "per_structure": timing,
            },
            "validation_frames": frames,
        }
    )
    return card


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, list):
        return "/".join(_fmt(x, nd) for x in v)
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 else f"{v:.{nd}f}"
    return str(v)


def card_markdown(card: Dict) -> str:
    arch = card["architecture"]
    tr = card["training"]
    lines = [f"# {card.get('name', 'MACE-Field model')}", ""]
    if card.get("description"):
        lines += [card["description"], ""]
    if card.get("valid_for"):
        lines += ["## Valid for", "", card["valid_for"], ""]
    if card.get("short_range"):
        lines += ["## At very short distances", "", card["short_range"], ""]
    lines += [
        "## Validation errors", "", "Temporally contiguous hold-out: the last 20% of each file (never trained on).", ""
    ]
    rows = [
        ("frames", "frames", 0),
        ("energy MAE (meV/atom)", "energy_mae_meV_per_atom", 2),
        ("energy RMSE (meV/atom)", "energy_rmse_meV_per_atom", 2),
        ("energy MAE, mean offset removed (meV/atom)", "energy_mae_offset_removed_meV_per_atom", 2),
        ("forces MAE (meV/A)", "forces_mae_meV_per_A", 1),
        ("forces RMSE (meV/A)", "forces_rmse_meV_per_A", 1),
        ("stress MAE (meV/A^3)", "stress_mae_meV_per_A3", 2),
        ("stress RMSE (meV/A^3)", "stress_rmse_meV_per_A3", 2),
        ("Z* MAE (e)", "born_charges_mae_e", 3),
        ("Z* RMSE (e)", "born_charges_rmse_e", 3),
        ("alpha relative error (Frobenius, mean over frames)", "polarizability_rel_error", 3),
        ("eps_inf xx/yy/zz, model (mean over frames)", "eps_inf_pred_diag", 3),
        ("eps_inf xx/yy/zz, DFT (mean over frames)", "eps_inf_dft_diag", 3),
        ("eps_inf relative error of the mean (max over xx/yy/zz)", "eps_inf_rel_error_max", 3),
        ("eps_inf relative error per frame and component (mean)", "eps_inf_rel_error_per_frame_mean", 3),
        ("folded P MAE (e/A^2)", "polarization_folded_mae_e_per_A2", 3),
        ("folded P RMSE (e/A^2)", "polarization_folded_rmse_e_per_A2", 3),
    ]
    names = list(card["validation"])
    lines.append("| metric | " + " | ".join(f"{n} (head `{card['validation'][n]['head']}`)" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for label, key, nd in rows:
        vals = []
        for n in names:
            v = card["validation"][n].get(key)
            vals.append(str(v) if key == "frames" else _fmt(v, nd if nd else 3))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    lines += ["", "1 meV/A^3 = 0.1602 GPa.", ""]
    if card.get("goals"):
        lines += ["## Accuracy goals and what was reached", "",
                  "| dataset | metric | goal (at most) | reached | met |", "|---|---|---|---|---|"]
        for g in card["goals"]:
            met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {g['dataset']} | {g['metric']} | {g['target_max']} | {_fmt(g['value'], 3)} | {met} |")
        lines.append("")
    timing = card.get("inference_seconds_full_response", {})
    if timing.get("per_structure"):
        lines += [
            f"Full-response evaluation time ({timing['threads']} thread(s)): "
            + ", ".join(f"{k}: {v} s" for k, v in timing["per_structure"].items())
            + f" ({timing['note']}).",
            "",
        ]
    if card.get("extrapolation"):
        lines += extrapolation_markdown(card["extrapolation"])
    if card.get("notes"):
        lines += ["## Notes and limitations", ""] + [f"- {g}" for g in card["notes"]] + [""]
    lines += [
        "## Model",
        "",
        f"- FieldMACE (MACE-Field, arXiv 2508.17870), heads {', '.join('`' + h + '`' for h in card['heads'])}; "
        f"elements Z = {card['elements']}; {card['parameters']} parameters; {card['dtype']}.",
        f"- hidden irreps `{arch['hidden_irreps']}` ({arch['channels']} channels, L = {arch['max_L']}), "
        f"{arch['num_interactions']} interactions, max_ell {arch['max_ell']}, correlation {arch['correlation']}, "
        f"r_max {arch['r_max']} A, {arch['num_bessel']} Bessel functions, radial MLP {arch['radial_MLP']}, "
        f"readout MLP {arch['MLP_irreps']}, avg_num_neighbors {arch['avg_num_neighbors']:.2f}.",
        "- Reference energies E0 (eV, least squares per head over the training frames): "
        f"{json.dumps(arch['atomic_energies_eV'])}",
        f"- Per-head scale / shift: {json.dumps(arch['scale'])} / {json.dumps(arch['shift'])}",
    ]
    if arch.get("pair_repulsion"):
        lines.append("- Pair repulsion: mace-torch's ZBL term (cut off at the sum of the covalent radii, through the "
                     "per-head scale).")
    core = arch.get("core_repulsion")
    if core:
        inner = "; ".join(f"{head}: " + ", ".join(f"{pair} {d:.3f}" for pair, d in pairs.items())
                          for head, pairs in core["inner"].items())
        lines.append(f"- Core repulsion: below each pair's inner distance (A; the data's shortest, or a covalent-"
                     f"radius estimate for pairs the head's data lacks) the learned part fades out over "
                     f"{core['width']} A and universal ZBL fades in: {inner}.")
    lines += [
        "",
        "## Training",
        "",
    ]
    stages = card.get("previous_stages") or []
    for i, st in enumerate(stages, start=1):
        lines.append(
            f"- Stage {i}: `{st['command']}`: {st.get('epochs', '?')} epochs, {st.get('wall_time_minutes', '?')} min "
            f"on {st.get('hardware', '?')}" + (f"; {st['note']}" if st.get("note") else "") + "."
        )
    if stages:
        lines.append(f"- Stage {len(stages) + 1} (this run, produces the exported weights):")
    ind = "  " if stages else ""
    lines += [
        f"{ind}- Command (from the repository root): `{tr['command']}`",
        f"{ind}- Epochs run: {tr['epochs']} ({exported_text(tr)}); stop: {tr['stop_reason']}.",
        f"{ind}- Wall time: {tr['wall_time_minutes']} min on {tr['hardware']}; torch {tr['torch']}.",
        f"{ind}- Loss weights {json.dumps(tr['loss']['weights'])}, "
        f"residual scales {json.dumps({k: float(f'{v:.4g}') for k, v in tr['loss']['scales'].items()})}, "
        f"Huber delta {tr['loss']['huber_delta']} (in units of the scales). "
        "Polarization loss on P folded by the quanta e*a_k/Omega; "
        "polarizability loss on chi = alpha/(Omega eps0).",
        f"{ind}- Optimiser: Adam (amsgrad={tr['optim']['amsgrad']}), lr {tr['optim']['lr']}, "
        f"{tr['optim']['scheduler']} schedule, "
        f"batch size {tr['optim']['batch_size']}, EMA decay {tr['optim']['ema_decay']}, seed {tr['seed']}"
        + (
            f"; Born-charge and polarizability terms in one step out of every {k}, with weight x{k}."
            if (k := int(tr["optim"].get("response_every", 1))) > 1
            else "."
        ),
        "",
        "## Data",
        "",
    ]
    for ds in tr["datasets"]:
        keys = ", ".join(
            f"{q} <- `{v['key']}`" + (f" ({v['kind']})" if v["kind"] else "") for q, v in ds["keys"].items()
        )
        lines.append(
            f"- `{ds['file']}` -> head `{ds['head']}`: "
            f"train frames {ds['train_frames']} (fraction {ds['train_fraction']}), "
            f"validation frames {ds['valid_frames']} (fraction {ds['valid_fraction']}); {keys}."
        )
    lines.append("")
    if card.get("citations"):
        lines += ["## Provenance and citations", ""] + [f"- {c}" for c in card["citations"]] + [""]
    if card.get("license"):
        lines += ["## License", "", card["license"], ""]
    lines += [
        "## Per-frame validation errors (recomputed by tests/test_default_model.py)",
        "",
        "```json",
        json.dumps(card["validation_frames"], indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


#: what the card's extrapolation section says the two outputs mean (``macefield-calibrate --card`` writes it;
#: the numbers are in the section's tables and measured flags)
EXTRAPOLATION_MEANING = (
    "Every result of a calibrated head carries two dimensionless numbers with one threshold, 1. "
    "(1) The per-atom extrapolation grade (output `extrapolation`, and its maximum `extrapolation_max`): the atom's "
    "field-free structural features (the invariant channels of interaction layer 0, taken before the field coupling, "
    "from the same forward pass; exactly independent of the field) measured against the D-optimal active set "
    "(MaxVol, as pacemaker's gamma for ACE) of the training atoms of its element and head, with a 1% margin. "
    "Grade <= 1: inside the region the training frames span; > 1: the structure has left them, and the larger the "
    "further out. It sees one layer's receptive field (r_max), not the model's two. "
    "(2) The field range (output `field_extrapolation`, per structure): |E| / E_ref, E_ref the field at which the "
    "field-induced force on the most susceptible ion present (||Z*|| |E|, the model's Born charge at E = 0) equals "
    "the RMS force of the training frames: the field-induced ion displacement over the thermal displacement the "
    "training data sampled. 0 at zero field, linear in |E|; > 1: finite-field results extrapolate the zero-field "
    "response beyond the sampled configurations. Neither says how large an error is; they say that nothing in "
    "the training data vouches for the result."
)


def extrapolation_markdown(section: Dict) -> List[str]:
    """The card's "Extrapolation grade" section (written by ``macefield-calibrate --card``)."""
    lines = ["## Extrapolation grade and field range", ""]
    if section.get("meaning"):
        lines += [section["meaning"], ""]
    lines += [
        f"Method `{section['method']}`, threshold {section['threshold']:g} (grade > {section['threshold']:g}: "
        f"extrapolating), margin {section['margin']:g}, {section['features']} invariant features per atom.",
        "",
        "| head | reference frames | reference atoms per element (rank) | max grade, reference "
        "| held-out frames: atoms above threshold, max grade |",
        "|---|---|---|---|---|",
    ]
    for head, h in section["heads"].items():
        refs = "; ".join(f"`{r['file']}` {r['frames'][0]}:{r['frames'][1]}" for r in h["reference"]["files"])
        counts = ", ".join(f"Z={z}: {e['n_reference']} ({e['rank']})" for z, e in h["elements"].items())
        held = h.get("holdout")
        held_text = (f"{held['atoms_above']} of {held['atoms']} ({100 * held['fraction_above']:.1f}%), max "
                     f"{held['max']:.3g} (frames "
                     + "; ".join(f"{r['frames'][0]}:{r['frames'][1]}" for r in held["files"])
                     + ")") if held else "-"
        lines.append(f"| `{head}` | {refs} | {counts} | {h['reference_max_grade']:.3f} | {held_text} |")
    lines.append("")
    if any("field_reference_V_per_A" in h for h in section["heads"].values()):
        lines += ["Field range: E_ref = 1 / max kappa, kappa = mean ||Z*||_2 / RMS force component per element "
                  "(field_extrapolation = |E| / E_ref for a structure holding the element that sets E_ref).", "",
                  r"| head | E_ref (V/A) | per element: mean \|\|Z*\|\|_2 (e), RMS force (eV/A), "
                  r"sigma_F/\|\|Z*\|\| (V/A) |",
                  "|---|---|---|"]
        for head, h in section["heads"].items():
            if "field_reference_V_per_A" not in h:
                continue
            per = "; ".join(f"Z={z}: {e['born_charge_norm_e']:.2f}, {e['force_rms_eV_per_A']:.2f}, "
                            f"{(1 / e['kappa_A_per_V']) if e['kappa_A_per_V'] else float('inf'):.3f}"
                            for z, e in h["elements"].items())
            lines.append(f"| `{head}` | {h['field_reference_V_per_A']:.3f} | {per} |")
        lines.append("")
    fields = [(head, h["holdout"]["at_fields"]) for head, h in section["heads"].items()
              if h.get("holdout", {}).get("at_fields")]
    if fields:
        lines += ["Held-out frames in a field (the grade is field-independent; field_extrapolation for "
                  "the head's E_ref):", "",
                  "| head | field (V/A) | atoms above 1 | max grade | field_extrapolation |", "|---|---|---|---|---|"]
        for head, rows in fields:
            h = section["heads"][head]["holdout"]
            lines.append(f"| `{head}` | 0 | {h['atoms_above']} of {h['atoms']} ({100 * h['fraction_above']:.2f}%) | "
                         f"{h['max']:.3g} | 0 |")
            for r in rows:
                lines.append(f"| `{head}` | {r['field_V_per_A']:g} along {r['direction']} | {r['atoms_above']} of "
                             f"{h['atoms']} ({100 * r['fraction_above']:.2f}%) | {r['max']:.3g} | "
                             f"{r['field_extrapolation']:.3g} |")
        lines.append("")
    if section.get("commands"):
        lines += ["Calibrated with (from the repository root):", ""] + [f"    {c}" for c in section["commands"]] + [""]
    if section.get("flags"):
        lines += ["What it flags (measured on this model: "
                  + section.get("flags_command", "tests/test_extrapolation.py") + "):", ""]
        lines += [f"- {f}" for f in section["flags"]] + [""]
    return lines


def exported_text(training: Dict[str, Any]) -> str:
    """Which weights a card's model are: those of the best validation loss, or the last validated epoch."""
    if training.get("exported") == "current":
        return f"exported: the EMA weights at epoch {training.get('exported_epoch')} (no validated checkpoint)"
    if training.get("exported", "best") == "last":
        return (f"exported: the EMA weights after epoch {training.get('exported_epoch')}, the last validated one; "
                f"the lowest validation loss was at epoch {training['best_epoch']}")
    return f"best = exported EMA weights of epoch {training['best_epoch']}"


def export(model, trainer, path, *, fit_summary: Dict, command: str, write_card: bool = True) -> Dict:
    """Write the model (native format, card JSON in its metadata) and, if asked, the card files."""
    path = Path(path)
    card = build_card(model, trainer, fit_summary=fit_summary, command=command)
    save_model(model, path, metadata={"card": card})
    if write_card:
        stem = path.with_suffix("")
        Path(f"{stem}.card.json").write_text(json.dumps(card, indent=1) + "\n")
        Path(f"{stem}.card.md").write_text(card_markdown(card))
    return card


def refresh_card(path, cfg) -> Dict:
    """Recompute the validation numbers of an exported model's card with the current engine; weights unchanged.

    For when the engine's arithmetic changes (e.g. float64 sums of per-atom
    energies): the card's validation block, per-frame rows and goals are
    recomputed on the config's validation frames, its free text (card_info) is
    taken from the config, and the checkpoint and its ``.card.json``/``.card.md``
    are rewritten.  Training facts (epochs, times, command) are kept, except that
    the config's ``export.command``, when set, replaces the command.
    """
    from ..engine.checkpoint import load_model
    from .data import build_graphs, load_all

    path = Path(path)
    model = load_model(path)
    stored = cast(Dict[str, Any], model.metadata)  # load_model always sets it; torch types Module attributes loosely
    card = dict(stored.get("card") or {})
    if not card:
        raise ValueError(f"{path}: no model card in the checkpoint's metadata")
    data = load_all(cfg)
    valid = {name: d["valid"] for name, d in data.items()}
    for samples in valid.values():
        build_graphs(samples, float(cast(torch.Tensor, model.r_max)))
    validation, frames = validate(model, cfg, valid)
    info = dict(cfg.export.card_info)
    goals = info.pop("goals", None)
    card.update(info)
    if cfg.export.command and isinstance(card.get("training"), dict):  # the config names the command to cite
        card["training"] = dict(card["training"], command=cfg.export.command)
    card.update({"validation": validation, "validation_frames": frames, "goals": check_goals(goals, validation)})
    ordered = {k: card[k] for k in card if k != "validation_frames"}
    ordered["validation_frames"] = frames  # last, as export writes it
    metadata = dict(stored, card=ordered)
    cast(Any, model).metadata = metadata
    save_model(model, path)
    stem = path.with_suffix("")
    Path(f"{stem}.card.json").write_text(json.dumps(ordered, indent=1) + "\n")
    Path(f"{stem}.card.md").write_text(card_markdown(ordered))
    return ordered
