"""Loading, saving and upgrading models.

Two kinds of files are read:

* the **native format** (written by :func:`save_model`): a ``torch.save``
  archive holding only a JSON architecture description, JSON metadata, a
  state dict of tensors and, when the model is calibrated, its extrapolation
  statistics (``"extrapolation"``: JSON text + float64 tensors, see
  :mod:`.extrapolation`; files without them load as before).  It is read with
  ``torch.load(weights_only=True)``, which cannot execute code, so files from
  strangers are safe to open.
* **pickled models**: mace-torch ``.model`` files (whole ``ScaleShiftMACE`` /
  ``MACE`` objects, e.g. foundation models) and the reference MACE-Field
  pickles whose class path is ``mace.modules.extensions.MACEField``.
  Unpickling runs arbitrary code, so these load only with
  ``trust_pickle=True``.  The reference class is mapped onto
  :class:`FieldMACE` while unpickling (the fork need not be installed), and
  every pickled model is rebuilt as a fresh FieldMACE from its state dict.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Union, cast

import torch

from .architecture import build_field_mace, describe_architecture
from .errors import CheckpointError, UntrustedPickleError
from .extrapolation import ExtrapolationStatistics, OutdatedStatistics, attach, statistics_of, weights_fingerprint
from .field_mace import FieldMACE

log = logging.getLogger("macefield.checkpoint")

NATIVE_FORMAT = "macefield-native"
NATIVE_VERSION = 1

#: class paths of the reference implementation that map onto FieldMACE
REFERENCE_CLASS_PATHS = {
    ("mace.modules.extensions", "MACEField"),
    ("mace.modules.models", "MACEField"),
    ("mace.modules.mace_field", "MACEField"),
    ("mace.modules", "MACEField"),
}

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError as exc:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}") from exc


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# --------------------------------------------------------------------- save
def save_model(model: torch.nn.Module, path: Union[str, Path], *, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` in the native safe format (tensors + JSON); returns the path."""
    if not isinstance(model, FieldMACE):
        model = upgrade_to_field(model)
    arch = describe_architecture(model)
    meta = dict(getattr(model, "metadata", None) or {})
    meta.update(metadata or {})
    dtype = next(model.parameters()).dtype
    payload = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "architecture": json.dumps(arch, sort_keys=True),
        "metadata": json.dumps(meta, sort_keys=True),
        "dtype": dtype_name(dtype),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    statistics = statistics_of(model)
    if statistics is not None:
        payload["extrapolation"] = statistics.to_payload()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------- load
#: class paths of the fork's older field model (preprint code); loaded when the parameters match MACEField's
LEGACY_CLASS_PATHS = {("mace.modules.models", "ScaleShiftFieldMACE")}


class LegacyFieldMACE(FieldMACE):
    """Stands in for a legacy ``ScaleShiftFieldMACE`` while unpickling (never built, only inspected)."""

    legacy_path = "mace.modules.models.ScaleShiftFieldMACE"


class _ReferenceUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in LEGACY_CLASS_PATHS:
            return LegacyFieldMACE
        if (module, name) in REFERENCE_CLASS_PATHS or name == "FieldMACE":
            return FieldMACE
        return super().find_class(module, name)


class _ReferencePickleModule:
    """Stands in for the ``pickle`` module inside ``torch.load``."""

    Unpickler = _ReferenceUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _ReferenceUnpickler(file, **kwargs).load()


