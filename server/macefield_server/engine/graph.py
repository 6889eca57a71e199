"""Structures and batched neighbour graphs.

A :class:`Structure` is one request's geometry and field, in plain numpy.
:func:`neighbour_list` builds its radius graph (CPU, numpy; vesin, or matscipy as
the reference: :data:`NEIGHBOUR_BACKENDS`) and
:func:`collate` packs many graphs into the tensor dict that
:meth:`FieldMACE.enthalpy` reads.  Units: Angstrom, V/Angstrom.

Volumes: a structure is *periodic* only when all three directions are; only
then does it have a volume Omega = |det(cell)|, a stress, a polarization and a
susceptibility.  Molecules and slabs get dipole, Born charges and
polarizability only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import functools
import math
import threading

import numpy as np
import torch

#: cells whose |det| is below this (Angstrom^3) count as singular
MIN_VOLUME = 1e-6


@dataclass
class Structure:
    """One atomic structure with its applied field.

    Attributes:
        numbers: (N,) atomic numbers.
        positions: (N, 3) Cartesian positions, Angstrom.
        cell: (3, 3) lattice vectors as rows, Angstrom (ignored along non-periodic directions).
        pbc: (3,) periodicity flags.
        electric_field: (3,) uniform field, V/Angstrom.
        head: head name (None: the model's default head).
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    electric_field: np.ndarray = field(default_factory=lambda: np.zeros(3))
    head: Optional[str] = None
    #: |det(cell)| when it was computed before (a validated structure), else None; see :attr:`volume`
    _volume: Optional[float] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(3)
        self.electric_field = np.asarray(self.electric_field, dtype=np.float64).reshape(3)
        if self.positions.shape[0] != self.numbers.shape[0]:
            raise ValueError(
                f"positions: {self.positions.shape[0]} rows for {self.numbers.shape[0]} atomic numbers"
            )

    @classmethod
    def of_arrays(cls, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                  electric_field: np.ndarray, head: Optional[str] = None,
                  volume: Optional[float] = None) -> "Structure":
        """From arrays already of the attributes' dtypes and shapes (no conversion; a validated request's).

        ``volume``: ``abs(det(cell))`` as :attr:`volume` computes it, when the caller has it (None: computed
        on use).
        """
        structure = cls.__new__(cls)
        structure.numbers, structure.positions, structure.cell = numbers, positions, cell
        structure.pbc, structure.electric_field, structure.head = pbc, electric_field, head
        structure._volume = volume
        return structure

    @classmethod
    def from_atoms(cls, atoms, electric_field=None, head: Optional[str] = None) -> "Structure":
        """From an ``ase.Atoms``; the field defaults to (0, 0, 0)."""
        return cls(
            numbers=atoms.get_atomic_numbers(),
            positions=atoms.get_positions(),
            cell=np.asarray(atoms.get_cell()),
            pbc=atoms.get_pbc(),
            electric_field=np.zeros(3) if electric_field is None else electric_field,
            head=head,
        )

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def periodic(self) -> bool:
        return bool(self.pbc.all())

    @property
    def volume(self) -> Optional[float]:
        """Omega in Angstrom^3 for fully periodic cells, else None."""
        if not self.periodic:
            return None
        if self._volume is not None:
            return self._volume
        return float(abs(np.linalg.det(self.cell)))


@dataclass
class ClosestPair:
    """The shortest edge of a graph: atoms ``i`` and ``j`` (``j`` moved by ``shift`` cell vectors), Angstrom apart."""

    i: int
    j: int
    shift: Tuple[int, int, int]
    distance: float

    def describe(self, numbers: Optional[np.ndarray] = None) -> str:
        """E.g. "atoms 3 (O) and 7 (Si) are 0.000 A apart" (a periodic image of j when shift != 0)."""
        def name(k):
            if numbers is None:
                return f"{k}"
            return f"{k} ({element_symbol(int(numbers[k]))})"

        image = "" if not any(self.shift) else f" (its periodic image shifted by {list(self.shift)} cell vectors)"
        if self.i == self.j:
            return f"atom {name(self.i)} and its own periodic image {list(self.shift)} are {self.distance:.4g} A apart"
        return f"atoms {name(self.i)} and {name(self.j)}{image} are {self.distance:.4g} A apart"


def element_symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` ("Z=200" when there is none)."""
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


@dataclass
class NeighbourGraph:
    """Directed radius graph: edge (sender, receiver) with receiver image shift.

    ``positions`` are the structure's positions as the model sees them
    (:func:`canonical_positions`, float64); the shifts refer to them.
    """

    edge_index: np.ndarray  # (2, E) int64
    unit_shifts: np.ndarray  # (E, 3) float64, integer multiples of cell vectors
    cell: np.ndarray  # (3, 3) cell used for shifts (padded for non-periodic directions)
    closest: Optional[ClosestPair] = None  #: the shortest edge (None: no edges)
    positions: Optional[np.ndarray] = None  #: (N, 3) float64 canonical positions (None: the structure's own)

    @property
    def nbytes(self) -> int:
        """Bytes the graph holds (edges, shifts, positions)."""
        pos = 0 if self.positions is None else self.positions.nbytes
        return int(self.edge_index.nbytes + self.unit_shifts.nbytes + self.cell.nbytes + pos)


def _padded_cell(structure: Structure, cutoff: float) -> np.ndarray:
    """The cell with every non-periodic vector replaced by a wide orthogonal one.

    matscipy needs a non-singular cell; along non-periodic directions no image
    is ever generated, so any box wider than the atoms plus the cutoff works.
    """
    cell = structure.cell.copy()
    if structure.periodic:
        return cell
    span = float(np.ptp(structure.positions, axis=0).max()) if structure.n_atoms else 0.0
    length = span + 2.0 * cutoff + 10.0
    basis = [cell[j] / np.linalg.norm(cell[j]) for j in range(3) if structure.pbc[j]]
    for i in range(3):
        if structure.pbc[i]:
            continue
        for candidate in (np.eye(3)[i], np.eye(3)[(i + 1) % 3], np.eye(3)[(i + 2) % 3]):
            vec = candidate - sum((candidate @ b) * b for b in basis)
            if np.linalg.norm(vec) > 1e-3:
                break
        vec = vec / np.linalg.norm(vec)
        basis.append(vec)
        cell[i] = vec * length
    return cell


def canonical_positions(structure: Structure, cell: Optional[np.ndarray] = None) -> np.ndarray:
    """The positions the model sees: near the origin, every interatomic vector kept (modulo the lattice).

    In float64: periodic directions wrapped into the cell (fractional
    coordinates in [0, 1)), non-periodic ones translated so that the atoms
    start at 0.  A structure far from the origin (|x| ~ 1e6 A) then gives the
    same numbers as at the origin: nothing of the translation reaches the
    model's (float32) arithmetic.  ``cell``: the padded cell (default: built here).
    """
    positions = structure.positions
    if structure.n_atoms == 0:
        return positions.copy()
    if not structure.pbc.any():
        return positions - positions.min(axis=0)
    cell = _padded_cell(structure, 1.0) if cell is None else cell
    frac = np.linalg.solve(cell.T, positions.T).T
    periodic = structure.pbc
    if periodic.all():  # the same values as the masked lines below, without their copies
        frac -= np.floor(frac)
        return frac @ cell
    frac[:, periodic] -= np.floor(frac[:, periodic])
    frac[:, ~periodic] -= frac[:, ~periodic].min(axis=0)
    return frac @ cell


#: host neighbour-list libraries: identical pairs, shifts and distances (tests/test_neighbour_lists.py);
#: vesin is about 3x faster than matscipy and releases the GIL while it searches
NEIGHBOUR_BACKENDS = ("vesin", "matscipy")
_backend = {"name": "vesin"}
_local = threading.local()  # one vesin calculator per thread and cutoff (it keeps its buffers between calls)


def neighbour_backend() -> str:
    """The library :func:`neighbour_list` uses now."""
    return _backend["name"]


def set_neighbour_backend(name: str) -> None:
    """Use ``name`` (one of :data:`NEIGHBOUR_BACKENDS`) for every later :func:`neighbour_list`."""
    if name not in NEIGHBOUR_BACKENDS:
        raise ValueError(f"neighbour backend: expected one of {list(NEIGHBOUR_BACKENDS)}, got {name!r}")
    if name == "vesin":
        import vesin  # noqa: F401  (fail here, not on the first request)
    _backend["name"] = name


def _vesin_calculator(cutoff: float):
    import vesin

    cache = getattr(_local, "vesin", None)
    if cache is None:
        cache = _local.vesin = {}
    calc = cache.get(cutoff)
    if calc is None:  # single-threaded: the server's parallelism is its prep workers
        # a half list (each unordered pair once) is about 1.4x faster to find than the full one; the full list is
        # the half list followed by its mirror image (j, i, -S), see :func:`_edges`
        calc = cache[cutoff] = vesin.NeighborList(cutoff=cutoff, full_list=False, sorted=False, n_threads=1)
    return calc


def _half_list_search(cutoff: float):
    """This thread's search for ``cutoff``: (positions, cell, pbc) -> (i, j, S, d), vesin's C function called
    directly (:mod:`.vesin_direct`: the same lists, without the wrapper's 15 us per call) or its wrapper."""
    cache = getattr(_local, "search", None)
    if cache is None:
        cache = _local.search = {}
    search = cache.get(cutoff)
    if search is None:
        from .vesin_direct import direct_half_list

        search = direct_half_list(cutoff)
        if search is None:  # a vesin without the C interface read there
            calc = _vesin_calculator(cutoff)
            search = cache[cutoff] = lambda positions, cell, pbc: calc.compute(positions, cell, pbc, "ijSd")
        else:
            cache[cutoff] = search
    return search


def half_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """vesin's half list: (i, j, integer shifts S (m, 3), distances d) with each unordered pair once."""
    return _half_list_search(float(cutoff))(positions, cell, np.asarray(pbc, dtype=bool))


def mirrored(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(edge_index (2, 2m) int64, unit_shifts (2m, 3) float64) of a half list: its m pairs, then (j, i, -S).

    ``shifts`` are integers (any integer dtype); a zero shift mirrors to +0.0, never -0.0.
    """
    m = int(i.shape[0])
    edge_index = np.empty((2, 2 * m), dtype=np.int64)
    edge_index[0, :m] = i
    edge_index[0, m:] = j
    edge_index[1, :m] = j
    edge_index[1, m:] = i
    unit_shifts = np.empty((2 * m, 3), dtype=np.float64)
    unit_shifts[:m] = shifts
    # 0.0 - S: exact for integers and +0.0 (never -0.0) for a zero, as the integers' negation, without its copy
    np.subtract(0.0, unit_shifts[:m], out=unit_shifts[m:])
    return edge_index, unit_shifts


def _edges(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, backend: Optional[str] = None):
    """(edge_index (2, E) int64, unit shifts (E, 3) float64, distances (E,) float64, k of the shortest edge or -1).

    Every ordered pair within ``cutoff``, self-pairs at S = 0 excluded (see :func:`pairs`).  With vesin the
    search lists each unordered pair once and the second half of the edges is the first half mirrored:
    edge m + k is (j_k, i_k, -S_k) at the same distance.
    """
    backend = backend or _backend["name"]
    cutoff = float(cutoff)
    if backend == "vesin":
        i, j, shifts, d = half_list(positions, cell, pbc, cutoff)
        edge_index, unit_shifts = mirrored(i, j, shifts)
        closest = int(np.argmin(d)) if d.shape[0] else -1
        return edge_index, unit_shifts, np.concatenate([d, d]), closest
    if backend != "matscipy":
        raise ValueError(f"neighbour backend: expected one of {list(NEIGHBOUR_BACKENDS)}, got {backend!r}")
    from matscipy.neighbours import neighbour_list as matscipy_neighbour_list

    i, j, shifts, d = matscipy_neighbour_list("ijSd", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff)
    keep = ~((i == j) & np.all(shifts == 0, axis=1))
    i, j, shifts, d = i[keep], j[keep], shifts[keep], d[keep]
    return (np.stack([i, j]).astype(np.int64), shifts.astype(np.float64), d,
            int(np.argmin(d)) if d.size else -1)


def pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, backend: Optional[str] = None):
    """(i, j, unit shifts S, distances d) of every ordered pair within ``cutoff``, self-pairs at S = 0 excluded.

    ``d[k] = |positions[j] + S[k] @ cell - positions[i]|``.  ``cell`` must be non-singular (see
    :func:`_padded_cell`); S is zero along non-periodic directions.  i, j int64, S int64, d float64;
    the order of the pairs is the backend's (deterministic for given inputs).
    """
    edge_index, unit_shifts, d, _ = _edges(positions, cell, pbc, cutoff, backend)
    return edge_index[0], edge_index[1], unit_shifts.astype(np.int64), d


@dataclass
class HalfGraph:
    """vesin's half list of a structure before it is mirrored (:func:`mirrored`) into a :class:`NeighbourGraph`.

    ``i``, ``j``: (m,) atom indices (any integer dtype); ``shifts``: (m, 3) integer unit shifts; ``cell``,
    ``positions``, ``closest``: those of the graph.  Half the size of the graph's arrays (and smaller dtypes
    fit): what worker processes send back (:mod:`macefield_server.serving.prep_pool`).
    """

    i: np.ndarray
    j: np.ndarray
    shifts: np.ndarray
    cell: np.ndarray
    positions: np.ndarray
    closest: Optional[ClosestPair]

    def graph(self) -> NeighbourGraph:
        edge_index, unit_shifts = mirrored(self.i, self.j, self.shifts)
        return NeighbourGraph(edge_index=edge_index, unit_shifts=unit_shifts, cell=self.cell, closest=self.closest,
                              positions=self.positions)


def half_neighbour_list(structure: Structure, cutoff: float) -> HalfGraph:
    """:func:`neighbour_list` with vesin, before mirroring (a structure with at least one atom)."""
    cell = _padded_cell(structure, cutoff)
    positions = canonical_positions(structure, cell)
    i, j, shifts, d = half_list(positions, cell, structure.pbc, cutoff)
    closest = None
    if d.shape[0]:  # the first shortest edge: the same as in the mirrored list (its first half)
        k = int(np.argmin(d))
        closest = ClosestPair(int(i[k]), int(j[k]), (int(shifts[k, 0]), int(shifts[k, 1]), int(shifts[k, 2])),
                              float(d[k]))
    return HalfGraph(i, j, shifts, cell, positions, closest)


def neighbour_list(structure: Structure, cutoff: float, backend: Optional[str] = None) -> NeighbourGraph:
    """All ordered pairs closer than ``cutoff`` (Angstrom), excluding self-pairs at zero shift.

    Built on :func:`canonical_positions` (returned with the graph), so that the
    shifts and the positions the model sees belong together.  ``backend``: a
    library of :data:`NEIGHBOUR_BACKENDS` (default: :func:`neighbour_backend`).
    The shortest edge (``closest``) comes from the search's own distances: the
    min-distance check needs no second pass.
    """
    if (backend or _backend["name"]) == "vesin" and structure.n_atoms:
        return half_neighbour_list(structure, cutoff).graph()
    cell = _padded_cell(structure, cutoff)
    if structure.n_atoms == 0:
        return NeighbourGraph(np.zeros((2, 0), np.int64), np.zeros((0, 3)), cell, positions=np.zeros((0, 3)))
    positions = canonical_positions(structure, cell)
    edge_index, unit_shifts, d, k = _edges(positions, cell, structure.pbc, cutoff, backend)
    closest = None
    if k >= 0:
        shift = (int(unit_shifts[k, 0]), int(unit_shifts[k, 1]), int(unit_shifts[k, 2]))
        closest = ClosestPair(int(edge_index[0, k]), int(edge_index[1, k]), shift, float(d[k]))
    return NeighbourGraph(edge_index=edge_index, unit_shifts=unit_shifts, cell=cell, closest=closest,
                          positions=positions)


#: more periodic image points than this (atoms x images) is counted as that many edges
#: without searching: only a cell far thinner than the cutoff gets there
MAX_IMAGE_POINTS = 8_000_000


def _shifted(a: np.ndarray, axis: int, step: int, periodic: bool) -> np.ndarray:
    """``a`` moved by ``step`` bins along ``axis``: wrapped if periodic, else zero-filled."""
    if step == 0:
        return a
    if periodic:
        return np.roll(a, step, axis)
    out = np.zeros_like(a)
    src, dst = [slice(None)] * 3, [slice(None)] * 3
    if step > 0:
        src[axis], dst[axis] = slice(None, -step), slice(step, None)
    else:
        src[axis], dst[axis] = slice(-step, None), slice(None, step)
    out[tuple(dst)] = a[tuple(src)]
    return out


def _binned_bound(heights: np.ndarray, periodic, spacing: np.ndarray, cutoff: float, max_bins: int = 64):
    """Upper bound on directed pairs from a histogram of bins at least ``cutoff`` wide, or None.

    ``heights[:, i]``: each atom's distance from the lattice plane i (in [0,
    ``spacing[i]``) along periodic axes, a Cartesian coordinate otherwise).
    Two atoms closer than the cutoff differ by at most one bin along every
    axis; with at least 3 bins (spacing >= 3 cutoffs) along a periodic axis
    at most one periodic image of an atom is within the cutoff of another.
    Bound: sum over atoms of the atoms in the 27 bins around it, minus itself.
    None when a periodic axis is thinner than 3 cutoffs.
    """
    n = heights.shape[0]
    shape, index = [], []
    for i in range(3):
        if periodic[i]:
            bins = min(int(spacing[i] // cutoff), max_bins)
            if bins < 3:
                return None
            k = np.floor(heights[:, i] / spacing[i] * bins).astype(np.int64) % bins
        else:
            lo, hi = float(heights[:, i].min()), float(heights[:, i].max())
            bins = int(max(1, min(max_bins, (hi - lo) // cutoff)))
            if hi <= lo:
                k = np.zeros(n, np.int64)
            else:
                k = np.minimum(((heights[:, i] - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
        shape.append(bins)
        index.append(k)
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, tuple(index), 1)
    around = counts
    for axis in range(3):  # separable: sum of the 3 neighbours along each axis in turn
        below, same, above = (_shifted(around, axis, step, bool(periodic[axis])) for step in (-1, 0, 1))
        around = below + same + above
    return int((counts * around).sum()) - n


#: atoms per A^3 assumed for a structure without a volume when guessing its edges (denser than any solid)
DENSE = 0.2


def expected_edges(structure: Structure, cutoff: float) -> int:
    """A guess (not a bound) of the directed edges: each atom sees the structure's density within the cutoff.

    For reserving memory before a neighbour list exists; the real count replaces
    it once the list is built.  Periodic structures use their own density (times
    1.5 for clustering), others :data:`DENSE`.
    """
    n = structure.n_atoms
    density = n / structure.volume if structure.periodic and structure.volume else DENSE
    sphere = 4.0 / 3.0 * np.pi * float(cutoff) ** 3
    per_atom = 1.5 * density * sphere if structure.periodic else min(n - 1, density * sphere)
    return int(n * per_atom) + n


def _images_per_pair(cell: List[List[float]], volume: float, cutoff: float) -> float:
    """The most periodic images of one atom within ``cutoff`` of another, fully periodic ``cell`` (rows) of
    ``volume`` = |det|: the product over the axes of floor(2 * cutoff / plane spacing) + 1, the spacing of the
    planes spanned by the other two vectors being volume / |a_j x a_k| (see :func:`estimate_edges`)."""
    per_pair = 1.0
    for i in range(3):
        (u0, u1, u2), (v0, v1, v2) = cell[(i + 1) % 3], cell[(i + 2) % 3]
        area = math.sqrt((u1 * v2 - u2 * v1) ** 2 + (u2 * v0 - u0 * v2) ** 2 + (u0 * v1 - u1 * v0) ** 2)
        per_pair *= math.floor(2.0 * cutoff * area / volume) + 1.0
    return per_pair


def estimate_edges(structure: Structure, cutoff: float, limit: int = 100_000) -> int:
    """Directed edges of :func:`neighbour_list`, counted without building it (an upper bound).

    Used to refuse collapsed or absurdly dense inputs before the neighbour
    search allocates their edges.  Cheap bounds first: N*(N-1) for a finite
    structure, N*N*images for a periodic one (images: the most lattice
    translations that can bring one atom within the cutoff of another, the product over
    periodic axes of floor(2 * cutoff / plane spacing) + 1), then a histogram over bins a
    cutoff wide (O(N)); when those pass ``limit`` the pairs are counted by a
    k-d tree over the atoms and their nearby images (memory O(N * images), no
    per-pair storage).  So atoms piled on one point, tiny cells with many
    images and large molecules are all counted, not guessed from the mean
    density.  A cell so thin that N * images exceeds :data:`MAX_IMAGE_POINTS`
    is reported as that many edges without searching.
    """
    n = structure.n_atoms
    if n == 0:
        return 0
    cutoff = float(cutoff)
    if structure._volume is not None and structure.periodic:  # the cheap periodic bound below, in Python floats
        per_pair = _images_per_pair(structure.cell.tolist(), structure._volume, cutoff)
        if n * n * per_pair - n <= limit:
            return int(n * n * per_pair) - n
    from scipy.spatial import cKDTree  # here: an import of a package's name costs a microsecond per call

    if not structure.pbc.any():
        bound = n * (n - 1)
        if bound <= limit:
            return bound
        binned = _binned_bound(structure.positions, [False] * 3, np.zeros(3), cutoff)
        if binned <= limit:
            return binned
        tree = cKDTree(structure.positions)
        return int(tree.count_neighbors(tree, cutoff)) - n
    cell = _padded_cell(structure, cutoff)
    inverse = np.linalg.inv(cell)
    reciprocal = inverse.T  # rows: b_i with a_j . b_i = delta_ij
    reciprocal_norm = np.sqrt((reciprocal * reciprocal).sum(axis=1))
    spacing = 1.0 / reciprocal_norm  # distance between lattice planes (padded axes: orthogonal)
    # a pair within the cutoff is at most a cutoff apart across every family of lattice planes: along periodic
    # axis i its fractional offset lies in an interval 2 * cutoff / spacing_i wide, which holds at most
    # floor(2 * cutoff / spacing_i) + 1 integer shifts; so each ordered pair has at most their product of images
    per_pair = float(np.prod(np.where(structure.pbc, np.floor(2.0 * cutoff / spacing) + 1.0, 1.0)))
    if np.isfinite(per_pair) and n * n * per_pair - n <= limit:
        return int(n * n * per_pair) - n
    frac = structure.positions @ inverse
    reach_f = np.zeros(3)
    for i in range(3):
        if structure.pbc[i]:
            frac[:, i] -= np.floor(frac[:, i])  # wrap: pair distances over images do not change
            reach_f[i] = np.ceil(cutoff * reciprocal_norm[i]) + 1
    images_f = float(np.prod(2 * reach_f + 1))
    binned = _binned_bound(frac * spacing, structure.pbc, spacing, cutoff)
    if binned is not None and binned <= limit:
        return binned
    if not np.isfinite(images_f) or n * images_f > MAX_IMAGE_POINTS:
        return int(min(n * images_f, 2**62)) if np.isfinite(images_f) else 2**62
    reach = reach_f.astype(np.int64)
    wrapped = frac @ cell
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij"), -1).reshape(-1, 3)
    frac_points = (frac[None, :, :] + grid[:, None, :]).reshape(-1, 3)
    # only images within a cutoff of the cell (plane spacing 1/|b_i|) can be a neighbour of an atom in it
    margin = cutoff * reciprocal_norm
    near = np.all((frac_points >= -margin) & (frac_points < 1.0 + margin) | ~structure.pbc, axis=1)
    points = frac_points[near] @ cell
    count = cKDTree(points).count_neighbors(cKDTree(wrapped), cutoff)
    return int(count) - n  # minus each atom with itself at zero shift


@dataclass
class GraphBatch:
    """Tensors for one model pass plus the bookkeeping to split results.

    ``tensors`` keys: node_attrs (N, n_elements) one-hot (model dtype);
    float64: positions (N, 3) (canonical: see :func:`canonical_positions`),
    unit_shifts (E, 3), shifts (E, 3) Angstrom, cell (G*3, 3), electric_field
    (G, 3) V/A, volume (G,) Angstrom^3 (0 where not periodic); edge_index (2,
    E), batch (N,), ptr (G+1,), head (G,), periodic (G,) bool.
    """

    tensors: Dict[str, torch.Tensor]
    n_atoms: List[int]
    periodic: List[bool]
    volumes: List[Optional[float]]
    cells: List[np.ndarray]

    @property
    def num_graphs(self) -> int:
        return len(self.n_atoms)

    @property
    def num_edges(self) -> int:
        return int(self.tensors["edge_index"].shape[1])


def _joined(parts: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
    """``np.concatenate(parts, axis)``, without the copy when there is one part."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


@functools.lru_cache(maxsize=64)
def _species_table(atomic_numbers: Tuple[int, ...]) -> np.ndarray:
    """Atomic number -> index among ``atomic_numbers`` (-1: not in the model); read-only, shared between calls.

    Its last entry is always -1 (one past the largest number), so that an index clipped to the table maps
    any number past it to -1."""
    table = np.full(max(max(atomic_numbers), 119) + 2, -1, dtype=np.int64)
    table[np.asarray(atomic_numbers, dtype=np.int64)] = np.arange(len(atomic_numbers))
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=16)
def _identity(n: int, dtype: torch.dtype) -> torch.Tensor:
    """The n x n identity in ``dtype`` (its rows are the one-hot species vectors); shared, never written."""
    return torch.eye(n, dtype=dtype)


def collate(
    structures: Sequence[Structure],
    graphs: Sequence[NeighbourGraph],
    *,
    atomic_numbers: Sequence[int],
    head_index: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> GraphBatch:
    """Pack structures and their neighbour graphs into one disjoint-union graph.

    Raises ValueError naming the structure when an element is not in the model.
    """
    z_to_index = _species_table(tuple(int(z) for z in atomic_numbers))
    n_elements = len(atomic_numbers)
    n_atoms = [s.n_atoms for s in structures]

    numbers = _joined([s.numbers for s in structures]) if structures else np.zeros(0, np.int64)
    if z_to_index[0] < 0:  # clipped, a negative number reads entry 0 and one past the table the last: both -1
        species_all = z_to_index.take(numbers, mode="clip")
    else:
        bad = (numbers < 0) | (numbers >= len(z_to_index))  # the element check over the whole batch at once
        species_all = np.where(bad, -1, z_to_index[np.clip(numbers, 0, len(z_to_index) - 1)])
    if (species_all < 0).any():
        missing = sorted(set(int(z) for z in numbers[species_all < 0]))
        raise ValueError(f"atomic_numbers: element(s) {missing} not in the model (has {list(atomic_numbers)})")
    positions, edges, unit_shifts, shifts, cells = [], [], [], [], []
    offset = 0
    for s, ng in zip(structures, graphs):
        positions.append(ng.positions if ng.positions is not None else canonical_positions(s, ng.cell))
        edges.append(ng.edge_index + offset if offset else ng.edge_index)
        unit_shifts.append(ng.unit_shifts)
        shifts.append(ng.unit_shifts @ ng.cell)
        cells.append(ng.cell)
        offset += s.n_atoms

    on_cpu = torch.device(device).type == "cpu"

    def t(a, dt=dtype):
        tensor = torch.as_tensor(np.asarray(a), dtype=dt)
        return tensor if on_cpu else tensor.to(device)

    def moved(tensor):
        return tensor if on_cpu else tensor.to(device)

    volumes = [s.volume for s in structures]
    periodic = [s.periodic for s in structures]
    total = len(species_all)
    if len(structures) == 1:  # one structure: every atom in graph 0 (the values of the general branch)
        batch = moved(torch.zeros(total, dtype=torch.int64))
        ptr = moved(torch.tensor([0, total], dtype=torch.int64))
    else:
        counts = np.asarray(n_atoms, dtype=np.int64)
        ptr_array = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr_array[1:])
        batch = t(np.repeat(np.arange(len(counts), dtype=np.int64), counts), torch.int64)
        ptr = t(ptr_array, torch.int64)

    # geometry stays float64: edge vectors are built in float64 (FieldMACE.enthalpy) and only then cast
    geometry = torch.float64
    tensors = {
        # one-hot rows of the identity: exactly 0.0 and 1.0 in the model's dtype
        "node_attrs": moved(_identity(n_elements, dtype).index_select(0, torch.from_numpy(species_all))),
        "positions": t(_joined(positions), geometry),
        "edge_index": t(_joined(edges, axis=1), torch.int64),
        "unit_shifts": t(_joined(unit_shifts), geometry),
        "shifts": t(_joined(shifts), geometry),
        "cell": t(_joined(cells), geometry),
        "batch": batch,
        "ptr": ptr,
        "head": moved(torch.tensor([int(h) for h in head_index], dtype=torch.int64)),
        "electric_field": t(np.array([s.electric_field for s in structures], dtype=np.float64).reshape(-1, 3),
                            geometry),
        # Omega for fully periodic structures, 0 otherwise (never divided by: see response)
        "volume": moved(torch.tensor([v or 0.0 for v in volumes], dtype=geometry)),
        "periodic": moved(torch.tensor(periodic, dtype=torch.bool)),
    }
    return GraphBatch(
        tensors=tensors,
        n_atoms=n_atoms,
        periodic=periodic,
        volumes=volumes,
        cells=[s.cell.copy() for s in structures],
    )
