"""``macefield-train``: train or fine-tune a FieldMACE on extended-XYZ files.

    macefield-train --config server/macefield_server/weights/default.stage1.yaml --workdir /tmp/train/default

Runs resume automatically from ``<workdir>/state.pt`` when it exists (pass
``--restart`` to start over).  ``--export-only`` skips training and exports
the run's checkpoint (with its model card): ``best.pt`` (lowest validation
loss), or ``last.pt`` with ``--export-checkpoint last``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="macefield-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML/TOML/JSON training config")
    p.add_argument("--workdir", help="override run.workdir (checkpoints, metrics.jsonl)")
    p.add_argument("--output", help="override export.path (the final model)")
    p.add_argument("--max-epochs", type=int, help="override optim.max_epochs")
    p.add_argument("--max-minutes", type=float, help="override optim.max_minutes")
    p.add_argument("--restart", action="store_true", help="ignore an existing state.pt and start from scratch")
    p.add_argument("--export-only", action="store_true", help="do not train; export the run's checkpoint with its card")
    p.add_argument("--export-checkpoint", choices=("best", "last"), default="best",
                   help="which EMA weights to export: best.pt (lowest validation loss, default) or last.pt (after "
                        "the latest validated epoch, e.g. the end of a schedule whose loss weights changed)")
    p.add_argument("--refresh-card", metavar="MODEL.pt",
                   help="do not train: recompute the validation numbers of MODEL.pt's card (and its .card.json/.md) "
                        "with the current engine and the config's card text; weights unchanged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from ..training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"macefield-train: {exc}", file=sys.stderr)
        return 2
    if args.workdir:
        cfg.run.workdir = str(Path(args.workdir).resolve())
    if args.output:
        cfg.export.path = str(Path(args.output).resolve())
    if args.max_epochs is not None:
        cfg.optim.max_epochs = args.max_epochs
    if args.max_minutes is not None:
        cfg.optim.max_minutes = args.max_minutes
    if args.no_progress:
        cfg.run.progress = False

    if cfg.run.threads:
        import torch

        torch.set_num_threads(int(cfg.run.threads))
    from ..engine.checkpoint import load_model
    from ..training.card import export, refresh_card
    from ..training.trainer import Trainer, log

    if args.refresh_card:
        card = refresh_card(args.refresh_card, cfg)
        log(f"refreshed the card of {args.refresh_card}")
        for name, d in card["validation"].items():
            log(f"  {name}: " + json.dumps({k: v for k, v in d.items() if not isinstance(v, list)}))
        return 0

    trainer = Trainer(cfg, resume=not args.restart)
    # the command that started the run (kept across resumes) is the one the card reports
    command_file = trainer.workdir / "command.txt"
    invoked = "macefield-train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if not command_file.is_file() or (args.restart and not args.export_only):
        command_file.write_text(invoked + "\n")
    if args.export_only:
        summary_file = trainer.workdir / "fit_summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
        else:  # a run interrupted (or written by an older version): say why it stopped as far as we can tell
            o = cfg.optim
            if trainer.epoch >= o.max_epochs:
                reason = "max_epochs"
            elif o.max_minutes is not None and trainer.elapsed > 60.0 * o.max_minutes:
                reason = f"time limit of {o.max_minutes} minutes"
            elif o.patience is not None and trainer.bad_epochs >= o.patience:
                reason = f"early stopping: no improvement for {o.patience} validations"
            else:
                reason = f"interrupted after epoch {trainer.epoch}; {args.export_checkpoint} checkpoint exported"
            summary = {"epochs": trainer.epoch, "best_epoch": trainer.best_epoch, "elapsed_seconds": trainer.elapsed,
                       "stop_reason": reason}
    else:
        summary = trainer.fit()
        (trainer.workdir / "fit_summary.json").write_text(json.dumps(summary) + "\n")
    chosen = trainer.workdir / f"{args.export_checkpoint}.pt"
    if not chosen.is_file():
        log("no validated checkpoint (no validation split?); exporting the current EMA weights")
        model = trainer.ema_model()
        summary["exported_epoch"] = trainer.epoch
        summary["exported"] = "current"
    else:
        model = load_model(chosen)
        metadata: Dict[str, Any] = dict(getattr(model, "metadata", None) or {})
        summary["exported_epoch"] = metadata.get("epoch")
        summary["exported"] = args.export_checkpoint
    command = cfg.export.command or command_file.read_text().strip()
    target = cfg.export.path and cfg.resolve_path(cfg.export.path, must_exist=False)
    if target:
        card = export(model, trainer, target, fit_summary=summary, command=command, write_card=cfg.export.card)
        log(f"wrote {target}")
        for name, d in card["validation"].items():
            log(f"  {name}: " + json.dumps({k: v for k, v in d.items() if not isinstance(v, list)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
