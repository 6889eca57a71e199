"""Cost of one training step of ``macefield-train``, per frame, before choosing epochs.

Builds the trainer of a config (datasets, model, loss weights exactly as
``macefield-train`` would, without training) and times, for each dataset,
steps on batches of its training frames:

* ``full``: every weighted loss term, including Born charges and
  polarizability (third-order autograd: the loss gradient differentiates
  second derivatives of the energy);
* ``cheap``: the step that ``optim.response_every > 1`` takes between full
  ones: energy, forces, stress and polarization only.

Each step is loss + backward (no optimiser update, so the model is unchanged),
timed after one warm-up step; the median of ``--repeats`` steps is reported
per frame.  ``epoch_seconds_estimate`` combines them with the number of
training frames per dataset and ``response_every`` (validation excluded).

Usage (from the repository root, data in ../shared/data)::

    python bench/train_step_cost.py --config server/macefield_server/weights/default.stage3.yaml \\
        --threads 1 2 --out bench/results/train_step_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from results_io import write_json

import torch

from macefield_server.training.config import load_config
from macefield_server.training.trainer import Trainer


def time_steps(trainer: Trainer, samples, batch_size: int, step: int, repeats: int) -> float:
    """Median seconds per frame of ``repeats`` loss+backward steps at trainer step number ``step``."""
    trainer.step = step
    times = []
    for r in range(repeats + 1):
        k = (r * batch_size) % max(len(samples) - batch_size + 1, 1)
        chunk = samples[k : k + batch_size]
        t0 = time.perf_counter()
        loss, _ = trainer.step_loss(chunk)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if r:  # the first step warms up
            times.append((time.perf_counter() - t0) / len(chunk))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="macefield-train config (its init_from model is loaded)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch intra-op threads to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as workdir:
        cfg.run.workdir = workdir
        cfg.run.progress = False
        trainer = Trainer(cfg, resume=False)
    k = int(cfg.optim.response_every)
    bs = int(cfg.optim.batch_size)
    by_dataset = {}
    for s in trainer.train_samples:
        by_dataset.setdefault(s.dataset, []).append(s)

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        epoch = {"full_every_step": 0.0, "with_response_every": 0.0}
        for name, samples in by_dataset.items():
            full = time_steps(trainer, samples, bs, 0, args.repeats)
            cheap = time_steps(trainer, samples, bs, 1, args.repeats) if k > 1 else full
            n = len(samples)
            epoch["full_every_step"] += n * full
            epoch["with_response_every"] += n * (full + (k - 1) * cheap) / k
            row = {
                "threads": threads,
                "dataset": name,
                "atoms_per_frame": samples[0].n_atoms,
                "train_frames": n,
                "full_seconds_per_frame": full,
                "cheap_seconds_per_frame": cheap,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append({"threads": threads, "epoch_seconds_estimate": epoch, "response_every": k})
        print(json.dumps(rows[-1]), flush=True)

    result = {
        "benchmark": "train_step_cost",
        "config": str(args.config),
        "model": {"dtype": cfg.model.dtype, "parameters": sum(p.numel() for p in trainer.model.parameters())},
        "batch_size": bs,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
