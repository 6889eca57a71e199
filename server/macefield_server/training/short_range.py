"""Short-range scans: one real pair of atoms pushed together, and the hinge that keeps F rising along them.

A learned potential has no data closer than the shortest pair distance of its
training frames, and there it may extrapolate downwards into deep, unphysical
holes.  A *scan* takes a real frame, picks a pair of atoms of a given pair
type (e.g. Si-O), and moves the second atom of the pair (``moved``) along the
bond towards the first (``anchor``, or the periodic image of it that forms the
pair) to a list of distances; every other atom keeps its position, so every
distance between atoms other than ``moved`` is unchanged.  No labels are
needed: physically the energy rises as two atoms are pushed together below
the closest approach seen in equilibrium MD, at every step over which the
moved atom closes in on (or keeps its distance to) every atom it touches.
A straight path can also take the moved atom past a third atom and then
away from it (an Si pushed towards an Si passes 0.64 A from the O that
bridges them); there the energy may physically fall.  The judge is the
universal screened nuclear repulsion (ZBL), the physics of atoms pushed far
below their bonding distances: :func:`repulsion_falls` marks the steps over
which the ZBL energy of the moved atom with all others does not rise, and
the hinge, the validation counts, the tests and the benchmark exempt them
(the energy must still stay above the scan's start).

:func:`scan_hinge` is the inequality loss on such scans (eV): the mean over
consecutive points of ``relu(margin * (d_k - d_{k+1}) - (F_{k+1} - F_k))``,
zero when F rises by at least ``margin`` eV per A of approach.

The same code builds the scans of the training hinge
(:class:`ScanSampler`), of ``tests/test_short_range.py`` and of
``bench/short_range.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from ase.data import atomic_numbers as _Z
from ase.data import chemical_symbols

from ..engine.core_repulsion import zbl_energy
from ..engine.graph import Structure, pairs

#: the pair types scanned for each head of the default model: (anchor element, moved element)
DEFAULT_PAIRS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "sio2": (("Si", "O"), ("O", "O"), ("Si", "Si")),
    "batio3": (("Ba", "O"), ("Ti", "O"), ("O", "O"), ("Ba", "Ti")),
}

#: largest distance (A) searched for pairs; above every nearest-neighbour distance of the data
SEARCH_CUTOFF = 4.5


def pair_name(pair: Tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def parse_pair(name: str) -> Tuple[str, str]:
    """'Si-O' -> ('Si', 'O'); ValueError naming the text otherwise."""
    parts = name.split("-")
    if len(parts) != 2 or any(p not in _Z for p in parts):
        raise ValueError(f"pair {name!r}: expected two element symbols joined by '-', e.g. 'Si-O'")
    return parts[0], parts[1]


def pair_types(numbers: np.ndarray) -> List[Tuple[str, str]]:
    """Every unordered element pair present in ``numbers`` (symbols, heavier first), as (anchor, moved)."""
    zs = sorted(set(int(z) for z in numbers), reverse=True)
    return [(chemical_symbols[a], chemical_symbols[b]) for k, a in enumerate(zs) for b in zs[k:]]


def typed_pairs(structure: Structure, pair: Tuple[str, str], cutoff: float = SEARCH_CUTOFF):
    """(i, j, S, d) of every pair with atom i of element ``pair[0]`` and atom j of ``pair[1]`` within ``cutoff`` A.

    ``d = |positions[j] + S @ cell - positions[i]|``; each unordered pair of
    like elements appears twice (i-j and j-i).
    """
    if not np.all(structure.pbc):
        raise ValueError("pair scans need a periodic frame (pbc along all three axes)")
    za, zb = _Z[pair[0]], _Z[pair[1]]
    i, j, s, d = pairs(structure.positions, structure.cell, structure.pbc, cutoff)
    keep = (structure.numbers[i] == za) & (structure.numbers[j] == zb)
    return i[keep], j[keep], s[keep], d[keep]


def shortest_distances(structures: Sequence[Structure], pair_list: Sequence[Tuple[str, str]],
                       cutoff: float = SEARCH_CUTOFF) -> Dict[Tuple[str, str], float]:
    """The shortest distance (A) of each pair type of ``pair_list`` over ``structures``, in either order of its
    elements (inf where there is none within ``cutoff``): :func:`shortest_pair_distances` picked out."""
    every = shortest_pair_distances(structures, cutoff)
    return {p: every.get(p if _Z[p[0]] >= _Z[p[1]] else (p[1], p[0]), np.inf) for p in pair_list}


@dataclass
class Scan:
    """One pair of a frame pushed together.

    ``anchor`` stays, ``moved`` is placed at ``distances`` (A) from the
    anchor along their original bond direction; ``shift`` (unit cell shifts)
    is that of :func:`typed_pairs`, ``|positions[moved] + shift @ cell -
    positions[anchor]| = start``, so the anchor as the moved atom sees it is
    ``positions[anchor] - shift @ cell``; ``start`` is their distance in the
    source frame (A), and a scan point at ``start`` is the source frame itself.
    """

    source: Structure
    pair: Tuple[str, str]
    anchor: int
    moved: int
    shift: np.ndarray
    start: float
    distances: np.ndarray

    @cached_property
    def exempt(self) -> np.ndarray:
        """(len(distances) - 1,) bool, True for the steps where the ZBL repulsion falls (:func:`repulsion_falls`)."""
        return repulsion_falls(self)

    def path(self) -> np.ndarray:
        """(len(distances), 3) positions (A) of the moved atom at each distance of the scan."""
        s = self.source
        image = s.positions[self.anchor] - self.shift @ s.cell  # the anchor as the moved atom sees it
        direction = s.positions[self.moved] - image
        direction = direction / np.linalg.norm(direction)
        return image[None, :] + np.asarray(self.distances, dtype=float)[:, None] * direction[None, :]

    def structures(self) -> List[Structure]:
        """The source frame with ``moved`` at each distance of the scan (positions in A)."""
        s = self.source
        out = []
        for point in self.path():
            pos = s.positions.copy()
            pos[self.moved] = point
            out.append(Structure(numbers=s.numbers, positions=pos, cell=s.cell, pbc=s.pbc,
                                 electric_field=s.electric_field, head=s.head))
        return out


def closest_pair_scan(structure: Structure, pair: Tuple[str, str], distances: Sequence[float] | np.ndarray) -> Scan:
    """A scan of the closest pair of type ``pair`` in ``structure`` (ValueError when it has none).

    Ties (a like-element pair appears as i-j and j-i; equal distances to 1e-9 A)
    go to the lowest anchor index, then the lowest moved index, so the scan does
    not depend on the order in which the neighbour search lists its pairs.
    """
    i, j, s, d = typed_pairs(structure, pair)
    if d.size == 0:
        raise ValueError(f"pair {pair_name(pair)}: no such pair within {SEARCH_CUTOFF} A in the frame")
    tied = np.flatnonzero(d <= d.min() + 1e-9)
    k = int(tied[np.lexsort((j[tied], i[tied]))[0]])
    return Scan(structure, pair, int(i[k]), int(j[k]), s[k].astype(float), float(d[k]),
                np.asarray(distances, dtype=float))


def scan_grid(start: float, stop: float = 0.6, step: float = 0.05) -> np.ndarray:
    """Distances from ``start`` down to ``stop`` (both included, A), about ``step`` apart."""
    n = max(int(np.ceil((start - stop) / step - 1e-9)), 1)
    return np.linspace(start, stop, n + 1)


def scan_energies(model, structures: Sequence[Structure], *, chunk: int = 8,
                  keep_graph: bool = False) -> torch.Tensor:
    """F (eV, float64, (len(structures),)) of each structure at zero field, ``chunk`` structures per pass."""
    from ..engine.predict import prepare_batch
    from ..engine.response import respond

    out = []
    for k in range(0, len(structures), chunk):
        batch = prepare_batch(model, structures[k : k + chunk])
        # without a graph to keep, none is built (the parameters may require grad: a training model)
        with torch.set_grad_enabled(keep_graph):
            res = respond(model, batch.tensors, None, frozenset({"energy"}), keep_graph=keep_graph)
        energy = res["energy"]
        assert energy is not None
        out.append(energy.double() if keep_graph else energy.detach().double())
    return torch.cat(out)


def shortest_pair_distances(structures: Sequence[Structure],
                            cutoff: float = SEARCH_CUTOFF) -> Dict[Tuple[str, str], float]:
    """{(A, B), heavier first: shortest distance (A)} of every element pair within ``cutoff`` in ``structures``.

    Periodic or not (unlike :func:`typed_pairs`); one neighbour search per structure.
    """
    out: Dict[Tuple[int, int], float] = {}
    for s in structures:
        i, j, _, d = pairs(s.positions, s.cell, s.pbc, cutoff)
        zi, zj = s.numbers[i].astype(np.int64), s.numbers[j].astype(np.int64)
        key = np.maximum(zi, zj) * 1000 + np.minimum(zi, zj)
        for k in np.unique(key):
            pair = (int(k) // 1000, int(k) % 1000)
            out[pair] = min(out.get(pair, np.inf), float(d[key == k].min()))
    return {(chemical_symbols[a], chemical_symbols[b]): d for (a, b), d in out.items()}


def repulsion_falls(scan: "Scan") -> np.ndarray:
    """(n - 1,) bool: the steps of ``scan`` over which the moved atom's ZBL repulsion does not rise.

    The repulsion is the universal ZBL energy
    (:func:`macefield_server.engine.core_repulsion.zbl_energy`) of the moved
    atom with every other atom (any periodic image, the anchor included)
    within :data:`SEARCH_CUTOFF` of the path's start plus its travel; the
    moved atom's own images move with it and are left out.
    """
    s = scan.source
    travel = float(np.max(np.abs(scan.distances - scan.start)))
    i, j, shifts, _ = pairs(s.positions, s.cell, s.pbc, SEARCH_CUTOFF + travel)
    mine = (i == scan.moved) & (j != scan.moved)
    others = s.positions[j[mine]] + shifts[mine] @ s.cell
    dist = torch.as_tensor(np.linalg.norm(scan.path()[:, None, :] - others[None, :, :], axis=-1))  # (points, others)
    z_other = torch.as_tensor(s.numbers[j[mine]].astype(np.int64)).expand_as(dist)
    z_moved = torch.full_like(z_other, int(s.numbers[scan.moved]))
    # every atom near the path counts at every point (no cutoff inside the sum: atoms crossing a sphere would add
    # jumps of ~0.01 eV that could flip a nearly flat step)
    energy = zbl_energy(dist, z_moved, z_other).sum(-1)
    return (torch.diff(energy) <= 0).numpy()


def scan_hinge(energies: torch.Tensor, distances: torch.Tensor, margin: float = 0.0,
               exempt: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean violation (eV) of ``F`` rising by ``margin`` eV/A along a scan of decreasing ``distances``.

    ``energies``, ``distances``: (..., n) with distances[..., k+1] < distances[..., k].
    ``exempt``: optional (..., n - 1) bool, steps that do not count (where
    the ZBL repulsion falls, :func:`repulsion_falls`; they still count in the
    mean's denominator).
    Zero for a scan that rises at least that steeply at every counted step.
    """
    rise = energies[..., 1:] - energies[..., :-1]
    approach = (distances[..., :-1] - distances[..., 1:]).to(energies.dtype)
    violation = torch.relu(margin * approach - rise)
    if exempt is not None:
        violation = torch.where(exempt.to(violation.device), torch.zeros_like(violation), violation)
    return violation.mean()


