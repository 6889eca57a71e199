"""FieldMACE: a MACE potential whose node features feel a uniform electric field.

The model learns one scalar, the electric enthalpy F(R, E) in eV, for atomic
positions R (Angstrom) and a uniform field E (V/Angstrom) per structure.  The
field enters after the product block of every interaction layer except the
last::

    h <- h - field_linear[i](field_feats[i](h, E))

where ``field_feats[i]`` is a fully connected tensor product of the hidden
irreps with E taken as a ``1o`` irrep, and ``field_linear[i]`` an equivariant
linear map back onto the hidden irreps.  With both at zero the model is
exactly the underlying :class:`mace.modules.ScaleShiftMACE`.  The attribute
names match the public reference implementation (``MACEField`` of
mdi-group/mace-field), so its state dicts load parameter for parameter.

All derivatives (forces, stress, dipole, Born charges, polarizability) are
taken by :mod:`macefield_server.engine.response`; this module only defines F.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import mace  # noqa: F401  (must be imported before e3nn on torch >= 2.6)
import torch
from e3nn import o3
from mace.modules.models import ScaleShiftMACE
from mace.modules.wrapper_ops import FullyConnectedTensorProduct, Linear
from mace.tools.scatter import scatter_sum

from .contraction_basis import install_basis_hooks
from .core_repulsion import CoreRepulsion

FIELD_IRREPS = o3.Irreps("1o")
#: mace interaction blocks whose radial MLPs (e3nn, no biases) map zero radial features to zero weights, so that the
#: core repulsion's switch silences an edge's messages
_FADING_BLOCKS = frozenset({"RealAgnosticResidualInteractionBlock", "RealAgnosticInteractionBlock",
                            "RealAgnosticDensityInteractionBlock", "RealAgnosticDensityResidualInteractionBlock"})


class FieldMACE(ScaleShiftMACE):
    """ScaleShiftMACE with field coupling; keyword arguments are those of ScaleShiftMACE.

    ``arch_config`` (a JSON-able dict, see :mod:`.architecture`) is attached by
    the builders so that the model can be saved in the native format.
    ``core_repulsion`` (optional, not a ScaleShiftMACE argument): the
    description of a :class:`.core_repulsion.CoreRepulsion`, which takes the
    learned part out below the data's shortest pair distances.
    """

    def __init__(self, core_repulsion=None, **kwargs):
        super().__init__(**kwargs)
        if core_repulsion is not None:
            self.set_core_repulsion(core_repulsion)
        hidden_irreps = o3.Irreps(kwargs["hidden_irreps"])
        cueq_config = kwargs.get("cueq_config")
        n_coupled = int(self.num_interactions) - 1
        self.field_feats = torch.nn.ModuleList(
            FullyConnectedTensorProduct(
                irreps_in1=hidden_irreps,
                irreps_in2=FIELD_IRREPS,
                irreps_out=hidden_irreps,
                cueq_config=cueq_config,
            )
            for _ in range(n_coupled)
        )
        self.field_linear = torch.nn.ModuleList(
            Linear(irreps_in=hidden_irreps, irreps_out=hidden_irreps, cueq_config=cueq_config)
            for _ in range(n_coupled)
        )
        # U matrices and weights load in whatever symmetric-contraction basis the
        # checkpoint holds (see .contraction_basis): loading never depends on what is installed
        install_basis_hooks(self)

    def set_core_repulsion(self, spec: Optional[Dict]) -> None:
        """Install (a description, see :mod:`.core_repulsion`) or remove (None) the core repulsion, in place.

        The architecture description attached to the model (``arch_config``)
        is updated with it, so saved checkpoints rebuild it.
        """
        net: Any = self  # mace's buffers and attributes, read duck-typed
        if spec is not None and getattr(net.radial_embedding, "apply_cutoff", True):
            # the switch scales the radial features that feed each radial MLP: that silences an edge only where
            # the MLP maps 0 to 0 and nothing else reads the features (e3nn's bias-free MLPs in these blocks)
            for block in net.interactions:
                name = type(block).__name__
                if name not in _FADING_BLOCKS or type(block.conv_tp_weights).__name__ != "FullyConnectedNet":
                    raise ValueError(f"core_repulsion: interaction block {name} is not one whose messages the "
                                     f"switch silences (supported: {sorted(_FADING_BLOCKS)})")
        if spec is None:
            if hasattr(net, "core_repulsion"):
                del net.core_repulsion
        else:
            core = CoreRepulsion(net.atomic_numbers.tolist(), list(net.heads), spec["inner"], spec["width"])
            net.core_repulsion = core.to(net.atomic_numbers.device)
        arch = getattr(net, "arch_config", None)
        if isinstance(arch, dict):
            arch["core_repulsion"] = net.core_repulsion.spec() if spec is not None else None

    @property
    def field_free_layers(self) -> int:
        """Interaction layers whose features (before any coupling) never see the field.

        The couplings start after layer 0's product block, so layer 0 taken
        before its coupling is exactly field-independent and every later layer
        is not (its input has been coupled).  Without couplings (a plain MACE,
        one interaction): every layer.
        """
        return 1 if len(self.field_feats) else len(self.interactions)

    # ------------------------------------------------------------------ energy
    def enthalpy(
        self,
        graph: Dict[str, torch.Tensor],
        positions: torch.Tensor,
        electric_field: torch.Tensor,
        strain: Optional[torch.Tensor] = None,
        layer_features: Optional[List[torch.Tensor]] = None,
        field_free_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Electric enthalpy per structure.

        Args:
            graph: batched graph (see :mod:`.graph`): ``node_attrs``,
                ``edge_index`` (sender, receiver), ``unit_shifts``, ``shifts``,
                ``cell`` (G*3, 3), ``batch``, ``ptr``, ``head``.
            positions: (N, 3) Angstrom; pass a leaf that requires grad to get forces
                (float64 keeps forces and Born charges summed in float64).
            electric_field: (G, 3) V/Angstrom, one field per structure (float64
                likewise for the dipole and polarizability).
            strain: optional (G, 3, 3) strain leaf (symmetrised here) for stress.
            layer_features: optional list; when given, the node features of
                every interaction layer (N, irreps of that layer, the inputs of
                the readouts) are appended to it, in layer order, so that
                callers can read them from the same pass (the extrapolation
                grade did before it became field-free).  None (the default)
                changes nothing.
            field_free_features: optional list; when given, the node features
                of the first :attr:`field_free_layers` layers, taken after the
                product block and *before* the field coupling (exactly
                independent of the field), are appended to it in layer order:
                what the extrapolation grade reads.  No extra computation.

        Edge vectors are built in float64 and cast to the model's dtype; the
        per-atom energies are summed in float64.

        Returns:
            (F_total, F_interaction), both (G,) float64 in eV; F_total includes
            the atomic reference energies, which depend on neither R nor E.
        """
        batch = graph["batch"]
        num_graphs = graph["ptr"].numel() - 1
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        node_attrs = graph["node_attrs"]
        dtype = node_attrs.dtype
        node_heads = graph["head"][batch]
        atom_index = torch.arange(positions.shape[0], device=positions.device)

        # Geometry in float64: edge vectors are differences of (canonical) positions plus lattice shifts, and in
        # float32 those differences would lose the digits of large coordinates.  Only the vectors are cast.
        wide = torch.float64
        positions = positions.to(wide)
        if strain is not None:
            eps = 0.5 * (strain + strain.transpose(-1, -2)).to(wide)
            positions = positions + torch.einsum("ni,nij->nj", positions, eps[batch])
            cell = graph["cell"].to(wide).view(-1, 3, 3)
            cell = cell + cell @ eps
            shifts = torch.einsum("ei,eij->ej", graph["unit_shifts"].to(wide), cell[batch[sender]])
        else:
            shifts = graph["shifts"].to(wide)
        vectors_wide = positions[receiver] - positions[sender] + shifts
        lengths_wide = torch.linalg.norm(vectors_wide, dim=-1, keepdim=True)
        lengths = lengths_wide.to(dtype)
        vectors = vectors_wide.to(dtype)

        node_e0 = self.atomic_energies_fn(node_attrs)[atom_index, node_heads]
        e0 = scatter_sum(node_e0.to(wide), batch, dim=0, dim_size=num_graphs)

        node_feats = self.node_embedding(node_attrs)
        edge_attrs = self.spherical_harmonics(vectors)
        edge_feats, cutoff = self.radial_embedding(
            lengths, node_attrs, graph["edge_index"], self.atomic_numbers
        )
        core: Optional[CoreRepulsion] = getattr(self, "core_repulsion", None)
        core_energy = None
        if core is not None:
            # below each pair's inner distance the edge's messages fade out (every layer) and ZBL takes over
            inner = core.edge_inner(node_attrs, graph["edge_index"], node_heads[receiver])
            switch = core.switch(lengths_wide, inner)
            if cutoff is None:  # radial features times the outer cutoff feed the radial MLPs (no biases: 0 -> 0)
                edge_feats = edge_feats * switch.to(dtype)
            else:
                cutoff = cutoff * switch.to(dtype)
            core_nodes = core.node_energies(lengths_wide, switch, node_attrs, graph["edge_index"])
            core_energy = scatter_sum(core_nodes, batch, dim=-1, dim_size=num_graphs)
        if hasattr(self, "pair_repulsion"):
            node_energies = [
                self.pair_repulsion_fn(lengths, node_attrs, graph["edge_index"], self.atomic_numbers)
            ]
        else:
            node_energies = [torch.zeros_like(node_e0)]

        atom_field = electric_field[batch].to(dtype)  # a float64 field leaf sums the dipole in float64
        n_coupled = len(self.field_feats)
        layer_feats = []
        for i, (interaction, product) in enumerate(zip(self.interactions, self.products)):
            node_feats, sc = interaction(
                node_attrs=node_attrs,
                node_feats=node_feats,
                edge_attrs=edge_attrs,
                edge_feats=edge_feats,
                edge_index=graph["edge_index"],
                cutoff=cutoff,
                first_layer=(i == 0),
                lammps_class=None,
                lammps_natoms=(0, 0),
            )
            node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
            if field_free_features is not None and i < self.field_free_layers:
                field_free_features.append(node_feats)
            if i < n_coupled:
                coupling = self.field_feats[i](node_feats, atom_field)
                node_feats = node_feats - self.field_linear[i](coupling)
            layer_feats.append(node_feats)
        if layer_features is not None:
            layer_features.extend(layer_feats)

        for i, readout in enumerate(self.readouts):
            feats = layer_feats[-1] if len(self.readouts) == 1 else layer_feats[i]
            node_energies.append(readout(feats, node_heads)[atom_index, node_heads])

        node_inter = self.scale_shift(torch.stack(node_energies, dim=0).sum(dim=0), node_heads)
        # per-atom energies summed in float64: a large cell's energy per atom equals its unit cell's
        inter = scatter_sum(node_inter.to(wide), batch, dim=-1, dim_size=num_graphs)
        if core_energy is not None:  # physical ZBL in eV: after the per-head scale
            inter = inter + core_energy
        return e0 + inter, inter

    # -------------------------------------------------- mace-style entry point
    # the field flags replace mace's virials/hessian/edge-force flags, so positional arguments past
    # ``compute_force`` mean something else than in ScaleShiftMACE.forward: deliberate, not a stub error
    def forward(  # type: ignore[override]  # pylint: disable=arguments-differ
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        compute_force: bool = True,
        compute_stress: bool = False,
        compute_polarization: bool = False,
        compute_becs: bool = False,
        compute_polarizability: bool = False,
        electric_field: Optional[torch.Tensor] = None,
        **_ignored,
    ) -> Dict[str, Optional[torch.Tensor]]:
        """mace-torch style call on a batched graph dict; returns batched tensors.

        ``electric_field`` (G, 3) or (3,) in V/A overrides ``data["electric_field"]``.
        Keys: energy (G,), forces (N, 3), stress (G, 3, 3), dipole (G, 3),
        polarization (G, 3), becs (N, 3, 3), polarizability (G, 3, 3) as
        d dipole/dE in e*A^2/V.  Scripts should prefer :func:`.predict`.
        """
        from .response import respond  # local: response imports this module

        wanted = {"energy"}
        if compute_force:
            wanted.add("forces")
        if compute_stress:
            wanted.add("stress")
        if compute_polarization:
            wanted.add("polarization")
        if compute_becs:
            wanted.add("born_charges")
        if compute_polarizability:
            wanted.add("polarizability")
        if electric_field is None:
            electric_field = data.get("electric_field")
        out: Dict[str, Optional[torch.Tensor]] = dict(
            respond(self, data, electric_field, frozenset(wanted), keep_graph=training)
        )
        out["becs"] = out.pop("born_charges", None)
        return out
