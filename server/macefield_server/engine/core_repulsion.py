"""Core repulsion: below the data's shortest distance of each pair, the learned part hands over to ZBL.

A learned potential has no data closer than the shortest distance of each
pair type in its training frames, and there its energy is an extrapolation
that may fall into deep, unphysical holes.  This module takes the learned
part out where it has no data, per pair of elements and per head (the
inner cutoff of ACE potentials, from the data's own shortest distances):

* every edge's radial features (and so its message in every interaction
  layer) are multiplied by a switch ``s(r)`` that is 1 at and above the
  pair's ``inner`` distance (A) and falls smoothly to 0 at ``inner - width``
  (``s = x^3 (10 - 15 x + 6 x^2)``, ``x = (r - inner + width) / width``
  clamped to [0, 1]: value, slope and curvature continuous);
* the pair gets ``(1 - s(r))`` times the universal screened nuclear
  repulsion (Ziegler, Biersack and Littmark 1985) in eV, added to F after
  the per-head scale and shift, so that it is the physical ZBL energy
  whatever the head's scale (the model's own ``pair_repulsion`` term, when
  it has one, stays as trained).

The switch scales the radial features that feed every radial MLP, so it
silences an edge only in blocks whose MLPs map zero to zero (e3nn's bias-free
MLPs; :meth:`FieldMACE.set_core_repulsion` refuses other blocks).

At every distance at or above ``inner`` nothing changes, exactly: a model
whose ``inner`` distances are the shortest of its data gives the same F,
forces and responses on every frame of that data.  Below ``inner - width``
the pair's energy is ZBL (plus the model's own pair term, if any) and
whatever the rest of the structure gives; the learned part has no edge
between the two atoms.  ``inner`` 0 switches a pair off.

The description (:meth:`CoreRepulsion.spec`, part of the architecture
description of :mod:`.architecture`) is ``{"width": A, "inner": {head:
{"Ba-O": A, ...}}}``; pair names are element symbols, either order.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from ase.data import atomic_numbers as _Z
from mace.tools.scatter import scatter_sum

#: e^2 / (4 pi eps0) in eV*A
COULOMB_EV_A = 14.399645
#: universal ZBL screening function: coefficients and exponents (Ziegler, Biersack, Littmark 1985)
ZBL_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)
#: universal screening length a = ZBL_LENGTH_A / (Z1^0.23 + Z2^0.23), A (0.8854 Bohr radii)
ZBL_LENGTH_A = 0.46850


def zbl_energy(r: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Universal ZBL screened nuclear repulsion (eV) of nuclei ``z1``, ``z2`` at distance ``r`` (A), elementwise."""
    a = ZBL_LENGTH_A / (z1.to(r.dtype) ** 0.23 + z2.to(r.dtype) ** 0.23)
    x = r / a
    phi = sum(c * torch.exp(-k * x) for c, k in zip(ZBL_COEFFICIENTS, ZBL_EXPONENTS))
    return COULOMB_EV_A * z1.to(r.dtype) * z2.to(r.dtype) / r * phi


def smooth_switch(r: torch.Tensor, inner: torch.Tensor, width: float) -> torch.Tensor:
    """1 for ``r >= inner``, 0 for ``r <= inner - width``, C2 smoothstep between; 1 where ``inner`` is 0."""
    x = ((r - inner + width) / width).clamp(0.0, 1.0)
    s = x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)
    return torch.where(inner > 0, s, torch.ones_like(s))


def pair_key(a: str, b: str) -> str:
    """Canonical name of an element pair: heavier first ('Si-O', 'Ba-Ti', 'O-O')."""
    za, zb = _Z[a], _Z[b]
    return f"{a}-{b}" if za >= zb else f"{b}-{a}"


