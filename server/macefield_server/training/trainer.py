"""The training loop: model set-up, EMA, schedule, early stopping, checkpoints and resume.

Files in ``run.workdir``:

* ``state.pt``: everything needed to resume (weights, EMA weights, optimiser,
  scheduler, epoch, best validation loss, RNG state, elapsed time), written
  atomically after every epoch; tensors and plain data only (loads with
  ``weights_only=True``).
* ``best.pt``: the EMA weights of the best validation epoch, native format.
* ``last.pt``: the EMA weights after the latest epoch, native format.
* ``metrics.jsonl``: one JSON object per epoch.
* ``config.json``: the resolved config of the run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, cast

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols, covalent_radii

from ..engine.architecture import add_pair_repulsion, build_field_mace, default_architecture, describe_architecture
from ..engine.extrapolation import attach, statistics_of
from ..engine.checkpoint import load_model, save_model, upgrade_to_field
from ..engine.core_repulsion import CoreRepulsion, pair_key
from ..engine.field_mace import FieldMACE
from ..engine.predict import predict
from ..engine.response import respond
from .config import ARCHITECTURE_KEYS, QUANTITIES, TrainConfig
from .data import Sample, average_neighbours, build_graphs, load_all, make_batch
from .losses import residuals, total_loss
from .metrics import frame_errors, summarise
from .short_range import (ScanSampler, scan_energies, scan_hinge, shortest_pair_distances, unphysical_falls,
                          validation_scans)
from .widen import widen_max_ell

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: loss terms that need second derivatives of the energy (third-order autograd in training)
_RESPONSE_TERMS = frozenset({"born_charges", "polarizability"})

#: engine outputs needed for each loss term
_NEEDS = {
    "energy": {"energy"},
    "forces": {"forces"},
    "stress": {"stress"},
    "polarization": {"dipole"},
    "born_charges": {"born_charges"},
    "polarizability": {"polarizability"},
}


def log(msg: str) -> None:
    print(f"[macefield-train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- set-up
def _covalent_sum(a: str, b: str) -> float:
    """Sum of the covalent radii (A, ase.data) of elements ``a`` and ``b`` (symbols)."""
    return float(covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])


def fit_e0s(samples: List[Sample], atomic_numbers: List[int]) -> np.ndarray:
    """Least-squares per-element energies (eV) from total energies; minimum norm if rank deficient."""
    rows, energies = [], []
    for s in samples:
        if "energy" not in s.labels:
            continue
        counts = np.array([(s.structure.numbers == z).sum() for z in atomic_numbers], dtype=float)
        rows.append(counts)
        energies.append(float(s.labels["energy"]))
    e0 = np.zeros(len(atomic_numbers))
    if not rows:
        return e0
    a = np.array(rows)
    present = a.sum(axis=0) > 0
    sol, *_ = np.linalg.lstsq(a[:, present], np.array(energies), rcond=None)
    e0[present] = sol
    return e0


def label_scales(samples: List[Sample], cfg: TrainConfig) -> Dict[str, float]:
    """Normalisation of each loss term (see :class:`LossConfig`)."""
    scales = {}
    def collect(q):
        return [s.labels[q] for s in samples if q in s.labels]
    e = [float(s.labels["energy"] - s.e0_total) / s.n_atoms for s in samples if "energy" in s.labels]
    scales["energy"] = max(float(np.std(e)) if len(e) > 1 else 0.0, 1e-3)
    for q in ("forces", "stress", "born_charges"):
        vals = collect(q)
        scales[q] = float(np.sqrt(np.mean(np.concatenate([v.reshape(-1) for v in vals]) ** 2))) if vals else 1.0
    quanta = [np.linalg.norm(s.structure.cell, axis=1).mean() / s.structure.volume
              for s in samples if "polarization" in s.labels]
    scales["polarization"] = 0.1 * float(np.mean(quanta)) if quanta else 1.0
    scales["polarizability"] = 1.0
    for q, v in cfg.loss.scales.items():
        scales[q] = float(v)
    for q in QUANTITIES:
        if not scales.get(q):
            scales[q] = 1.0
    return scales


#: largest change of F (eV/atom) and of the forces (relative to the largest force) on a training frame that
#: model.widen_max_ell may cause, per dtype (measured on the shipped float32 model: 3e-9 eV/atom and 6e-7 in
#: float32, 3e-12 eV/atom and 5e-10 evaluated in float64)
WIDEN_TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-9, 1e-8)}


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = True):
        self.cfg = cfg
        self.workdir = cfg.resolve_path(cfg.run.workdir, must_exist=False)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.run.threads:
            torch.set_num_threads(int(cfg.run.threads))
        if not cfg.run.jit_optimize:
            torch._C._set_graph_executor_optimize(False)  # pylint: disable=protected-access
        self.dtype = _DTYPES[cfg.model.dtype]
        self.state_path = self.workdir / "state.pt"
        self.resuming = resume and self.state_path.is_file()

        log("reading datasets")
        self.data = load_all(cfg)
        self.train_samples = [s for d in self.data.values() for s in d["train"]]
        self.valid = {name: d["valid"] for name, d in self.data.items()}
        for name, d in self.data.items():
            log(f"  {name}: {len(d['train'])} train / {len(d['valid'])} valid frames")

        state = None
        if self.resuming:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            arch = json.loads(state["architecture"])
            self.model = build_field_mace(arch, dtype=self.dtype)
            self.model.load_state_dict(state["model"])
            log(f"resuming from {self.state_path} after epoch {state['epoch']}")
        else:
            self.model = self._initial_model()

        r_max = float(cast(torch.Tensor, self.model.r_max))  # a buffer; torch types Module attributes loosely
        all_samples = self.train_samples + [s for v in self.valid.values() for s in v]
        build_graphs(all_samples, r_max)
        heads = list(self.model.heads)
        for s in all_samples:
            if s.structure.head not in heads:
                raise ValueError(f"dataset {s.dataset!r}: head {s.structure.head!r} not in the model's heads {heads}")
        self._set_e0_totals(all_samples)
        if cfg.model.core_repulsion.width > 0:
            self._set_core_repulsion(all_samples)

        if state is None:
            self._fit_references()
        self.scales = label_scales(self.train_samples, cfg)
        self.weights = {q: float(getattr(cfg.loss, q)) for q in QUANTITIES}
        sr = cfg.loss.short_range
        self.scan_sampler = None
        self.valid_scans: Dict = {}
        if sr.weight > 0:
            self.scan_sampler = ScanSampler(sr, [s.structure for s in self.train_samples])
            firsts = {name: v[0].structure for name, v in self.valid.items() if v}
            self.valid_scans = validation_scans(firsts, self.scan_sampler.shortest, sr)
            log(f"  short-range hinge: weight {sr.weight}/eV, {sr.scans_per_step} scan(s) of {sr.points + 1} points "
                f"per step; pair types {[f'{h}:{a}-{b}' for h, (a, b) in self.scan_sampler.choices]}")
        self.valid_outputs = frozenset(
            {"energy", "forces", "stress", "dipole", "polarization", "born_charges", "polarizability"}
        )

        o = cfg.optim
        decay: List[torch.nn.Parameter] = []
        no_decay: List[torch.nn.Parameter] = []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 or "scale_shift" in name else decay).append(p)
        self.optimizer = torch.optim.Adam(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            amsgrad=o.amsgrad,
        )
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.generator = torch.Generator().manual_seed(int(cfg.run.seed))
        self.epoch = 0
        self.step = 0
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.elapsed = 0.0
        self.lr_factor = 1.0
        self.plateau_best = math.inf
        self.plateau_bad = 0
        if state is not None:
            self._load_state(state)
        (self.workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=list))

    # -- model construction
    def _initial_model(self):
        m = self.cfg.model
        heads = []
        for ds in self.cfg.datasets:
            if ds.head not in heads:
                heads.append(ds.head)
        if m.init_from:
            path = self.cfg.resolve_path(m.init_from)
            log(f"fine-tuning {path}")
            model = load_model(path, trust_pickle=m.trust_pickle, dtype=self.dtype)
            model = upgrade_to_field(model).to(self.dtype)
            if m.pair_repulsion and not hasattr(model, "pair_repulsion_fn"):
                self._add_pair_repulsion(model)
            if statistics_of(model) is not None:  # they describe the weights before fine-tuning
                attach(model, None)
                log(f"  dropped the extrapolation statistics of {path.name}: "
                    "calibrate the result with macefield-calibrate")
            missing = [h for h in heads if h not in list(model.heads)]
            if missing:
                raise ValueError(f"model.init_from: the model has heads {list(model.heads)}, datasets need {missing}")
            zs = set(int(z) for s in self.train_samples for z in s.structure.numbers)
            extra = sorted(zs - set(int(z) for z in model.atomic_numbers))
            if extra:
                raise ValueError(f"model.init_from: elements {extra} of the data are not in the model")
            if m.widen_max_ell is not None:
                model = self._widen(model, int(m.widen_max_ell))
            return model.train()
        zs = sorted(set(int(z) for s in self.train_samples for z in s.structure.numbers))
        zs = sorted(set(zs) | set(int(z) for d in self.valid.values() for s in d for z in s.structure.numbers))
        # avg_num_neighbors from the training graphs
        build_graphs(self.train_samples, m.r_max)
        avg = m.avg_num_neighbors or average_neighbours(self.train_samples)
        arch = default_architecture(
            zs, heads=heads, avg_num_neighbors=avg, **{key: getattr(m, key) for key in ARCHITECTURE_KEYS})
        arch["pair_repulsion"] = bool(m.pair_repulsion)
        torch.manual_seed(int(self.cfg.run.seed))
        log(f"new FieldMACE: {len(heads)} heads {heads}, elements {zs}, avg_num_neighbors {avg:.2f}")
        return build_field_mace(arch, dtype=self.dtype).train()

    def _widen(self, model: FieldMACE, max_ell: int) -> FieldMACE:
        """The model with edge harmonics up to ``max_ell``; checked to give the same F and forces on a training frame.

        Raises RuntimeError when F or the forces moved by more than the round-off of the model's dtype
        (:data:`WIDEN_TOLERANCE`).
        """
        before = int(describe_architecture(model)["max_ell"])
        wide = widen_max_ell(model, max_ell, seed=int(self.cfg.run.seed))
        if wide is model:
            log(f"  model.widen_max_ell: the model already has max_ell {max_ell}")
            return model
        frame = self.train_samples[0].structure
        old, new = (predict(x.eval(), frame, outputs=("energy", "forces"))[0] for x in (model, wide))
        d_energy = abs(float(new["energy"]) - float(old["energy"])) / len(frame.numbers)
        d_forces = float(np.abs(new["forces"] - old["forces"]).max()) / max(float(np.abs(old["forces"]).max()), 1e-3)
        log(f"  raised max_ell {before} -> {max_ell} (the new paths start silent): on the first training frame "
            f"F changed by {d_energy:.1e} eV/atom and the forces by {d_forces:.1e} of the largest")
        energy_tolerance, forces_tolerance = WIDEN_TOLERANCE[self.dtype]
        if d_energy > energy_tolerance or d_forces > forces_tolerance:
            raise RuntimeError(f"model.widen_max_ell changed the model's function by more than round-off "
                               f"({energy_tolerance:.0e} eV/atom, {forces_tolerance:.0e} of the forces): "
                               "the weights were not carried over")
        return wide

    def _set_core_repulsion(self, samples) -> None:
        """Give the model the core repulsion of ``model.core_repulsion`` with inner distances from ``samples``."""
        net: Any = self.model  # mace's buffers and attributes, read duck-typed
        heads = list(net.heads)
        symbols = [chemical_symbols[int(z)] for z in net.atomic_numbers]
        every_pair = [(a, b) for k, a in enumerate(symbols) for b in symbols[k:]]
        current = getattr(net, "core_repulsion", None)
        # heads without frames in this run keep what the model has (a fine-tune on some heads changes only those)
        inner: Dict[str, Dict[str, float]] = dict(current.spec()["inner"]) if current is not None else {}
        for head in heads:
            frames = [s.structure for s in samples if s.structure.head == head]
            if not frames:
                continue
            found = {pair_key(a, b): d for (a, b), d in shortest_pair_distances(frames).items()}
            if not found:
                continue
            ratio = min(d / _covalent_sum(*name.split("-")) for name, d in found.items())
            inner[head] = {pair_key(a, b): found.get(pair_key(a, b), ratio * _covalent_sum(a, b))
                           for a, b in every_pair}
        width = float(self.cfg.model.core_repulsion.width)
        wanted = CoreRepulsion(net.atomic_numbers.tolist(), heads, inner, width).spec()
        if current is not None and current.spec() == wanted:
            return
        net.set_core_repulsion(wanted)
        log(f"  core repulsion (model.core_repulsion): the learned part fades out over {width} A below "
            f"the data's shortest pair distances, ZBL fades in; inner distances (A) "
            f"{ {h: {k: round(v, 3) for k, v in d.items()} for h, d in inner.items()} }")

    def _add_pair_repulsion(self, model):
        """Add ZBL to a fine-tuned model, moving each head's shift so that its mean training energy stays put."""
        heads = list(model.heads)
        structures = [s.structure for s in self.train_samples]
        model.eval()
        before = scan_energies(model, structures)
        add_pair_repulsion(model)
        after = scan_energies(model, structures)
        n_atoms = torch.as_tensor([s.n_atoms for s in structures], dtype=torch.float64)
        per_atom = (after - before) / n_atoms
        with torch.no_grad():
            shift = model.scale_shift.shift
            sh = torch.atleast_1d(shift.detach().clone())
            for h, head in enumerate(heads):
                mine = torch.as_tensor([s.head == head for s in structures])
                if mine.any():
                    sh[h] -= float(per_atom[mine].mean())
                    log(f"  head {head}: ZBL adds {1e3 * float(per_atom[mine].mean()):.2f} meV/atom to the "
                        "training frames on average; moved into the shift")
            shift.copy_(sh.reshape(shift.shape))
        log("  added the ZBL pair repulsion (model.pair_repulsion)")

    def _set_e0_totals(self, samples):
        e0 = self.model.atomic_energies_fn.atomic_energies.detach().double().numpy()
        e0 = np.atleast_2d(e0)
        zs = [int(z) for z in self.model.atomic_numbers]
        heads = list(self.model.heads)
        for s in samples:
            row = e0[heads.index(s.structure.head)]
            s.e0_total = float(sum(row[zs.index(int(z))] for z in s.structure.numbers))

    def _fit_references(self):
        """E0s and per-head scale/shift from the training labels (new models; fine-tuning per config)."""
        m = self.cfg.model
        model = self.model
        zs = [int(z) for z in model.atomic_numbers]
        heads = list(model.heads)
        with torch.no_grad():
            buf = model.atomic_energies_fn.atomic_energies
            e0 = np.atleast_2d(buf.detach().double().numpy()).copy()
            if m.e0s != "keep":
                for h, head in enumerate(heads):
                    samples = [s for s in self.train_samples if s.structure.head == head]
                    if not samples:
                        continue
                    e0[h] = fit_e0s(samples, zs) if m.e0s == "least_squares" else 0.0
                buf.copy_(torch.as_tensor(e0, dtype=buf.dtype).reshape(buf.shape))
            self._set_e0_totals(self.train_samples + [s for v in self.valid.values() for s in v])
            if m.scale_shift == "rms_forces" and hasattr(model, "scale_shift"):
                scale = model.scale_shift.scale
                shift = model.scale_shift.shift
                sc = torch.atleast_1d(scale.detach().clone())
                sh = torch.atleast_1d(shift.detach().clone())
                for h, head in enumerate(heads):
                    samples = [s for s in self.train_samples if s.structure.head == head]
                    f = [s.labels["forces"].reshape(-1) for s in samples if "forces" in s.labels]
                    if f:
                        sc[h] = float(np.sqrt(np.mean(np.concatenate(f) ** 2)))
                    e = [(float(s.labels["energy"]) - s.e0_total) / s.n_atoms for s in samples if "energy" in s.labels]
                    if e:
                        sh[h] = float(np.mean(e))
                scale.copy_(sc.reshape(scale.shape))
                shift.copy_(sh.reshape(shift.shape))
        for h, head in enumerate(heads):
            log(
                f"  head {head}: E0 {dict(zip(zs, np.round(e0[h], 4).tolist()))}, "
                f"scale {float(torch.atleast_1d(model.scale_shift.scale)[h]):.4f}, "
                f"shift {float(torch.atleast_1d(model.scale_shift.shift)[h]):.5f}"
            )

    # -- state
    def _state(self) -> Dict:
        return {
            "architecture": json.dumps(self._architecture()),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "ema": [t.clone() for t in self.ema],
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "elapsed": self.elapsed,
            "lr_factor": self.lr_factor,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def _architecture(self):
        return describe_architecture(self.model)

    def _load_state(self, state):
        self.ema = [t.to(self.dtype) for t in state["ema"]]
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        for k in ("epoch", "step", "best_loss", "best_epoch", "bad_epochs", "elapsed", "lr_factor", "plateau_best",
                  "plateau_bad"):
            setattr(self, k, state[k])

    def save_state(self):
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, self.state_path)

    # -- EMA
    def _ema_update(self):
        d = self.cfg.optim.ema_decay
        decay = min(d, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    def ema_model(self):
        """A copy of the model carrying the EMA weights (eval mode)."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.ema):
                p.copy_(e)
        model.arch_config = self._architecture()
        return model.eval()

    # -- schedule
    def _lr_at(self, epoch_float: float) -> float:
        o = self.cfg.optim
        if o.warmup_epochs and epoch_float < o.warmup_epochs:
            warm = (epoch_float + 1e-3) / o.warmup_epochs
        else:
            warm = 1.0
        if o.scheduler == "cosine":
            t = min(max(epoch_float - o.warmup_epochs, 0.0) / max(o.max_epochs - o.warmup_epochs, 1), 1.0)
            f = o.min_lr_factor + (1.0 - o.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        elif o.scheduler == "plateau":
            f = self.lr_factor
        else:
            f = 1.0
        return o.lr * f * min(warm, 1.0)

    # -- one epoch
    def _batches(self) -> List[List[Sample]]:
        perm = torch.randperm(len(self.train_samples), generator=self.generator).tolist()
        bs = max(int(self.cfg.optim.batch_size), 1)
        return [[self.train_samples[i] for i in perm[k : k + bs]] for k in range(0, len(perm), bs)]

    def _step_weights(self) -> Dict[str, float]:
        """Loss weights of the current step (see ``OptimConfig.response_every``)."""
        k = int(self.cfg.optim.response_every)
        if k == 1:
            return self.weights
        full = self.step % k == 0
        return {q: (w * k if full else 0.0) if q in _RESPONSE_TERMS else w for q, w in self.weights.items()}

    def step_loss(self, chunk: List[Sample]):
        """Training loss of one batch at the current step (differentiable) and its terms."""
        batch = make_batch(chunk, self.model, self.dtype)
        weights = self._step_weights()
        quantities = [q for q, w in weights.items() if w > 0]
        outputs = frozenset({"energy"}.union(*(_NEEDS[q] for q in quantities)))
        # respond sets every key it returns to a tensor (its declared value type is Optional)
        out = cast(Dict[str, torch.Tensor], respond(self.model, batch.tensors, None, outputs, keep_graph=True))
        res = residuals(out, batch, quantities)
        loss, terms = total_loss(res, weights, self.scales, self.cfg.loss.huber_delta)
        if self.scan_sampler is not None:
            hinge = self.short_range_hinge(self.model, self.scan_sampler.scans(self.step), keep_graph=True)
            terms["short_range"] = hinge
            loss = loss + self.cfg.loss.short_range.weight * hinge
        return loss, terms

    def short_range_hinge(self, model, scans, *, keep_graph: bool) -> torch.Tensor:
        """Mean :func:`scan_hinge` (eV) of ``scans`` (see ``loss.short_range``), steps where ZBL falls exempt."""
        structures = [s for scan in scans for s in scan.structures()]
        energies = scan_energies(model, structures, keep_graph=keep_graph)
        margin = float(self.cfg.loss.short_range.margin)
        out, k = [], 0
        for scan in scans:
            n = len(scan.distances)
            exempt = torch.as_tensor(scan.exempt)
            out.append(scan_hinge(energies[k : k + n], torch.as_tensor(scan.distances), margin, exempt))
            k += n
        return torch.stack(out).mean()
    def train_epoch(self) -> Dict[str, float]:
        self.model.train()
        batches = self._batches()
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        n = 0
        bar = None
        if self.cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {self.epoch + 1}", leave=False, file=sys.stderr,
                       mininterval=30.0)
        for k, chunk in enumerate(batches):
            lr = self._lr_at(self.epoch + k / len(batches))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, terms = self.step_loss(chunk)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.optim.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
            self.optimizer.step()
            self._ema_update()
            self.step += 1
            n += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            counts["loss"] = n
            for q, t in terms.items():
                sums[q] = sums.get(q, 0.0) + float(t.detach())
                counts[q] = counts.get(q, 0) + 1
            if bar is not None:
                bar.set_postfix(loss=f"{sums['loss'] / n:.4g}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        # each term is averaged over the steps that included it (response_every)
        return {k: v / counts[k] for k, v in sums.items()}

    def validate(self, model=None) -> Dict:
        """Validation loss (same weights as training) and per-dataset metrics of the EMA model."""
        model = model or self.ema_model()
        total, count = 0.0, 0
        datasets = {}
        for name, samples in self.valid.items():
            if not samples:
                continue
            losses = []

            def add_loss(out, batch):
                res = residuals(out, batch, [q for q, w in self.weights.items() if w > 0])
                loss, _ = total_loss(res, self.weights, self.scales, self.cfg.loss.huber_delta)
                losses.append(float(loss) * len(batch.samples))

            rows = frame_errors(model, samples, on_output=add_loss)
            loss_sum = sum(losses)
            datasets[name] = summarise(rows)
            datasets[name]["loss"] = loss_sum / len(samples)
            total += loss_sum
            count += len(samples)
        result: Dict[str, Any] = {"loss": total / max(count, 1), "datasets": datasets}
        if self.valid_scans:
            result["short_range"] = self.validate_scans(model)
            result["loss"] += self.cfg.loss.short_range.weight * result["short_range"]["hinge"]
        return result

    def validate_scans(self, model) -> Dict:
        """Hinge (eV) of the fixed validation scans, the lowest F along each relative to its start (eV), and the
        number of steps along each where F does not rise although the ZBL repulsion does (0: none;
        :func:`.short_range.repulsion_falls`)."""
        hinges, lowest, falls = [], {}, {}
        for name, scan in self.valid_scans.items():
            energies = scan_energies(model, scan.structures()).detach()
            hinges.append(float(scan_hinge(energies, torch.as_tensor(scan.distances),
                                           float(self.cfg.loss.short_range.margin), torch.as_tensor(scan.exempt))))
            lowest[name] = float((energies - energies[0]).min())
            falls[name] = int(len(unphysical_falls(scan, energies.numpy())))
        return {"hinge": float(np.mean(hinges)), "min_energy_rel_start_eV": lowest, "falls": falls}

    # -- main loop
    def fit(self) -> Dict:
        o = self.cfg.optim
        metrics_path = self.workdir / "metrics.jsonl"
        stop_reason = "max_epochs"
        started = time.time() - self.elapsed
        while self.epoch < o.max_epochs:
            if o.max_minutes is not None and self.elapsed > 60.0 * o.max_minutes:  # resumed after the limit
                stop_reason = f"time limit of {o.max_minutes} minutes"
                break
            t0 = time.time()
            train_metrics = self.train_epoch()
            self.epoch += 1
            record = {
                "epoch": self.epoch,
                "step": self.step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train": train_metrics,
                "train_seconds": time.time() - t0,
            }
            validate = self.epoch % max(o.valid_every, 1) == 0 or self.epoch == o.max_epochs
            if validate:
                t1 = time.time()
                ema = self.ema_model()
                val = self.validate(ema)
                record["valid"] = val
                record["valid_seconds"] = time.time() - t1
                if val["loss"] < self.best_loss:
                    self.best_loss = val["loss"]
                    self.best_epoch = self.epoch
                    self.bad_epochs = 0
                    save_model(ema, self.workdir / "best.pt", metadata={"epoch": self.epoch, "valid_loss": val["loss"]})
                else:
                    self.bad_epochs += 1
                if o.scheduler == "plateau":
                    if val["loss"] < self.plateau_best:
                        self.plateau_best, self.plateau_bad = val["loss"], 0
                    else:
                        self.plateau_bad += 1
                        if self.plateau_bad >= o.plateau_patience:
                            self.lr_factor *= o.plateau_factor
                            self.plateau_bad = 0
                save_model(ema, self.workdir / "last.pt", metadata={"epoch": self.epoch})
            self.elapsed = time.time() - started
            record["elapsed_seconds"] = self.elapsed
            record["best_epoch"] = self.best_epoch
            self.save_state()
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            log(self._summary_line(record))
            if o.patience is not None and self.bad_epochs >= o.patience:
                stop_reason = f"early stopping: no improvement for {o.patience} validations"
                break
            if o.max_minutes is not None and self.elapsed > 60.0 * o.max_minutes and self.epoch < o.max_epochs:
                stop_reason = f"time limit of {o.max_minutes} minutes"
                break
        log(f"stopped after epoch {self.epoch} ({stop_reason}); best epoch {self.best_epoch}")
        return {"stop_reason": stop_reason, "epochs": self.epoch, "best_epoch": self.best_epoch,
                "elapsed_seconds": self.elapsed}

    @staticmethod
    def _summary_line(rec) -> str:
        parts = [f"epoch {rec['epoch']}", f"lr {rec['lr']:.2e}", f"train {rec['train'].get('loss', float('nan')):.4g}"]
        if "short_range" in rec["train"]:
            parts.append(f"hinge {rec['train']['short_range']:.3g} eV")
        if "valid" in rec:
            parts.append(f"valid {rec['valid']['loss']:.4g}")
            for name, d in rec["valid"]["datasets"].items():
                bits = []
                for key, fmt in (
                    ("energy_mae_meV_per_atom", "E {:.2f}"),
                    ("forces_mae_meV_per_A", "F {:.0f}"),
                    ("born_charges_mae_e", "Z {:.3f}"),
                    ("polarizability_rel_error", "a {:.3f}"),
                    ("polarization_folded_mae_e_per_A2", "P {:.1e}"),
                ):
                    if key in d:
                        bits.append(fmt.format(d[key]))
                parts.append(f"{name}[{' '.join(bits)}]")
            if "short_range" in rec["valid"]:
                scans = rec["valid"]["short_range"]
                worst = min(scans["min_energy_rel_start_eV"].values())
                falling = sum(1 for n in scans["falls"].values() if n)
                parts.append(f"scan hinge {scans['hinge']:.3g} eV, deepest {worst:.3g} eV, "
                             f"{falling} of {len(scans['falls'])} scans fall somewhere")
        parts.append(f"{rec['train_seconds']:.0f}s")
        return " | ".join(parts)
