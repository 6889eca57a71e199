"""Configuration of a ``macefield-train`` run: dataclasses and the YAML/TOML reader.

A config file has the sections ``model``, ``datasets`` (a list), ``loss``,
``optim``, ``run`` and optionally ``export``; every key is documented on the
dataclass below that holds it.  Unknown keys are errors (a typo must not
silently fall back to a default).  Relative paths are resolved against the
directory the command runs in, then against the directory of the config file
and its parents (so ``../shared/data/...`` works from the repository root).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config_files import ConfigError, build, read_mapping
from .short_range import ShortRangeScanConfig, parse_pair

#: quantities a dataset can label, and the loss terms of the same names
QUANTITIES = ("energy", "forces", "stress", "polarization", "born_charges", "polarizability")


@dataclass
class KeySpec:
    """Where one label lives in an extended-XYZ frame and how to convert it.

    ``key``: name in ``atoms.info`` / ``atoms.arrays`` / ``atoms.calc.results``
    (looked up in that order).  ``kind`` selects the unit convention:

    * energy: ``total`` (eV, default).
    * forces: eV/A.  stress: ``ase`` (eV/A^3, (1/Omega) dE/dstrain, default)
      or ``pressure_positive`` (the negative of that, e.g. raw QE output);
      6 Voigt values (xx yy zz yz xz xy) or 9 row-major values.
    * polarization: ``dipole`` (Omega*P in e*A, default) or ``P`` (e/A^2).
    * born_charges: 9 values per atom, row-major Z*[i][j] = d dipole_i / d u_j, e.
    * polarizability: ``extensive`` (d dipole/dE, e*A^2/V, default) or
      ``per_volume`` (dP/dE, e/(V*A)).
    ``scale`` multiplies the value after reading (for other units).
    """

    key: str
    kind: Optional[str] = None
    scale: float = 1.0


@dataclass
class DatasetConfig:
    """One extended-XYZ file and the head it trains.

    ``train`` / ``valid``: [start, stop) fractions of the file, in file order
    (temporally contiguous for MD trajectories; nothing is shuffled across
    time).  ``max_frames`` caps each split (for smoke tests; frames are taken
    evenly spaced).  ``keys`` maps quantity names (see :data:`QUANTITIES`) to
    :class:`KeySpec` or a bare key string; quantities without a key are not
    trained on for this dataset.  ``electric_field``: the key of an applied
    field in V/A, or None for zero field.
    """

    name: str
    path: str
    head: str
    keys: Dict[str, KeySpec] = field(default_factory=dict)
    train: Tuple[float, float] = (0.0, 0.8)
    valid: Tuple[float, float] = (0.8, 1.0)
    max_frames: Optional[int] = None
    electric_field: Optional[str] = None


@dataclass
class CoreRepulsionConfig:
    """``model.core_repulsion``: below the data's shortest pair distances the learned part hands over to ZBL.

    ``width`` (A; 0, the default, leaves the model as it is: one without a
    core repulsion gets none, an ``init_from`` or resumed model with one
    keeps it unchanged): below each
    pair's *inner* distance the learned part fades out over this width and
    the universal ZBL repulsion fades in
    (:mod:`macefield_server.engine.core_repulsion`).  The inner distances are
    measured on the data, per head: the shortest distance of each element
    pair in every frame of that head's datasets (training and validation
    splits, so that no frame of the data is changed); a pair of the model's
    elements that a head's data lacks gets the smallest ratio, over the
    pairs it has, of shortest distance to the sum of the two covalent radii,
    times its own sum.  Also added to (or updated on) an ``init_from`` model
    and a resumed run.
    """

    width: float = 0.0


@dataclass
class ModelConfig:
    """Architecture of a model trained from scratch, or the model to fine-tune.

    ``init_from``: a checkpoint (native, mace-torch ``.model`` or reference
    MACE-Field pickle; the latter two need ``trust_pickle``) to fine-tune;
    plain MACE models are upgraded with ``upgrade_to_field``.  Its heads must
    include every dataset head.  Otherwise a FieldMACE is built from the
    remaining fields (see :func:`macefield_server.engine.default_architecture`).
    ``e0s``: ``least_squares`` (per-element reference energies per head fitted
    to the training frames; the minimum-norm solution when the composition
    never varies), ``zero``, or ``keep`` (fine-tuning: keep the model's).
    ``scale_shift``: ``rms_forces`` (scale = RMS of training forces, shift =
    mean residual energy per atom after E0s, per head) or ``none``.
    ``pair_repulsion``: add mace-torch's ZBL pair repulsion (``ZBLBasis``,
    cut off smoothly at the sum of the two covalent radii, eV) to F, also
    to an ``init_from`` model that has none; as in mace-torch's
    ScaleShiftMACE it is summed with the readouts before the per-head
    scale, so the ZBL energy enters F times ``atomic_inter_scale``.
    ``core_repulsion``: see :class:`CoreRepulsionConfig`.
    ``widen_max_ell``: with ``init_from``, raise the model's edge
    spherical-harmonic order to this value before training, keeping the
    function it computes (:func:`macefield_server.training.widen.widen_max_ell`:
    the same F, forces, dipole, Z* and alpha to the precision of its coupling
    tensors; the new tensor-product paths start with zero output weights and,
    where a product block reads them linearly, learn from the first step).
    """

    channels: int = 32
    max_L: int = 1
    num_interactions: int = 2
    r_max: float = 5.0
    max_ell: int = 3
    correlation: int = 3
    num_bessel: int = 8
    num_polynomial_cutoff: int = 5
    mlp_channels: int = 16
    radial_MLP: List[int] = field(default_factory=lambda: [64, 64, 64])
    dtype: str = "float32"
    e0s: str = "least_squares"
    scale_shift: str = "rms_forces"
    avg_num_neighbors: Optional[float] = None
    init_from: Optional[str] = None
    trust_pickle: bool = False
    pair_repulsion: bool = False
    widen_max_ell: Optional[int] = None
    core_repulsion: CoreRepulsionConfig = field(default_factory=CoreRepulsionConfig)


#: the fields of :class:`ModelConfig` that are arguments of :func:`macefield_server.engine.default_architecture`
ARCHITECTURE_KEYS = ("channels", "max_L", "num_interactions", "r_max", "max_ell", "correlation", "num_bessel",
                     "num_polynomial_cutoff", "mlp_channels", "radial_MLP")


@dataclass
class LossConfig:
    """Weights of the loss terms (0 disables one) and the Huber threshold.

    Each term is the mean Huber loss (threshold ``huber_delta``) of the
    residual divided by ``scales[term]``; a missing scale is taken from the
    training labels (energy: std of the per-atom energy after E0s, at least
    1 meV/atom; forces, stress, born_charges: RMS of the labels;
    polarization: 0.1 of the mean polarization quantum) or is 1 for the
    polarizability, whose residual is measured as the susceptibility
    chi = alpha / (Omega eps0) (dimensionless).  Energies enter per atom.
    The polarization residual is folded by the polarization quanta
    e*a_k/Omega into [-1/2, 1/2) quantum along each lattice vector before the
    loss, so the branch of the label does not matter.

    Keep ``huber_delta`` of order one (in units of the scales): in the linear
    regime the gradients of terms with many components (forces, Z*) nearly
    cancel, and forces stop learning.
    """

    energy: float = 1.0
    forces: float = 100.0
    stress: float = 1.0
    polarization: float = 1.0
    born_charges: float = 100.0
    polarizability: float = 50.0
    huber_delta: float = 3.0
    scales: Dict[str, float] = field(default_factory=dict)
    #: the short-range hinge on synthetic pair scans (see :class:`ShortRangeScanConfig`); off by default
    short_range: ShortRangeScanConfig = field(default_factory=ShortRangeScanConfig)


@dataclass
class OptimConfig:
    """Optimiser, schedule and early stopping.

    ``scheduler``: ``cosine`` (from ``lr`` down to ``lr * min_lr_factor`` over
    ``max_epochs``, after ``warmup_epochs`` of linear warm-up), ``plateau``
    (multiply by ``plateau_factor`` after ``plateau_patience`` epochs without
    improvement) or ``constant``.  ``patience``: stop after that many epochs
    without a better validation loss (None: never).  ``max_minutes``: stop
    after the first epoch that ends past this wall time (None: no limit);
    the best checkpoint so far is exported either way.

    ``response_every``: include the second-order terms (Born charges and
    polarizability, which need third-order autograd and make a step about
    3x dearer) only in every k-th optimiser step, weighted by k there, so
    that the expected gradient over an epoch is that of the full loss; the
    other steps fit energy, forces, stress and polarization alone.  1: every
    step (default).  Validation always evaluates the full loss.
    """

    lr: float = 5e-3
    amsgrad: bool = True
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    batch_size: int = 2
    max_epochs: int = 100
    scheduler: str = "cosine"
    warmup_epochs: int = 1
    min_lr_factor: float = 0.02
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    patience: Optional[int] = 20
    clip_grad_norm: Optional[float] = 100.0
    max_minutes: Optional[float] = None
    valid_every: int = 1
    response_every: int = 1


@dataclass
class RunConfig:
    """Where things go.  ``workdir`` holds checkpoints and ``metrics.jsonl``.

    ``jit_optimize``: leave TorchScript's graph-executor optimisations on.  Off
    by default: after a few calls the profiling executor may replace e3nn's
    scripted functions by differentiable graphs whose backward contains
    ``aten::detach``, which has no batching rule, so the batched
    second-derivative pass (``is_grads_batched``) of the engine fails
    intermittently with "Batching rule not implemented for aten::detach".
    """

    workdir: str = "runs/default"
    seed: int = 1234
    threads: Optional[int] = 1
    progress: bool = True
    jit_optimize: bool = False


@dataclass
class ExportConfig:
    """The final model: EMA weights of the best validation epoch, native format.

    ``path``: where to write it (None: only ``workdir/best.pt``).  ``card``:
    also write ``<stem>.card.json`` and ``<stem>.card.md`` next to it, with
    ``card_info`` (free-form: name, description, citations, license ...)
    merged into the JSON.  ``card_frames``: how many validation frames per
    head get their own line of errors in the card (so that a test can
    recompute them quickly).
    """

    path: Optional[str] = None
    card: bool = True
    card_info: Dict[str, Any] = field(default_factory=dict)
    card_frames: int = 2
    command: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: List[DatasetConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    #: directory of the config file (for resolving relative paths)
    source_dir: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_dir", None)
        return d

    def resolve_path(self, path: str, *, must_exist: bool = True) -> Path:
        """A path from the config: absolute, or relative to cwd, or to the config dir or its parents."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        candidates = [Path.cwd() / p]
        if self.source_dir is not None:
            base = Path(self.source_dir).resolve()
            candidates += [base / p] + [parent / p for parent in base.parents]
        if not must_exist:
            return candidates[0]
        for c in candidates:
            if c.exists():
                return c.resolve()
        raise FileNotFoundError(f"{path}: not found relative to {Path.cwd()} or the config file's directories")


