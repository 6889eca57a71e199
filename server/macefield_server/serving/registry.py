"""The models a server holds: loading, the embedded default, and what ListModels reports.

Default model resolution (no model configured):

1. ``macefield_server/weights/default.pt`` (native checkpoint shipped with the
   package) with its model card ``default.card.json`` beside it;
2. otherwise a small *untrained* built-in FieldMACE (Si, O, Ti, Ba; heads
   ``sio2`` and ``batio3``; 16 channels; fixed seed), reported as
   ``trained: false`` by ListModels.  Its numbers are not physical.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, cast

import torch

from macefield_client.contract import GRADE_OUTPUTS, OUTPUTS, UNITS, ModelInfo

from ..engine import build_field_mace, default_architecture, load_model
from ..engine.cueq import model_backend, resolve_backend, to_cueq
from ..engine.extrapolation import calibrated_heads, statistics_of
from ..weights import DEFAULT_CARD, DEFAULT_MODEL
from .config import ConfigError, ModelConfig
from .memory import Budget, MemoryModel

log = logging.getLogger("macefield.registry")


BUILTIN_ELEMENTS = (8, 14, 22, 56)  # O, Si, Ti, Ba
BUILTIN_HEADS = ("sio2", "batio3")
BUILTIN_SEED = 20240601


@dataclass
class ServedModel:
    """A loaded model plus everything the service needs to know about it."""

    name: str
    model: torch.nn.Module
    default_head: str
    trained: bool = True
    source: str = ""
    description: str = ""
    card_json: str = ""
    is_default: bool = False
    backend_reason: str = ""  #: why the model runs on its backend (logged at load)
    heads: List[str] = field(init=False)
    atomic_numbers: FrozenSet[int] = field(init=False)
    #: peak bytes of an engine pass (measured at warm-up) and the budget they must fit (set by the server)
    memory: Optional["MemoryModel"] = field(default=None, init=False)
    budget: Optional["Budget"] = field(default=None, init=False)
    _head_elements: Optional[Dict[str, FrozenSet[int]]] = field(default=None, init=False, repr=False)
    _cutoff: Optional[Tuple[Any, float]] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.heads = list(getattr(self.model, "heads", None) or ["Default"])
        self.atomic_numbers = frozenset(int(z) for z in self.model.atomic_numbers)
        if not self.default_head:
            self.default_head = self.heads[0]
        if self.default_head not in self.heads:
            raise ValueError(f"default_head: {self.default_head!r} is not a head of {self.name} ({self.heads})")

    @property
    def cutoff(self) -> float:
        """Radial cutoff r_max, Angstrom."""
        r_max = cast(torch.Tensor, self.model.r_max)  # a buffer; torch types Module attributes loosely
        cached = self._cutoff
        if cached is None or cached[0] is not r_max:  # read once per buffer (a float() of a tensor is slow)
            cached = self._cutoff = (r_max, float(r_max))
        return cached[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pair_repulsion(self) -> bool:
        """Whether F includes the checkpoint's ZBL short-range repulsion."""
        return hasattr(self.model, "pair_repulsion_fn")

    @property
    def backend(self) -> str:
        """``"e3nn"`` or ``"cueq"`` (macefield_server.engine.cueq)."""
        return model_backend(self.model)

    @property
    def extrapolation_heads(self) -> List[str]:
        """Heads with extrapolation statistics: their results carry the grade."""
        return calibrated_heads(self.model)

    @property
    def head_elements(self) -> Dict[str, FrozenSet[int]]:
        """{head: atomic numbers it was trained on} (:func:`trained_elements`); computed once."""
        if self._head_elements is None:
            self._head_elements = trained_elements(self.model, self.heads)
        return self._head_elements

    def heads_knowing(self, numbers) -> List[str]:
        """Heads (in the model's order) trained on every element of ``numbers``."""
        wanted = set(int(z) for z in numbers)
        return [h for h in self.heads if wanted <= self.head_elements[h]]

    @property
    def extrapolation_threshold(self) -> float:
        """Grade above which an atom is extrapolating; 0.0 without statistics."""
        stats = statistics_of(self.model)
        return float(stats.threshold) if stats is not None and self.extrapolation_heads else 0.0

    @property
    def field_references(self) -> Dict[str, float]:
        """E_ref (V/A) per head with statistics: the field at which field_extrapolation reaches 1."""
        stats = statistics_of(self.model)
        return {h: float(stats.field_reference(h)) for h in self.extrapolation_heads} if stats is not None else {}

    @property
    def outputs(self) -> List[str]:
        """Output names a request may use for this model (the grade only with statistics)."""
        names = set(OUTPUTS) if self.extrapolation_heads else set(OUTPUTS) - GRADE_OUTPUTS
        return sorted(names)

    @property
    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def info(self) -> ModelInfo:
        """What ListModels and the model-info metric report."""
        return ModelInfo(
            name=self.name,
            is_default=self.is_default,
            heads=list(self.heads),
            default_head=self.default_head,
            atomic_numbers=sorted(self.atomic_numbers),
            cutoff=self.cutoff,
            dtype=str(self.dtype).replace("torch.", ""),
            device=str(self.device),
            backend=self.backend,
            outputs=self.outputs,
            units=dict(UNITS),
            trained=self.trained,
            description=self.description,
            num_parameters=self.num_parameters,
            card_json=self.card_json,
            source=self.source,
            pair_repulsion=self.pair_repulsion,
            extrapolation_heads=self.extrapolation_heads,
            head_elements={h: sorted(z) for h, z in self.head_elements.items()},
            extrapolation_threshold=self.extrapolation_threshold,
            field_references=self.field_references,
        )