def _read_native(path: Path) -> Optional[Dict[str, Any]]:
    """The native payload, None if the file is a (code-carrying) pickle."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            return None
        raise CheckpointError(f"{path}: corrupted checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({exc})") from exc
    if not (isinstance(payload, dict) and payload.get("format") == NATIVE_FORMAT):
        raise CheckpointError(
            f"{path}: a tensor file but not a MACE-Field checkpoint (no '{NATIVE_FORMAT}' header); "
            "bare state dicts are not enough to rebuild a model"
        )
    if int(payload.get("format_version", -1)) > NATIVE_VERSION:
        raise CheckpointError(f"{path}: written by a newer version (format {payload['format_version']})")
    return payload


def _model_from_native(payload: Dict[str, Any], path: Path) -> FieldMACE:
    try:
        arch = json.loads(payload["architecture"])
        metadata = json.loads(payload.get("metadata") or "{}")
        dtype = _DTYPES[payload.get("dtype", "float64")]
        model = build_field_mace(arch, dtype=dtype)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: inconsistent native checkpoint ({exc})") from exc
    cast(Any, model).metadata = metadata  # mypy reads undeclared Module attributes as Tensor | Module
    if payload.get("extrapolation") is not None:
        try:
            statistics = ExtrapolationStatistics.from_payload(payload["extrapolation"])
        except OutdatedStatistics as exc:
            # an earlier version's statistics grade other features: the model loads and serves, without a grade
            statistics = None
            log.warning("%s: %s (the grade is off for this model)", path, exc)
            cast(Any, model).metadata = dict(metadata, extrapolation_dropped=str(exc))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: unreadable extrapolation statistics ({exc})") from exc
        if statistics is None:
            pass
        elif statistics.weights is not None and statistics.weights != weights_fingerprint(model):
            # e.g. a checkpoint fine-tuned from a calibrated one: its grade would measure other weights' features
            reason = "its extrapolation statistics were computed for other weights; run macefield-calibrate"
            log.warning("%s: %s (the grade is off for this model)", path, reason)
            cast(Any, model).metadata = dict(metadata, extrapolation_dropped=reason)
        else:
            try:
                attach(model, statistics)
            except ValueError as exc:
                raise CheckpointError(f"{path}: extrapolation statistics do not fit the model ({exc})") from exc
    return model


def _model_from_pickle(path: Path) -> FieldMACE:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ReferencePickleModule)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, AttributeError, ModuleNotFoundError) as exc:
        raise CheckpointError(f"{path}: could not unpickle model ({exc})") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], torch.nn.Module):
        obj = obj["model"]
    if not isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a MACE model")
    dtype = next(obj.parameters()).dtype
    if isinstance(obj, FieldMACE):  # reference MACEField (or the legacy class): rebuild on our class, same parameters
        legacy = isinstance(obj, LegacyFieldMACE)
        try:
            model = build_field_mace(describe_architecture(obj), dtype=dtype)
            missing, unexpected = model.load_state_dict(obj.state_dict(), strict=False)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            if legacy:
                raise CheckpointError(_legacy_message(path, f"its architecture cannot be read ({exc})")) from exc
            raise CheckpointError(f"{path}: cannot rebuild the MACEField model ({exc})") from exc
        if missing or unexpected:
            detail = f"missing {_few(missing)}, unexpected {_few(unexpected)}"
            if legacy:
                raise CheckpointError(
                    _legacy_message(path, f"its parameters do not match the MACEField layout ({detail})")
                )
            raise CheckpointError(f"{path}: MACEField parameters do not map onto FieldMACE ({detail})")
        if legacy:
            cast(Any, model).metadata = {"legacy_class": LegacyFieldMACE.legacy_path}
        return model
    try:
        return upgrade_to_field(obj)
    except CheckpointError as exc:  # its contraction basis contradicts its architecture (.contraction_basis)
        raise CheckpointError(f"{path}: {exc}") from exc


def _few(names, most: int = 6) -> str:
    names = list(names)
    return str(names[:most])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > most else "]")


def _legacy_message(path: Path, why: str) -> str:
    return (
        f"{path}: a legacy {LegacyFieldMACE.legacy_path} checkpoint (the MACE-Field fork's older field model), "
        f"but {why}. Convert it with the fork that wrote it to the current class "
        "mace.modules.extensions.MACEField, then run `macefield-convert --trust-pickle IN OUT` "
        "to get a native checkpoint for this server."
    )


def load_model(
    path: Union[str, Path],
    *,
    trust_pickle: bool = False,
    dtype=None,
    device=None,
) -> FieldMACE:
    """Load a FieldMACE from a native checkpoint or (trusted) pickle.

    Args:
        path: native ``.pt`` file, mace-torch ``.model`` file or reference MACEField pickle.
        trust_pickle: allow unpickling (runs code from the file!).
        dtype: "float64"/"float32" or torch dtype to cast to (None: as stored).
        device: torch device (None: CPU).

    Raises:
        FileNotFoundError, CheckpointError (corrupt/truncated/inconsistent),
        UntrustedPickleError (pickle without trust_pickle).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    payload = _read_native(path)
    if payload is not None:
        model = _model_from_native(payload, path)
    elif not trust_pickle:
        raise UntrustedPickleError(
            f"{path} is a pickled model: loading it runs code stored in the file. "
            "Pass trust_pickle=True (CLI: --trust-pickle) only if you trust its source, "
            "or convert it once with `macefield-convert --trust-pickle IN OUT` to the safe native format."
        )
    else:
        model = _model_from_pickle(path)
        cast(Any, model).metadata = dict(getattr(model, "metadata", None) or {}, source=str(path))
    target = _parse_dtype(dtype)
    if target is not None:
        model = model.to(target)
    if device is not None:
        model = model.to(device)
    return model.eval()


# ------------------------------------------------------------------ upgrade
def upgrade_to_field(model: torch.nn.Module) -> FieldMACE:
    """Turn a mace-torch MACE / ScaleShiftMACE into a FieldMACE with zero field response.

    Every parameter and buffer of ``model`` is copied; ``field_linear`` is set to
    zero so F and forces equal the base model's at any field and dipole, P, Z*,
    alpha are exactly zero.  ``field_feats`` keeps its random initialisation so
    that fine-tuning has a non-zero gradient on ``field_linear`` (two zero
    factors would be a saddle point that training never leaves).
    """
    if isinstance(model, FieldMACE):
        return model
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    new = build_field_mace(describe_architecture(model), dtype=dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    allowed_missing = {k for k in new.state_dict() if k.startswith(("field_feats.", "field_linear."))}
    if not hasattr(model, "scale_shift"):  # plain MACE: identity scale/shift from the description
        allowed_missing |= {"scale_shift.scale", "scale_shift.shift"}
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"cannot upgrade {type(model).__name__}: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        for linear in new.field_linear:
            for p in linear.parameters():
                p.zero_()
    metadata = dict(getattr(model, "metadata", None) or {})
    metadata["upgraded_from"] = type(model).__name__
    cast(Any, new).metadata = metadata
    return new.to(device).eval()
