"""parse_request without a server: every invalid field is refused by name (InvalidRequest, whose message
starts with the field), and a valid request becomes the structure, head and outputs it asked for.

The registry holds a tiny random model (built once, never evaluated here)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import quartz_like, sio_molecule
from macefield_client.contract import DEFAULT_OUTPUTS
from macefield_server.serving.config import LimitsConfig
from macefield_server.serving.registry import ModelRegistry, ServedModel
from macefield_server.serving.validation import (
    MAX_OUTPUTS,
    MAX_REQUEST_ID,
    InvalidRequest,
    TooLarge,
    parse_request,
)
from serving import assign_field, replace_field, request_for

LIMITS = LimitsConfig(max_atoms_per_structure=40, max_field=0.5, max_extent=100.0)


@pytest.fixture(scope="module")
def registry(two_head_model):
    model = copy.deepcopy(two_head_model)  # O and Si, cutoff 4 A; a copy: ServedModel freezes its parameters
    return ModelRegistry([ServedModel("tiny", model, "sio2")])


def valid():
    return request_for(quartz_like(), field=(0.01, 0.0, 0.02), outputs=["forces", "stress", "born_charges"],
                       request_id="ok")


def index(field, i, value):
    def mutate(r):
        getattr(r, field)[i] = value
    return mutate


def becomes(atoms):
    def mutate(r):
        r.CopyFrom(request_for(atoms))
    return mutate


def spread_molecule(r):
    r.CopyFrom(request_for(sio_molecule()))
    r.positions[3] = 150.0  # the Si atom 150 A from the O: wider than max_extent along non-periodic directions


def long_cell(r):
    atoms = quartz_like()
    atoms.set_cell(atoms.cell * [[30.0], [1.0], [1.0]], scale_atoms=False)  # a1 about 147 A
    r.CopyFrom(request_for(atoms))


#: case -> (mutation of a valid request, the field the message must start with, words the message must hold)
BAD = {
    "request_id too long": (assign_field("request_id", "x" * (MAX_REQUEST_ID + 1)), "request_id", "more than 256"),
    "model name too long": (assign_field("model", "m" * 300), "model", "more than 256"),
    "unknown model": (assign_field("model", "nope"), "model", "unknown model 'nope'; served: ['tiny']"),
    "unknown head": (assign_field("head", "nope"), "head", "unknown head 'nope'"),
    "too many outputs": (replace_field("outputs", ["forces"] * (MAX_OUTPUTS + 1)), "outputs", "33 entries"),
    "unknown output": (replace_field("outputs", ["forces", "magnetization"]), "outputs", "magnetization"),
    "grade without statistics": (replace_field("outputs", ["extrapolation"]), "outputs", "no extrapolation statistics"),
    "zero atoms": (lambda r: (replace_field("atomic_numbers", [])(r), replace_field("positions", [])(r)),
                   "atomic_numbers", "at least one atom"),
    "too many atoms": (becomes(quartz_like((3, 2, 1))), "atomic_numbers", "54 atoms exceed"),
    "element not in model": (index("atomic_numbers", 8, 79), "atomic_numbers", "Au (79)"),
    "positions length": (replace_field("positions", [0.0] * 10), "positions", "got 10 values"),
    "positions NaN": (index("positions", 4, float("nan")), "positions", "non-finite value nan at index 4"),
    "coordinate too far": (index("positions", 0, 2e7), "positions", "|coordinate| above"),
    "molecule too wide": (spread_molecule, "positions", "non-periodic directions"),
    "pbc length": (replace_field("pbc", [True, True]), "pbc", "got 2"),
    "cell length": (replace_field("cell", [1.0] * 6), "cell", "got 6 values"),
    "cell inf": (index("cell", 0, float("inf")), "cell", "non-finite"),
    "singular cell": (replace_field("cell", [4.9, 0, 0, 2.45, 0, 0, 0, 0, 5.4]), "cell", "singular cell"),
    "pbc without cell": (replace_field("cell", []), "cell", "singular cell"),
    "lattice vector too long": (long_cell, "cell", "exceeds the server's limit of 100 A"),
    # its square overflows a float (a ** 2 in Python raises OverflowError): still a named refusal
    "lattice vector of 1e154 A": (replace_field("cell", [0, 0, 1.3407807929942597e154, 0, 1, 0, 1, 0, 0]), "cell",
                                  "lattice vector of 1.34078e+154 A exceeds"),
    "field length": (replace_field("electric_field", [0.1, 0.2]), "electric_field", "got 2 values"),
    "field NaN": (index("electric_field", 1, float("nan")), "electric_field", "non-finite"),
    "field too strong": (replace_field("electric_field", [0.0, 0.0, 0.6]), "electric_field", "|E| = 0.6 V/A"),
    "field of 1e200 V/A": (replace_field("electric_field", [0.0, 1e200, 0.0]), "electric_field", "|E| = 1e+200 V/A"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_field_is_named(case, registry):
    mutate, field, words = BAD[case]
    request = valid()
    mutate(request)
    with pytest.raises(InvalidRequest) as info:
        parse_request(request, registry, LIMITS)
    assert type(info.value) is InvalidRequest  # not TooLarge: that one is RESOURCE_EXHAUSTED
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: "), str(info.value)
    assert words in str(info.value), str(info.value)


def test_the_valid_request_is_valid(registry):
    """The mutations above break a request that parses: each refusal is the mutation's doing."""
    parsed = parse_request(valid(), registry, LIMITS)
    atoms = quartz_like()
    assert (parsed.request_id, parsed.served.name, parsed.head, parsed.head_index) == ("ok", "tiny", "sio2", 0)
    assert parsed.outputs == {"energy", "forces", "stress", "born_charges"}  # energy always comes along
    assert parsed.tier == 2 and parsed.n_atoms == len(atoms)
    s = parsed.structure
    np.testing.assert_array_equal(s.numbers, atoms.numbers)
    np.testing.assert_allclose(s.positions, atoms.positions, rtol=0, atol=0)
    np.testing.assert_allclose(s.cell, np.asarray(atoms.cell), rtol=0, atol=0)
    np.testing.assert_allclose(s.electric_field, [0.01, 0.0, 0.02])
    assert s.pbc.tolist() == [True, True, True] and s.head == "sio2"
    assert parsed.edges > 0


