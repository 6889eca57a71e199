"""A disk cache of warm-up memory measurements, so that a restarted server skips re-measuring its models.

Measuring a model's memory per pass (:func:`.memory_measure.measure`) runs
five or six passes over two lattices at start-up; for the embedded default
model on a 2-core x86 CPU that is about a quarter of a restart.  The result
depends only on the model as served and on the software measuring it, so it
is stored under a key made of:

* the weights (SHA-256 of every parameter) and the module structure
  (``repr`` of the model: irreps, channels, backend modules);
* dtype, device (the GPU's name on CUDA), default head and cutoff;
* torch's version, the cuEquivariance packages' versions where the model
  uses them (its kernels change a GPU pass's memory), and
  the measuring code's constants (:data:`.memory.CPU_PEAK_PER_SAVED`,
  :data:`.memory.CPU_TIER0_OF_TIER1`, :data:`FORMAT`).

Any change to one of them is a different key, so a stale entry is never
read.  One JSON file per key, written atomically (temporary file + rename:
replicas sharing a directory never read half a file); a missing, unreadable
or malformed file is a miss, and a directory that cannot be written only
logs a warning.  Configured by ``cache_dir`` (docs/serving.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from ..engine.extrapolation import weights_fingerprint
from .memory import CPU_PEAK_PER_SAVED, CPU_TIER0_OF_TIER1, MemoryModel

log = logging.getLogger("macefield.memory")

#: bump when the measurement (lattices, passes, fit) changes: entries of other formats are not read
FORMAT = 1


def default_cache_dir() -> Path:
    """``$MACEFIELD_CACHE_DIR``, else ``$XDG_CACHE_HOME/macefield``, else ``~/.cache/macefield``."""
    explicit = os.environ.get("MACEFIELD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg else Path.home() / ".cache") / "macefield"


def resolve_cache_dir(setting: str) -> Optional[Path]:
    """The directory a ``cache_dir`` setting names: ``"auto"`` (:func:`default_cache_dir`), ``""`` (no cache:
    None) or a path."""
    if setting == "":
        return None
    return default_cache_dir() if setting == "auto" else Path(setting).expanduser()


def measurement_key(served) -> str:
    """SHA-256 (hex) of everything a memory measurement of ``served`` depends on (module docstring)."""
    model, device = served.model, served.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = {
        "format": FORMAT,
        "weights": weights_fingerprint(model),
        "modules": hashlib.sha256(repr(model).encode()).hexdigest(),
        "dtype": str(served.dtype),
        "device": device_name,
        "head": served.default_head,
        "cutoff": served.cutoff,
        "torch": torch.__version__,
        "cuequivariance": _cueq_versions() if served.backend == "cueq" else "unused",
        "cpu_factors": [CPU_PEAK_PER_SAVED[1], CPU_PEAK_PER_SAVED[2], CPU_TIER0_OF_TIER1],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cueq_versions() -> str:
    """The installed cuEquivariance packages that run a cueq model (read from their metadata, nothing imported)."""
    versions = []
    for dist in ("cuequivariance-torch", "cuequivariance-ops-torch"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    return ", ".join(versions)


def load(directory: Path, key: str) -> Optional[MemoryModel]:
    """The stored measurement for ``key``, or None (no entry, or one that cannot be read)."""
    path = directory / f"memory-{key}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        per_edge = tuple(float(x) for x in entry["per_edge"])
        per_atom = tuple(float(x) for x in entry["per_atom"])
        if len(per_edge) != 3 or len(per_atom) != 3 or min(per_edge) <= 0 or min(per_atom) < 0:
            raise ValueError("coefficients out of range")
        return MemoryModel((per_edge[0], per_edge[1], per_edge[2]), (per_atom[0], per_atom[1], per_atom[2]),
                           f"{entry['source']}; cached")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("memory measurement cache: ignoring %s (%s); measuring again", path, exc)
        return None


def store(directory: Path, key: str, memory: MemoryModel) -> None:
    """Write ``memory`` under ``key`` (atomically); a directory that cannot be written logs a warning."""
    entry = {"format": FORMAT, "key": key, "per_edge": list(memory.per_edge), "per_atom": list(memory.per_atom),
             "source": memory.source}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".memory-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, directory / f"memory-{key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("memory measurement cache: cannot write to %s (%s); the next start measures again",
                    directory, exc)


__all__ = ["FORMAT", "default_cache_dir", "load", "measurement_key", "resolve_cache_dir", "store"]
