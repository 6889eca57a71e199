"""The output table: every result name a request may ask for, its unit, shape, and what comes with it.

One table for the server (validation, engine, ListModels), the thin client
(requests, :class:`~macefield_client.Result`), the ASE calculator, the MD
bridges and the command line.  Units: see :data:`UNITS`; shapes for a
structure of ``n`` atoms: see :func:`shape`.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Tuple, Union

#: every output a request may ask for (PredictRequest.outputs), in the order documentation lists them
OUTPUTS: Tuple[str, ...] = ("energy", "forces", "stress", "dipole", "polarization", "polarization_quantum",
                            "born_charges", "polarizability", "chi", "eps_inf", "volume", "extrapolation",
                            "extrapolation_max", "field_extrapolation")

#: the extrapolation grade (per atom), its per-structure maximum and the field range (per structure):
#: they need the model's reference statistics (``macefield-calibrate``) and come with every result of
#: a head that has them (asking for them where there are none is INVALID_ARGUMENT); dimensionless,
#: one threshold, :data:`EXTRAPOLATION_THRESHOLD`:
#:
#: * ``extrapolation``: above 1 the atom's environment (field-free structural features) is outside
#:   every environment of the reference frames;
#: * ``field_extrapolation`` = |E| / E_ref (E_ref per head and element, from the model's Born charges
#:   and the reference frames' thermal force spread): above 1 the field displaces the ions further
#:   than the thermal displacements the reference frames sampled.  0 at zero field, linear in |E|.
GRADE_OUTPUTS: FrozenSet[str] = frozenset({"extrapolation", "extrapolation_max", "field_extrapolation"})

#: threshold of both the grade and the field range: above it, results are extrapolation from the
#: reference (training) set (ListModels reports it per model)
EXTRAPOLATION_THRESHOLD = 1.0

#: what a request that names no outputs gets, in every interface (server, in-process ``predict``,
#: Client, ASE, CLI): all first derivatives, which one backward pass gives together.  Z*, alpha,
#: chi and eps_inf need the second-derivative pass (about 3x the cost of energy + forces) and are
#: computed only when asked for.  Every result of a head with statistics also carries the grade
#: (:data:`GRADE_OUTPUTS`), asked for or not.
DEFAULT_OUTPUTS: Tuple[str, ...] = ("energy", "forces", "stress", "dipole", "polarization")

#: what ``"all"`` means: every output any model gives (the grade comes by itself where there are statistics)
ALL_OUTPUTS: Tuple[str, ...] = tuple(o for o in OUTPUTS if o not in GRADE_OUTPUTS)

#: outputs returned together with another one that was asked for: P is meaningless without its
#: quanta, chi and eps_inf come free with alpha, the grade's maximum and the field range with the grade
#: (and the grade with the field range: one set of statistics answers both)
COMPANIONS: Dict[str, Tuple[str, ...]] = {"polarization": ("polarization_quantum",),
                                          "polarizability": ("chi", "eps_inf"),
                                          "extrapolation": ("extrapolation_max", "field_extrapolation"),
                                          "field_extrapolation": ("extrapolation", "extrapolation_max")}

#: unit of every result array (and of the request's field)
UNITS: Dict[str, str] = {
    "energy": "eV",
    "forces": "eV/A",
    "stress": "eV/A^3",
    "dipole": "e*A",
    "polarization": "e/A^2",
    "polarization_quantum": "e/A^2",
    "born_charges": "e",
    "polarizability": "e*A^2/V",
    "chi": "dimensionless",
    "eps_inf": "dimensionless",
    "electric_field": "V/A",
    "volume": "A^3",
    "extrapolation": "dimensionless",
    "extrapolation_max": "dimensionless",
    "field_extrapolation": "dimensionless",
}

#: outputs that are one number per structure
SCALARS: FrozenSet[str] = frozenset({"energy", "volume", "extrapolation_max", "field_extrapolation"})

_FIXED_SHAPES: Dict[str, Tuple[int, ...]] = {
    "stress": (3, 3), "dipole": (3,), "polarization": (3,), "polarization_quantum": (3, 3),
    "polarizability": (3, 3), "chi": (3, 3), "eps_inf": (3, 3),
}
_PER_ATOM_SHAPES: Dict[str, Tuple[int, ...]] = {"forces": (3,), "born_charges": (3, 3), "extrapolation": ()}


def shape(name: str, n_atoms: int) -> Tuple[int, ...]:
    """Shape of output ``name`` for a structure of ``n_atoms`` atoms (``()`` for a scalar)."""
    if name in SCALARS:
        return ()
    if name in _PER_ATOM_SHAPES:
        return (n_atoms,) + _PER_ATOM_SHAPES[name]
    return _FIXED_SHAPES[name]


#: characters of a caller's value repeated in an error message (never echo a megabyte back)
ECHO = 64


def clip(value: object, limit: int = ECHO) -> str:
    """``value`` as text of at most ``limit`` characters (an ellipsis marks the cut): what error messages echo."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_outputs(outputs: Union[None, str, Iterable[str]]) -> FrozenSet[str]:
    """The output names a request means, validated.

    ``None`` or an empty list: :data:`DEFAULT_OUTPUTS`; ``"all"``: :data:`ALL_OUTPUTS`; a name or an
    iterable of names, each from :data:`OUTPUTS`.  Energy is always included.  Raises ``ValueError``
    starting with ``outputs:`` and naming the unknown names.
    """
    if outputs is None:
        return frozenset(DEFAULT_OUTPUTS)
    if isinstance(outputs, str):
        if outputs == "all":
            return frozenset(ALL_OUTPUTS)
        outputs = [outputs]
    wanted = frozenset(str(o) for o in outputs)
    if not wanted:
        return frozenset(DEFAULT_OUTPUTS)
    unknown = sorted(wanted - frozenset(OUTPUTS))
    if unknown:
        shown = [clip(name) for name in unknown[:8]]
        raise ValueError(f"outputs: unknown output(s) {shown}; known: {sorted(OUTPUTS)}")
    return wanted | {"energy"}


def wire_outputs(outputs: Union[None, str, Iterable[str]]) -> List[str]:
    """The list a client puts in ``PredictRequest.outputs``: empty for ``None`` (the server's default),
    otherwise the validated names (``"all"`` expanded), in table order."""
    if outputs is None:
        return []
    names = resolve_outputs(outputs)
    return [o for o in OUTPUTS if o in names]


__all__ = ["OUTPUTS", "GRADE_OUTPUTS", "EXTRAPOLATION_THRESHOLD", "DEFAULT_OUTPUTS", "ALL_OUTPUTS", "COMPANIONS",
           "UNITS", "SCALARS", "shape", "ECHO", "clip", "resolve_outputs", "wire_outputs"]