def test_defaults_head_outputs_and_an_open_molecule(registry):
    request = request_for(sio_molecule(), head="other")
    del request.pbc[:]
    del request.cell[:]
    del request.electric_field[:]
    parsed = parse_request(request, registry, LIMITS)
    assert parsed.head == "other" and parsed.head_index == 1
    assert parsed.structure.pbc.tolist() == [False, False, False]
    np.testing.assert_array_equal(parsed.structure.electric_field, np.zeros(3))
    assert parsed.outputs == set(DEFAULT_OUTPUTS) and parsed.tier == 1  # none asked for: the contract's default
    assert parse_request(request_for(sio_molecule()), registry, LIMITS).head == "sio2"  # the model's default


def test_prefixed_names_the_structure_in_a_batch():
    error = InvalidRequest("positions", "non-finite value nan at index 4").prefixed("structures[3].")
    assert isinstance(error, InvalidRequest) and error.field == "structures[3].positions"
    assert str(error) == "structures[3].positions: non-finite value nan at index 4"
    too_large = TooLarge("positions", "needs 1 GiB").prefixed("structures[0].")
    assert type(too_large) is TooLarge and str(too_large) == "structures[0].positions: needs 1 GiB"


def test_too_dense_is_refused_before_any_neighbour_list(registry):
    limits = LimitsConfig(max_edges_per_structure=50)
    with pytest.raises(InvalidRequest) as info:
        parse_request(valid(), registry, limits)
    assert str(info.value).startswith("positions: at most "), str(info.value)
    assert "neighbour pairs within 4 A (limit 50)" in str(info.value)