def unphysical_falls(scan: "Scan", energies: np.ndarray) -> np.ndarray:
    """Distances (A, the end of each step) at which F does not rise over a step where the ZBL repulsion rises."""
    falls = (np.diff(np.asarray(energies, dtype=float)) <= 0) & ~scan.exempt
    return np.asarray(scan.distances, dtype=float)[1:][falls]


@dataclass
class ShortRangeScanConfig:
    """The short-range hinge term of the training loss (``loss.short_range``); no labels needed.

    Each optimiser step builds ``scans_per_step`` scans from training frames:
    a pair type (of ``pairs``, or every pair type present in the training
    frames of a head when None), a random frame of a head that has it, a
    random atom of the anchor element and its nearest partner of the other
    element, pushed from its real distance through ``points`` distances
    spread evenly (with random jitter) from the training data's shortest
    distance of that pair type down to ``min_distance`` (A).  The loss term
    is :func:`scan_hinge` with ``margin`` (eV per A of approach) in eV,
    times ``weight`` (per eV; 0 disables the term).  With ``fine_step`` > 0
    (A) the ``points`` (then even) come in pairs ``fine_step`` apart: the
    pairs' leading points spread (with jitter) from the shortest distance
    down to ``min_distance + fine_step``, so that besides the rise across the
    whole range the hinge sees the local slope at random places, where a
    coarse grid steps over a dip a few tenths of an A wide.  The scans follow from
    ``seed`` and the step number alone, so a resumed run draws the same ones.
    Validation adds ``weight`` times the hinge of fixed scans (the closest
    pair of each type in the first validation frame of each dataset, every
    ``valid_step`` A) to the validation loss and reports the lowest energy
    along each of them relative to its start (eV).
    """

    weight: float = 0.0
    scans_per_step: int = 1
    points: int = 6
    min_distance: float = 0.6
    margin: float = 1.0
    fine_step: float = 0.0
    pairs: Optional[List[str]] = None
    seed: int = 0
    valid_step: float = 0.1