def _build(cls, data: Any, where: str):
    if data is None:
        raise ConfigError(f"{where}: expected a mapping, got nothing")
    return build(cls, data, where)


def _keyspec(value: Any, where: str) -> KeySpec:
    if isinstance(value, str):
        return KeySpec(key=value)
    return _build(KeySpec, value, where)


def config_from_dict(data: Dict[str, Any], source_dir: Optional[str] = None) -> TrainConfig:
    """Validate a plain dict (as read from YAML/TOML) into a :class:`TrainConfig`."""
    data = dict(data or {})
    known = {"model", "datasets", "loss", "optim", "run", "export"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; known: {sorted(known)}")
    datasets = []
    for i, raw in enumerate(data.get("datasets") or []):
        where = f"datasets[{i}]"
        raw = dict(raw)
        keys = {}
        for q, spec in (raw.pop("keys", None) or {}).items():
            if q not in QUANTITIES:
                raise ConfigError(f"{where}.keys: unknown quantity {q!r}; known: {list(QUANTITIES)}")
            keys[q] = _keyspec(spec, f"{where}.keys.{q}")
        ds = _build(DatasetConfig, raw, where)
        ds.keys = keys
        ds.train = tuple(float(x) for x in ds.train)
        ds.valid = tuple(float(x) for x in ds.valid)
        for split in ("train", "valid"):
            lo, hi = getattr(ds, split)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"{where}.{split}: expected 0 <= start <= stop <= 1, got {[lo, hi]}")
        datasets.append(ds)
    if not datasets:
        raise ConfigError("config: 'datasets' must list at least one dataset")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"datasets: names must be unique, got {names}")
    cfg = TrainConfig(
        model=build(ModelConfig, data.get("model") or {}, "model",
                    nested={"core_repulsion": lambda v, w: _build(CoreRepulsionConfig, v, w)}),
        datasets=datasets,
        loss=build(LossConfig, data.get("loss") or {}, "loss",
                   nested={"short_range": lambda v, w: _build(ShortRangeScanConfig, v, w)}),
        optim=_build(OptimConfig, data.get("optim") or {}, "optim"),
        run=_build(RunConfig, data.get("run") or {}, "run"),
        export=_build(ExportConfig, data.get("export") or {}, "export"),
        source_dir=source_dir,
    )
    if cfg.model.dtype not in ("float32", "float64"):
        raise ConfigError(f"model.dtype: expected float32 or float64, got {cfg.model.dtype!r}")
    if cfg.optim.scheduler not in ("cosine", "plateau", "constant"):
        raise ConfigError(f"optim.scheduler: expected cosine, plateau or constant, got {cfg.optim.scheduler!r}")
    if int(cfg.optim.response_every) < 1:
        raise ConfigError(f"optim.response_every: expected an integer >= 1, got {cfg.optim.response_every!r}")
    if cfg.model.e0s not in ("least_squares", "zero", "keep"):
        raise ConfigError(f"model.e0s: expected least_squares, zero or keep, got {cfg.model.e0s!r}")
    if cfg.model.widen_max_ell is not None and (not cfg.model.init_from or int(cfg.model.widen_max_ell) < 0):
        raise ConfigError("model.widen_max_ell: needs model.init_from (the model to widen) and a value >= 0, got "
                          f"{cfg.model.widen_max_ell!r}; a model trained from scratch takes model.max_ell")
    if not cfg.model.core_repulsion.width >= 0:
        raise ConfigError("model.core_repulsion.width: expected a width >= 0 (A), got "
                          f"{cfg.model.core_repulsion.width!r}")
    if cfg.model.scale_shift not in ("rms_forces", "none"):
        raise ConfigError(f"model.scale_shift: expected rms_forces or none, got {cfg.model.scale_shift!r}")
    sr = cfg.loss.short_range
    if sr.weight < 0 or sr.margin < 0:
        raise ConfigError("loss.short_range: weight and margin must be >= 0")
    if int(sr.points) < 1 or int(sr.scans_per_step) < 1:
        raise ConfigError("loss.short_range: points and scans_per_step must be >= 1")
    if not 0.0 < sr.min_distance or not 0.0 < sr.valid_step:
        raise ConfigError("loss.short_range: min_distance and valid_step must be > 0 (A)")
    if sr.fine_step < 0 or (sr.fine_step > 0 and int(sr.points) % 2):
        raise ConfigError("loss.short_range.fine_step: must be >= 0 (A), and with fine_step > 0 points must be even "
                          f"(pairs of points), got fine_step {sr.fine_step}, points {sr.points}")
    for k, name in enumerate(sr.pairs or []):
        try:
            parse_pair(name)
        except ValueError as exc:
            raise ConfigError(f"loss.short_range.pairs[{k}]: {exc}") from None
    unknown_scales = sorted(set(cfg.loss.scales) - set(QUANTITIES))
    if unknown_scales:
        raise ConfigError(f"loss.scales: unknown quantity {unknown_scales}")
    return cfg


def load_config(path) -> TrainConfig:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` config file."""
    path = Path(path)
    return config_from_dict(read_mapping(path), source_dir=str(path.resolve().parent))
