"""Extrapolation of a structure against a reference set: the per-atom grade and the field range.

Two numbers, both dimensionless with threshold 1, both measured against the
model's reference (normally training) frames:

* ``extrapolation`` (per atom, the *grade*): how far an atom's environment
  lies outside the reference environments, read from features that do not
  depend on the field (below);
* ``field_extrapolation`` (per structure): how far the applied field pushes
  the ions compared with the thermal displacements the reference frames
  sampled (:meth:`ExtrapolationStatistics.field_extrapolation`).

**Features of the grade.**  The invariant (``0e``) channels of the node
features of the layers that never see the field: layer 0 after its product
block and *before* its field coupling (``FieldMACE.field_free_features``;
:attr:`FieldMACE.field_free_layers`).  They come from the same forward pass
that gives F, at no extra cost, and are exactly independent of E.  The
field-coupled features of later layers move linearly with E (default model:
every atom of every held-out frame above 1 at 0.05 V/A), while the training
frames, like almost all DFT data, are at zero field: graded on those, any
finite field would read as extrapolation.  The price is locality: the grade
sees one layer's receptive field (r_max, 5 A for the default model) instead
of two (10 A); docs/extrapolation.md has the measurements.

* **D-optimal active set** (MaxVol, the method of pacemaker's gamma for ACE:
  Lysogorskiy et al., Phys. Rev. Materials 7, 043801 (2023)).  Among the
  reference atoms of one element, the r atoms whose feature rows A (r x r)
  have the largest |det A| are found (:func:`maxvol`).  Every reference atom
  x then has coefficients c = x A^-1 with all |c_j| <= 1, and
  ``gamma(x) = max_j |(x A^-1)_j|`` is at most 1 inside that hull and grows
  linearly with the distance outside it.  gamma is unchanged by any invertible
  linear map of the features (no scaling choices).
* **Thin directions.**  The active set lives in the span of the directions
  whose singular values are above ``truncation`` (1e-5) of the largest: the
  others vary by less than 1e-5 of the features' size across the whole
  reference set, close enough to float32 rounding that an inverse along them
  would amplify noise.  Their component, the residual
  ``|x - V V^T x|`` (V: the kept directions), is measured against ``rho``, the
  largest residual of a reference atom but at least ``residual_floor`` (1e-3)
  of the reference features' RMS norm, and enters as a second term:
  ``grade = max(gamma, |residual| / rho) / (1 + margin)``.  The floor keeps
  the residual term to departures well above rounding: without it rho sits at
  the 1e-5 noise level of the thin directions, and tiny moves along them (in
  the measurement that set it, bench/extrapolation_methods.py, a 0.01 V/A field
  on the earlier field-coupled features) graded perfect quartz 1.5 instead
  of 0.91, while every structure the tests flag stayed flagged either way.
* **Margin.**  The stored region is enlarged by ``margin`` (1%), so that the
  reference atoms themselves stay at or below 1 / 1.01 when they are
  evaluated again in another batch or dtype (measured: float32 batch
  composition changes gamma by ~2e-5, float32 -> float64 by ~2e-4).

Threshold: ``grade > 1`` means *extrapolating*: the atom's environment, as the
model sees it, lies outside every environment of the reference set.  The
grade of an atom whose element has no reference atoms in the head is +inf.
The choice of method and the measured alternatives (Mahalanobis distance,
nearest-neighbour distance) are in docs/extrapolation.md.

**Field range.**  ``field_extrapolation = |E| * max over the structure's
elements of kappa``, ``kappa = mean ||Z*||_2 / sigma_F`` (A/V) per head and
element: Z* the model's Born charge at E = 0 (spectral norm, mean over
reference atoms), sigma_F the RMS Cartesian force component of the reference
frames.  In the harmonic picture a field displaces an ion by Z* E / k while
the reference frames sampled thermal displacements sigma_F / k, so the ratio
is the field-induced displacement in units of the sampled thermal one, for the
most susceptible element.  ``E_ref = 1 / max kappa`` (V/A) is the field where
it reaches 1 for a structure holding that element.  Zero at E = 0, linear in
|E|, measured once at calibration.

Cost: one (N, d) x (d, r) product and one (N, d) x (d, d) product per
pass (d = 64, r <= d for the default model), in float64 on the model's
device, and one scatter-max per batch for the field range;
bench/extrapolation_cost.py measures it against energy + forces.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

METHOD = "maxvol-active-set-field-free"
#: 2: field-free features (layer 0 before its coupling) and the field susceptibility per element;
#: 1 (the field-coupled features of every layer) is refused: recalibrate
STATISTICS_VERSION = 2
#: grade above which an atom is extrapolating (the enlarged reference hull's boundary)
THRESHOLD = 1.0
#: relative enlargement of the reference region (float rounding of reference atoms stays inside)
MARGIN = 0.01
#: feature directions with singular values below this fraction of the largest are "thin" (residual term)
TRUNCATION = 1e-5
#: the residual term's scale rho is at least this fraction of the reference features' RMS norm
RESIDUAL_FLOOR = 1e-3
#: MaxVol stops when no reference atom has a coefficient above this
MAXVOL_TOLERANCE = 1.0 + 1e-6


# ------------------------------------------------------------------ features
def field_free_layers(model) -> int:
    """How many interaction layers (from the first) have features that never see the field."""
    return int(getattr(model, "field_free_layers", len(model.interactions)))


def feature_layout(model) -> List[Tuple[int, int, int]]:
    """(layer, start, stop) of every ``0e`` block of the field-free layers' node features (before any coupling)."""
    from e3nn import o3

    layout = []
    for layer, interaction in enumerate(model.interactions[: field_free_layers(model)]):
        offset = 0
        for mul, ir in o3.Irreps(str(interaction.hidden_irreps)):
            size = mul * ir.dim
            if ir.l == 0 and ir.p == 1:
                layout.append((layer, offset, offset + size))
            offset += size
    return layout