class ScanSampler:
    """Draws the training scans of :class:`ShortRangeScanConfig` (deterministic in seed and step)."""

    def __init__(self, cfg: ShortRangeScanConfig, structures: Sequence[Structure]):
        self.cfg = cfg
        by_head: Dict[Optional[str], List[Structure]] = {}
        for s in structures:
            by_head.setdefault(s.head, []).append(s)
        wanted = [parse_pair(p) for p in cfg.pairs] if cfg.pairs is not None else None
        self.choices: List[Tuple[Optional[str], Tuple[str, str]]] = []
        self.frames = by_head
        self.shortest: Dict[Tuple[Optional[str], Tuple[str, str]], float] = {}
        for head, frames in by_head.items():
            present = pair_types(np.concatenate([f.numbers for f in frames]))
            chosen = [p for p in present if wanted is None or p in wanted or p[::-1] in wanted]
            for p, d in shortest_distances(frames, chosen).items():
                if np.isfinite(d) and d > cfg.min_distance:
                    self.choices.append((head, p))
                    self.shortest[(head, p)] = d
        if not self.choices:
            raise ValueError("loss.short_range: no pair type of the training frames to scan")

    def scans(self, step: int) -> List[Scan]:
        rng = np.random.default_rng([int(self.cfg.seed), int(step)])
        out = []
        for _ in range(int(self.cfg.scans_per_step)):
            head, pair = self.choices[int(rng.integers(len(self.choices)))]
            frames = self.frames[head]
            frame = frames[int(rng.integers(len(frames)))]
            i, j, s, d = typed_pairs(frame, pair)
            if d.size == 0:
                continue
            anchor = int(rng.choice(np.unique(i)))
            mine = np.flatnonzero(i == anchor)
            k = int(mine[np.argmin(d[mine])])
            top, n, fine = self.shortest[(head, pair)], int(self.cfg.points), float(self.cfg.fine_step)
            lowest = self.cfg.min_distance + fine
            n_lead = n // 2 if fine > 0 else n
            grid = np.linspace(top, lowest, n_lead)
            spacing = (top - lowest) / max(n_lead - 1, 1)
            jitter = rng.uniform(-0.4, 0.4, n_lead) * spacing
            jitter[-1] = 0.0
            grid = np.clip(grid + jitter, lowest, max(min(top, float(d[k])), lowest))
            if fine > 0:
                grid = np.concatenate([grid, grid - fine])
            distances = np.concatenate([[d[k]], np.sort(grid)[::-1]])
            out.append(Scan(frame, pair, anchor, int(j[k]), s[k].astype(float), float(d[k]), distances))
        return out