class CoreRepulsion(torch.nn.Module):
    """The switch and the ZBL core of one model (see the module docstring).

    Args:
        atomic_numbers: the model's elements, in its one-hot order.
        heads: the model's heads, in order.
        inner: {head: {pair name: inner distance in A}}; pairs (and heads)
            not named keep the learned part at every distance.
        width: A over which the learned part fades out below ``inner`` (> 0).
    """

    inner: torch.Tensor
    numbers: torch.Tensor

    def __init__(self, atomic_numbers: Sequence[int], heads: Sequence[str],
                 inner: Mapping[str, Mapping[str, float]], width: float):
        super().__init__()
        if not width > 0:
            raise ValueError(f"core_repulsion.width must be > 0 (A), got {width}")
        zs = [int(z) for z in atomic_numbers]
        heads = list(heads)
        table = torch.zeros(len(heads), len(zs), len(zs), dtype=torch.float64)
        for head, pairs in inner.items():
            if head not in heads:
                raise ValueError(f"core_repulsion.inner: head {head!r} is not one of the model's heads {heads}")
            h = heads.index(head)
            for name, distance in pairs.items():
                a, _, b = name.partition("-")
                if a not in _Z or b not in _Z:
                    raise ValueError(f"core_repulsion.inner[{head!r}]: {name!r} is not a pair like 'Si-O'")
                if _Z[a] not in zs or _Z[b] not in zs:
                    raise ValueError(f"core_repulsion.inner[{head!r}]: {name!r} has an element the model lacks")
                if not float(distance) >= 0:
                    raise ValueError(f"core_repulsion.inner[{head!r}][{name!r}] must be >= 0 (A)")
                i, j = zs.index(_Z[a]), zs.index(_Z[b])
                table[h, i, j] = table[h, j, i] = float(distance)
        # the description as given (canonical names), kept in Python: the buffer follows the model's dtype
        self._inner = {head: {pair_key(*name.split("-")): float(d) for name, d in sorted(pairs.items()) if float(d) > 0}
                       for head, pairs in inner.items()}
        self._inner = {head: pairs for head, pairs in self._inner.items() if pairs}
        self.width = float(width)
        self.heads = heads
        self.elements = zs
        # derived from the architecture description, never from a state dict: checkpoints without it still load
        self.register_buffer("inner", table, persistent=False)
        self.register_buffer("numbers", torch.tensor(zs, dtype=torch.int64), persistent=False)

    def spec(self) -> Dict:
        """The JSON-able description of this module (pair names canonical, heavier first; inner 0 left out)."""
        return {"width": self.width, "inner": {head: dict(pairs) for head, pairs in self._inner.items()}}

    def edge_inner(self, node_attrs: torch.Tensor, edge_index: torch.Tensor,
                   edge_heads: torch.Tensor) -> torch.Tensor:
        """(E, 1) inner distance (A) of every edge's element pair, for its head."""
        element = node_attrs.argmax(dim=-1)
        return self.inner[edge_heads, element[edge_index[0]], element[edge_index[1]]].unsqueeze(-1)

    def switch(self, lengths: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """(E, 1) weight of the learned part on each edge (``lengths`` (E, 1) in A)."""
        return smooth_switch(lengths, inner.to(lengths.dtype), self.width)

    def node_energies(self, lengths: torch.Tensor, switch: torch.Tensor, node_attrs: torch.Tensor,
                      edge_index: torch.Tensor) -> torch.Tensor:
        """(N,) ZBL core energy per atom (eV): half of ``(1 - s) * ZBL`` of each of its edges (each pair twice)."""
        element = node_attrs.argmax(dim=-1)
        z = self.numbers[element]
        sender, receiver = edge_index[0], edge_index[1]
        off = (1.0 - switch).squeeze(-1)
        safe = torch.where(off > 0, lengths.squeeze(-1), torch.ones_like(off))  # no 1/r at far edges' graphs
        pair = torch.where(off > 0, 0.5 * off * zbl_energy(safe, z[sender], z[receiver]), torch.zeros_like(off))
        return scatter_sum(pair, receiver, dim=0, dim_size=node_attrs.shape[0])