def trained_elements(model, heads: List[str]) -> Dict[str, FrozenSet[int]]:
    """{head: the atomic numbers it was trained on}, by the first rule that applies to the head:

    1. its extrapolation statistics (macefield-calibrate, from the training frames): the elements with
       reference atoms;
    2. its atomic reference energies E0: the elements with a non-zero E0 (training fits an E0 for every
       element present in a head's data; an element the head never saw keeps 0);
    3. otherwise (no E0 at all: a foundation or untrained model) every element of the model.
    """
    model_elements = [int(z) for z in model.atomic_numbers]
    stats = statistics_of(model)
    e0 = None
    energies = getattr(getattr(model, "atomic_energies_fn", None), "atomic_energies", None)
    if energies is not None:
        e0 = energies.detach().cpu().double().reshape(-1, len(model_elements))
    found: Dict[str, FrozenSet[int]] = {}
    for i, head in enumerate(heads):
        if stats is not None and head in stats.heads and stats.heads[head]:
            found[head] = frozenset(int(z) for z in stats.heads[head]) & frozenset(model_elements)
            continue
        row = None if e0 is None else e0[min(i, e0.shape[0] - 1)]
        if row is not None and bool((row != 0).any()):
            found[head] = frozenset(z for z, e in zip(model_elements, row.tolist()) if e != 0.0)
        else:
            found[head] = frozenset(model_elements)
    return found