def validation_scans(structures_by_name: Dict[str, Structure], shortest: Dict[Tuple[Optional[str], Tuple[str, str]],
                     float], cfg: ShortRangeScanConfig) -> Dict[str, Scan]:
    """Fixed scans of the closest pair of each type in one frame per dataset, named 'dataset:A-B'."""
    out = {}
    for name, frame in structures_by_name.items():
        for (head, pair), top in shortest.items():
            if head != frame.head:
                continue
            grid = scan_grid(top, cfg.min_distance, cfg.valid_step)
            out[f"{name}:{pair_name(pair)}"] = closest_pair_scan(frame, pair, grid)
    return out


def validation_frame_scans(model, frames: Sequence[Structure], pair_list: Sequence[Tuple[str, str]], *,
                           valid_start: float = 0.8, step: float = 0.05,
                           stop: float = 0.6) -> Dict[str, Tuple[Scan, np.ndarray]]:
    """{'A-B': (scan, F in eV)}: the closest pair of each type in the first validation frame, pushed together.

    ``frames``: one time-ordered MD file (its last ``1 - valid_start`` are the
    validation frames); each scan runs from the shortest distance of that
    pair type in all ``frames`` down to ``stop`` A, ``step`` A apart; F is
    evaluated in the model's dtype.
    """
    shortest = shortest_distances(frames, pair_list)
    frame = frames[int(round(valid_start * len(frames)))]
    out = {}
    for pair in pair_list:
        scan = closest_pair_scan(frame, pair, scan_grid(shortest[pair], stop, step))
        out[pair_name(pair)] = (scan, scan_energies(model, scan.structures()).numpy())
    return out
