"""Reading labelled extended-XYZ frames into training samples in internal units.

Internal units and conventions (those of the response engine): energy eV,
forces eV/A, stress eV/A^3 with stress = (1/Omega) dE/dstrain (ASE sign),
dipole e*A (the polarization label is stored as the cell dipole Omega*P),
Born charges Z*[k, i, j] = d dipole_i / d u_kj in e, polarizability
d dipole / dE in e*A^2/V (extensive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, cast

import numpy as np
import torch

from macefield_client.contract.labels import as_array as _as_array
from macefield_client.contract.labels import convert
from macefield_client.contract.labels import lookup as _lookup

from ..engine.graph import NeighbourGraph, Structure, collate, neighbour_list
from .config import DatasetConfig, KeySpec, TrainConfig


@dataclass
class Sample:
    """One labelled frame: geometry, head, its neighbour graph and labels (numpy, internal units)."""

    structure: Structure
    dataset: str
    index: int  # frame index in the file
    labels: Dict[str, np.ndarray] = field(default_factory=dict)
    graph: Optional[NeighbourGraph] = None
    e0_total: float = 0.0  # sum of the model's reference energies for this frame's head, eV

    @property
    def n_atoms(self) -> int:
        return self.structure.n_atoms


def convert_label(quantity: str, spec: KeySpec, raw, atoms) -> np.ndarray:
    """One label from its file convention (``spec.kind``, ``spec.scale``) to internal units (see labels.KINDS)."""
    return convert(quantity, raw, atoms, spec.kind, spec.scale)


def split_indices(n: int, span, max_frames: Optional[int] = None) -> List[int]:
    """Frame indices in the contiguous fraction ``span`` = (start, stop) of ``n`` frames."""
    lo, hi = int(round(span[0] * n)), int(round(span[1] * n))
    idx = list(range(lo, hi))
    if max_frames is not None and len(idx) > max_frames:
        pick = np.linspace(0, len(idx) - 1, max_frames).round().astype(int)
        idx = [idx[i] for i in pick]
    return idx


_FRAME_CACHE: Dict[tuple, list] = {}


def read_frames(path) -> list:
    """All frames of an extended-XYZ file (cached per path and modification time; callers must not modify them)."""
    import os

    import ase.io

    key = (os.path.abspath(str(path)), os.stat(path).st_mtime_ns)
    if key not in _FRAME_CACHE:
        if len(_FRAME_CACHE) >= 4:
            _FRAME_CACHE.pop(next(iter(_FRAME_CACHE)))
        _FRAME_CACHE[key] = cast(list, ase.io.read(str(path), ":"))  # index ":" always reads a list of Atoms
    return _FRAME_CACHE[key]


def load_dataset(ds: DatasetConfig, path, frames=None) -> Dict[str, List[Sample]]:
    """The train and valid samples of one dataset (graphs not built yet)."""
    frames = read_frames(path) if frames is None else frames
    out = {}
    for split in ("train", "valid"):
        samples = []
        for i in split_indices(len(frames), getattr(ds, split), ds.max_frames):
            atoms = frames[i]
            fieldv = np.zeros(3)
            if ds.electric_field:
                fieldv = _as_array(_lookup(atoms, ds.electric_field)).reshape(3)
            labels = {}
            for q, spec in ds.keys.items():
                try:
                    raw = _lookup(atoms, spec.key)
                except KeyError as exc:
                    raise KeyError(f"dataset {ds.name!r}, frame {i}: key {spec.key!r} for {q} not found") from exc
                labels[q] = convert_label(q, spec, raw, atoms)
            structure = Structure.from_atoms(atoms, electric_field=fieldv, head=ds.head)
            samples.append(Sample(structure=structure, dataset=ds.name, index=i, labels=labels))
        out[split] = samples
    return out


def load_all(cfg: TrainConfig) -> Dict[str, Dict[str, List[Sample]]]:
    """{dataset name: {"train": [...], "valid": [...]}} for every dataset of the config."""
    return {ds.name: load_dataset(ds, cfg.resolve_path(ds.path)) for ds in cfg.datasets}


def build_graphs(samples: Sequence[Sample], r_max: float) -> None:
    for s in samples:
        if s.graph is None:
            s.graph = neighbour_list(s.structure, r_max)


def _built_graph(s: Sample) -> NeighbourGraph:
    if s.graph is None:
        raise ValueError(f"dataset {s.dataset!r}, frame {s.index}: neighbour graph not built (see build_graphs)")
    return s.graph


def average_neighbours(samples: Sequence[Sample]) -> float:
    edges = sum(_built_graph(s).edge_index.shape[1] for s in samples)
    atoms = sum(s.n_atoms for s in samples)
    return float(edges) / max(atoms, 1)


@dataclass
class Batch:
    """A collated graph plus stacked labels and masks (which graphs carry which label)."""

    tensors: Dict[str, torch.Tensor]
    labels: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]  # per graph (G,) bool
    atom_masks: Dict[str, torch.Tensor]  # per atom (N,) bool, for per-atom labels
    n_atoms: torch.Tensor  # (G,)
    cells: torch.Tensor  # (G, 3, 3)
    samples: List[Sample]


def make_batch(samples: Sequence[Sample], model, dtype: torch.dtype) -> Batch:
    heads = list(model.heads)
    structures = [s.structure for s in samples]
    gb = collate(
        structures,
        [_built_graph(s) for s in samples],
        atomic_numbers=[int(z) for z in model.atomic_numbers],
        head_index=[heads.index(s.structure.head) for s in samples],
        dtype=dtype,
    )
    labels, masks, atom_masks = {}, {}, {}
    n_atoms = [s.n_atoms for s in samples]
    for q, per_atom in (
        ("energy", False),
        ("stress", False),
        ("polarization", False),
        ("polarizability", False),
        ("forces", True),
        ("born_charges", True),
    ):
        have = [q in s.labels for s in samples]
        if not any(have):
            continue
        rows = []
        for s, h in zip(samples, have):
            if h:
                rows.append(s.labels[q] if per_atom else s.labels[q][None])
            else:
                shape = (s.n_atoms,) + ((3,) if q == "forces" else (3, 3)) if per_atom else (1,) + (
                    () if q == "energy" else (3,) if q == "polarization" else (3, 3)
                )
                rows.append(np.zeros(shape))
        labels[q] = torch.as_tensor(np.concatenate(rows), dtype=dtype)
        masks[q] = torch.as_tensor(have)
        if per_atom:
            atom_masks[q] = torch.as_tensor(np.repeat(have, n_atoms))
    return Batch(
        tensors=gb.tensors,
        labels=labels,
        masks=masks,
        atom_masks=atom_masks,
        n_atoms=torch.as_tensor(n_atoms, dtype=dtype),
        cells=torch.as_tensor(np.stack([s.structure.cell for s in samples]), dtype=dtype),
        samples=list(samples),
    )