def builtin_default_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The small untrained placeholder model (deterministic: fixed seed)."""
    arch = default_architecture(list(BUILTIN_ELEMENTS), heads=list(BUILTIN_HEADS), channels=16)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(BUILTIN_SEED)
        model = build_field_mace(arch, dtype=dtype)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _read_card(path: Path) -> tuple[str, Dict]:
    if not path.is_file():
        return "", {}
    text = path.read_text()
    try:
        card = json.loads(text)
    except json.JSONDecodeError:
        log.warning("model card %s is not valid JSON; ignored", path)
        return "", {}
    return text, card if isinstance(card, dict) else {}


def _on_backend(model, backend: Optional[str], where: str = ""):
    """(model on the backend ``backend`` resolves to for its device, reason).

    ConfigError (prefixed by ``where``, e.g. ``models[0].``) when the backend cannot be had.
    """
    try:
        resolved, reason = resolve_backend(backend, next(model.parameters()).device)
    except ValueError as exc:
        raise ConfigError(f"{where}{exc}") from exc
    if resolved == "cueq":
        model = to_cueq(model)
    return model, reason


def load_default_model(device: str = "cpu", dtype: Optional[str] = None, backend: Optional[str] = None) -> ServedModel:
    """The embedded default model if it is shipped, else the untrained built-in one."""
    if DEFAULT_MODEL.is_file():
        model = load_model(DEFAULT_MODEL, dtype=dtype, device=device)
        model, reason = _on_backend(model, backend)
        card_text, card = _read_card(DEFAULT_CARD)
        return ServedModel(
            name=str(card.get("name") or "default"),
            model=model,
            default_head=card.get("default_head") or "",
            trained=bool(card.get("trained", True)),
            source=str(DEFAULT_MODEL),
            description=str(card.get("description") or "embedded default MACE-Field model"),
            card_json=card_text,
            is_default=True,
            backend_reason=reason,
        )
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype or "float64"]
    model, reason = _on_backend(builtin_default_model(torch_dtype).to(device), backend)
    return ServedModel(
        name="default",
        model=model,
        default_head=BUILTIN_HEADS[0],
        trained=False,
        source="built-in",
        description="UNTRAINED built-in placeholder (random weights, zero field coupling): "
        "numbers are not physical; ship weights/default.pt or pass --model",
        is_default=True,
        backend_reason=reason,
    )


def load_configured_model(cfg: ModelConfig, backend: Optional[str] = None, where: str = "") -> ServedModel:
    """Load one configured checkpoint (its card ``<stem>.card.json`` is read when present).

    ``cfg.backend`` (else ``backend``, else auto) picks e3nn or cuEquivariance;
    ``where`` prefixes configuration errors (e.g. ``models[0].``).
    """
    if cfg.path is None:
        raise ConfigError(f"{where}path: required")
    path = Path(cfg.path)
    model = load_model(path, trust_pickle=cfg.trust_pickle, dtype=cfg.dtype, device=cfg.device)
    model, reason = _on_backend(model, cfg.backend or backend, where)
    card_text, card = _read_card(path.with_name(path.stem + ".card.json"))
    metadata = getattr(model, "metadata", None) or {}
    return ServedModel(
        name=cfg.name or str(card.get("name") or path.stem),
        model=model,
        default_head=cfg.default_head or card.get("default_head") or "",
        trained=bool(card.get("trained", metadata.get("trained", True))),
        source=str(path),
        description=str(card.get("description") or metadata.get("description") or ""),
        card_json=card_text,
        backend_reason=reason,
    )


class ModelRegistry:
    """Name -> ServedModel; the first model is the default one."""

    def __init__(self, models: List[ServedModel]):
        if not models:
            raise ValueError("models: at least one model is required")
        self._models: Dict[str, ServedModel] = {}
        for m in models:
            if m.name in self._models:
                raise ValueError(f"models: duplicate model name {m.name!r}")
            self._models[m.name] = m
        if not any(m.is_default for m in models):
            models[0].is_default = True
        self.default = next(m for m in models if m.is_default)

    @classmethod
    def from_configs(cls, configs: List[ModelConfig], backend: Optional[str] = None) -> "ModelRegistry":
        """Load ``configs`` (none: the embedded default model); ``backend`` for models that name none."""
        if not configs:
            return cls([load_default_model(backend=backend)])
        return cls([load_configured_model(c, backend, f"models[{i}].") for i, c in enumerate(configs)])

    def get(self, name: Optional[str]) -> ServedModel:
        """The named model (empty: the default); ValueError naming 'model' if unknown."""
        if not name:
            return self.default
        try:
            return self._models[name]
        except KeyError:
            raise ValueError(f"model: unknown model {name!r}; served: {sorted(self._models)}") from None

    def names(self) -> List[str]:
        return sorted(self._models)

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