def invariant_features(layer_features: Sequence[torch.Tensor], layout: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
    """(N, d) invariant channels of the collected layers (concatenated in layer order), detached."""
    return torch.cat([layer_features[i][:, a:b] for i, a, b in layout], dim=1).detach()


def latent_features(model, graph: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, d) field-free invariant features of a prepared batch (energy-only forward pass, no gradients).

    The structures' fields do not enter: the features are taken before any field coupling.
    """
    layers: List[torch.Tensor] = []
    field = torch.zeros(graph["ptr"].numel() - 1, 3, dtype=torch.float64, device=graph["positions"].device)
    with torch.no_grad():
        model.enthalpy(graph, graph["positions"], field, None, field_free_features=layers)
    return invariant_features(layers, feature_layout(model))


# ------------------------------------------------------------------- MaxVol
@dataclass
class ElementStatistics:
    """The reference region of one element in one head.

    ``basis`` (d, r): the kept feature directions V; ``coefficients`` (d, r):
    V @ inv(A) with A the active set's rows in that basis; ``residual_radius``:
    rho (features' units), the largest residual of a reference atom (floored
    at :data:`RESIDUAL_FLOOR` times their RMS norm).  Field susceptibility:
    ``born_charge_norm`` (e), the mean spectral norm of the model's Z* at E = 0
    over reference atoms; ``force_rms`` (eV/A), the RMS Cartesian force
    component of the reference atoms; ``kappa = born_charge_norm / force_rms``
    (A/V).
    """

    atomic_number: int
    basis: torch.Tensor
    coefficients: torch.Tensor
    residual_radius: torch.Tensor
    n_reference: int
    active_set: List[Tuple[int, int]] = field(default_factory=list)  #: (structure, atom) of the active atoms
    born_charge_norm: float = 0.0  #: e: mean ||Z*||_2 of the reference atoms at E = 0
    force_rms: float = math.inf  #: eV/A: RMS force component of the reference atoms

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def kappa(self) -> float:
        """Field susceptibility (A/V): field-induced over thermal displacement per V/A of field."""
        if self.born_charge_norm == 0.0:
            return 0.0
        return self.born_charge_norm / self.force_rms if self.force_rms > 0 else math.inf

    def describe(self) -> Dict:
        return {
            "n_reference": self.n_reference,
            "rank": self.rank,
            "features": int(self.basis.shape[0]),
            "active_set": [list(a) for a in self.active_set],
            "born_charge_norm_e": self.born_charge_norm,
            "force_rms_eV_per_A": self.force_rms,
            "kappa_A_per_V": self.kappa,
        }


class OutdatedStatistics(ValueError):
    """Statistics of an earlier version (other features): they cannot be used; recalibrate."""


class ExtrapolationStatistics:
    """Reference statistics of one model, per head and element, and the grade computed from them.

    Attach to a model with :func:`attach` (the native checkpoint stores them,
    see :mod:`.checkpoint`); :func:`calibrate` computes them.
    """

    def __init__(
        self,
        layout: Sequence[Tuple[int, int, int]],
        heads: Dict[str, Dict[int, ElementStatistics]],
        *,
        references: Optional[Dict[str, Dict]] = None,
        threshold: float = THRESHOLD,
        margin: float = MARGIN,
        truncation: float = TRUNCATION,
        method: str = METHOD,
        weights: Optional[str] = None,
    ):
        if method != METHOD:
            raise ValueError(f"extrapolation statistics: unknown method {method!r} (this server knows {METHOD!r})")
        self.layout: List[Tuple[int, int, int]] = [(int(layer), int(a), int(b)) for layer, a, b in layout]
        self.heads = heads
        self.references = dict(references or {})
        self.threshold = float(threshold)
        self.margin = float(margin)
        self.truncation = float(truncation)
        self.method = method
        self.weights = weights  #: fingerprint of the model parameters they were computed with (None: unknown)
        self._bound: Dict = {}

    @property
    def n_features(self) -> int:
        return sum(b - a for _, a, b in self.layout)

    def field_reference(self, head: str) -> float:
        """E_ref of ``head`` (V/A): the field at which ``field_extrapolation`` reaches 1 for a structure holding
        its most susceptible element (1 / max kappa; +inf when no element responds to the field)."""
        kappa = max((s.kappa for s in self.heads[head].values()), default=0.0)
        return math.inf if kappa == 0.0 else 1.0 / kappa

    def merged(self, other: "ExtrapolationStatistics") -> "ExtrapolationStatistics":
        """These statistics with ``other``'s heads added (``other`` wins for a head both have)."""
        if other.layout != self.layout:
            raise ValueError("extrapolation statistics: feature layouts differ (statistics of another architecture)")
        heads = dict(self.heads)
        heads.update(other.heads)
        references = dict(self.references)
        references.update(other.references)
        if self.weights is not None and other.weights is not None and self.weights != other.weights:
            raise ValueError("extrapolation statistics: the heads were calibrated on different weights")
        return ExtrapolationStatistics(self.layout, heads, references=references, threshold=other.threshold,
                                       margin=other.margin, truncation=other.truncation,
                                       weights=other.weights or self.weights)

    # ------------------------------------------------------------- grade
    def _tables(self, model, device: torch.device):
        """{(head index, element index): (coefficients, basis or None, 1/rho)} on ``device``, built once per device."""
        key = (id(model), str(device))
        if key not in self._bound:
            heads = list(getattr(model, "heads", None) or ["Default"])
            elements = [int(z) for z in model.atomic_numbers]
            tables = {}
            for head, per_element in self.heads.items():
                if head not in heads:
                    continue
                for z, s in per_element.items():
                    if z not in elements:
                        continue
                    thin = s.basis.shape[1] < s.basis.shape[0]
                    tables[(heads.index(head), elements.index(z))] = (
                        s.coefficients.to(device=device, dtype=torch.float64),
                        s.basis.to(device=device, dtype=torch.float64) if thin else None,
                        (1.0 / s.residual_radius).to(device=device, dtype=torch.float64),
                    )
            self._bound[key] = (tables, len(elements))  # added, never replaced: safe for several threads
        return self._bound[key]

    def _kappa(self, model, device: torch.device) -> torch.Tensor:
        """(heads, elements) float64 kappa on ``device`` (+inf: no reference atoms of that element), built once."""
        key = ("kappa", id(model), str(device))
        if key not in self._bound:
            heads = list(getattr(model, "heads", None) or ["Default"])
            elements = [int(z) for z in model.atomic_numbers]
            table = torch.full((len(heads), len(elements)), math.inf, dtype=torch.float64)
            for head, per_element in self.heads.items():
                if head in heads:
                    for z, s in per_element.items():
                        if z in elements:
                            table[heads.index(head), elements.index(z)] = s.kappa
            self._bound[key] = table.to(device)
        return self._bound[key]

    def field_extrapolation(self, model, graph: Dict[str, torch.Tensor], field: torch.Tensor) -> torch.Tensor:
        """(G,) float64: ``|E_g| * max over the atoms of structure g of kappa[head, element]``; exactly 0 at E = 0.

        An element without reference atoms in the head counts as +inf (like its grade) at any finite field.
        """
        table = self._kappa(model, graph["node_attrs"].device)
        species = torch.argmax(graph["node_attrs"], dim=1)
        per_atom = table[graph["head"][graph["batch"]], species]
        n_graphs = graph["ptr"].numel() - 1
        largest = torch.zeros(n_graphs, dtype=torch.float64, device=per_atom.device).scatter_reduce(
            0, graph["batch"], per_atom, reduce="amax", include_self=True)
        magnitude = torch.linalg.vector_norm(field.detach().to(torch.float64).reshape(-1, 3), dim=1)
        magnitude = magnitude.expand(n_graphs) if magnitude.numel() == 1 else magnitude
        return torch.where(magnitude > 0, magnitude * largest, torch.zeros_like(largest))

    def grade(self, model, features: torch.Tensor, node_attrs: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
        """(N,) float64 grades of atoms with ``features`` (N, d); +inf where the head/element has no statistics."""
        if features.shape[1] != self.n_features:
            raise ValueError(
                f"extrapolation statistics: {self.n_features} features, the model gives {features.shape[1]}")
        tables, n_elements = self._tables(model, features.device)
        x = features.to(torch.float64)
        species = torch.argmax(node_attrs, dim=1)
        keys = node_heads * n_elements + species
        grade = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
        for (head, element), table in tables.items():
            mine = keys == head * n_elements + element
            if x.device.type == "cpu":  # only the atoms of this table (boolean indexing: cheap on the host)
                grade[mine] = element_grade(x[mine], *table) / (1.0 + self.margin)
            else:  # every atom, kept where it matches: no host synchronisation to stall a GPU stream
                grade = torch.where(mine, element_grade(x, *table) / (1.0 + self.margin), grade)
        return grade

    def lipschitz(self, model, node_attrs: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
        """(N,) float64: how much each atom's grade can change per unit change of its features (Euclidean norm).

        The grade is a maximum of ``|x c_j|`` and ``|x - V V^T x| / rho``
        over its element's table, divided by ``1 + margin``, so it moves by at
        most ``max(max_j ||c_j||, 1 / rho) / (1 + margin)`` times the norm of
        a change of ``x``: the bound that round-off in the features (another
        dtype, backend or orientation) puts on round-off in the grade.  +inf
        where the head/element has no statistics.
        """
        tables, n_elements = self._tables(model, node_attrs.device)
        species = torch.argmax(node_attrs, dim=1)
        keys = node_heads * n_elements + species
        out = torch.full((species.shape[0],), math.inf, dtype=torch.float64, device=node_attrs.device)
        for (head, element), (coefficients, basis, inverse_radius) in tables.items():
            steepest = torch.linalg.vector_norm(coefficients, dim=0).max()
            if basis is not None:
                steepest = torch.maximum(steepest, inverse_radius)
            out = torch.where(keys == head * n_elements + element, steepest / (1.0 + self.margin), out)
        return out

    # ------------------------------------------------------ serialisation
    def to_payload(self) -> Dict:
        """``{"statistics": JSON text, "tensors": {head: {Z: {name: tensor}}}}`` (safe to torch.save/load)."""
        meta = {
            "method": self.method,
            "version": STATISTICS_VERSION,
            "threshold": self.threshold,
            "margin": self.margin,
            "truncation": self.truncation,
            "residual_floor": RESIDUAL_FLOOR,
            "weights_sha256": self.weights,
            "features": {
                "what": "invariant (0e) channels of the layers before any field coupling (field-independent)",
                "layout": [list(entry) for entry in self.layout],
                "dim": self.n_features,
            },
            "heads": {
                head: {str(z): s.describe() for z, s in sorted(per_element.items())}
                for head, per_element in self.heads.items()
            },
            "references": self.references,
        }
        tensors = {
            head: {
                str(z): {
                    "basis": s.basis.detach().cpu().to(torch.float64).clone(),
                    "coefficients": s.coefficients.detach().cpu().to(torch.float64).clone(),
                    "residual_radius": s.residual_radius.detach().cpu().to(torch.float64).clone(),
                }
                for z, s in per_element.items()
            }
            for head, per_element in self.heads.items()
        }
        return {"statistics": json.dumps(meta, sort_keys=True), "tensors": tensors}

    @classmethod
    def from_payload(cls, payload: Dict) -> "ExtrapolationStatistics":
        meta = json.loads(payload["statistics"])
        version = int(meta.get("version", 0))
        if version > STATISTICS_VERSION:
            raise ValueError(f"extrapolation statistics version {meta['version']} is newer than this server's")
        if version < STATISTICS_VERSION:
            raise OutdatedStatistics(
                f"extrapolation statistics of version {version} grade the field-coupled features, which move with "
                f"the field (every atom above 1 at 0.05 V/A); this server grades field-free features "
                f"(version {STATISTICS_VERSION}): rerun macefield-calibrate on the reference frames")
        tensors = payload["tensors"]
        heads: Dict[str, Dict[int, ElementStatistics]] = {}
        for head, per_element in meta["heads"].items():
            heads[head] = {}
            for z, info in per_element.items():
                t = tensors[head][z]
                heads[head][int(z)] = ElementStatistics(
                    atomic_number=int(z),
                    basis=t["basis"],
                    coefficients=t["coefficients"],
                    residual_radius=t["residual_radius"],
                    n_reference=int(info["n_reference"]),
                    active_set=[tuple(a) for a in info.get("active_set", [])],
                    born_charge_norm=float(info["born_charge_norm_e"]),
                    force_rms=float(info["force_rms_eV_per_A"]),
                )
        return cls(meta["features"]["layout"], heads, references=meta.get("references"), threshold=meta["threshold"],
                   margin=meta["margin"], truncation=meta["truncation"], method=meta["method"],
                   weights=meta.get("weights_sha256"))

    def summary(self) -> Dict:
        """What ListModels and the CLI show: method, threshold, per head the elements and reference atom counts,
        and per head E_ref (V/A) of the field range."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "heads": {h: {str(z): s.n_reference for z, s in sorted(e.items())} for h, e in self.heads.items()},
            "field_reference_V_per_A": {h: self.field_reference(h) for h in self.heads},
        }


def element_grade(x: torch.Tensor, coefficients: torch.Tensor, basis: Optional[torch.Tensor],
                  inverse_radius: torch.Tensor) -> torch.Tensor:
    """max(max_j |(x V A^-1)_j|, |x - V V^T x| / rho) of feature rows ``x`` (n, d), before the margin.

    ``basis`` None: no thin directions (the kept basis spans all d), no residual term.
    """
    g = (x @ coefficients).abs().amax(dim=1)
    if basis is not None:
        residual = torch.linalg.vector_norm(x - (x @ basis) @ basis.T, dim=1) * inverse_radius
        g = torch.maximum(g, residual)
    return g


# ---------------------------------------------------------- model binding
def statistics_of(model) -> Optional[ExtrapolationStatistics]:
    """The model's extrapolation statistics, or None (not calibrated)."""
    return getattr(model, "extrapolation_statistics", None)


def calibrated_heads(model) -> List[str]:
    """Heads of ``model`` that have statistics, in the model's head order."""
    stats = statistics_of(model)
    if stats is None:
        return []
    return [h for h in (getattr(model, "heads", None) or ["Default"]) if h in stats.heads]


def weights_fingerprint(model) -> str:
    """SHA-256 of the model's parameters (names and values as float64): statistics belong to these weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def attach(model, statistics: Optional[ExtrapolationStatistics]):
    """Set (or with None remove) ``model``'s statistics after checking they fit it; returns the model."""
    if statistics is not None:
        layout = feature_layout(model)
        if [tuple(e) for e in layout] != statistics.layout:
            raise ValueError(
                f"extrapolation statistics: feature layout {statistics.layout} does not match the model's {layout} "
                "(statistics of another architecture)"
            )
        heads = list(getattr(model, "heads", None) or ["Default"])
        unknown = sorted(set(statistics.heads) - set(heads))
        if unknown:
            raise ValueError(f"extrapolation statistics: head(s) {unknown} not in the model (heads {heads})")
        metadata = getattr(model, "metadata", None)
        if isinstance(metadata, dict) and "extrapolation_dropped" in metadata:  # recalibrated: the reason is gone
            model.metadata = {k: v for k, v in metadata.items() if k != "extrapolation_dropped"}
    model.extrapolation_statistics = statistics
    return model


def grade_from_layers(model, graph: Dict[str, torch.Tensor], layer_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) grades of a batch from the node features its forward pass collected (see ``FieldMACE.enthalpy``)."""
    stats = statistics_of(model)
    if stats is None:
        raise ValueError("outputs: extrapolation needs statistics: this model has none (run macefield-calibrate)")
    with torch.no_grad():
        features = invariant_features(layer_features, stats.layout)
        node_heads = graph["head"][graph["batch"]]
        return stats.grade(model, features, graph["node_attrs"], node_heads)


def field_extrapolation(model, graph: Dict[str, torch.Tensor], field: torch.Tensor) -> torch.Tensor:
    """(G,) field range of a batch at fields ``field`` (G, 3) V/A.

    See :meth:`ExtrapolationStatistics.field_extrapolation`.
    """
    stats = statistics_of(model)
    if stats is None:
        raise ValueError("outputs: field_extrapolation needs statistics: this model has none (run macefield-calibrate)")
    with torch.no_grad():
        return stats.field_extrapolation(model, graph, field)


# --------------------------------------------------------------- calibrate
