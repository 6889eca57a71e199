"""ASE calculator backed by a MACE-Field server (needs ``ase``; never torch).

::

    from macefield_client.ase import MACEFieldCalculator

    atoms.calc = MACEFieldCalculator("127.0.0.1:50051", electric_field=(0.0, 0.0, 0.05))
    atoms.get_forces(); atoms.get_stress(); calc.get_property("polarization", atoms)

Results.  The first block has the names, shapes and meanings of the reference
MACE-Field ASE calculator (drop-in compatible); the second block has
unambiguous names for the same quantities, the ones the server API uses:

============================ ========== ======================================================
``energy``, ``free_energy``  ()         electric enthalpy F(R, E), eV
``forces``                   (N, 3)     -dF/dR, eV/A
``stress``                   (6,)       Voigt (xx, yy, zz, yz, xz, xy), eV/A^3, ASE sign
                                        (periodic in all three directions only)
``dipole``                   (3,)       -dF/dE, e*A
``polarization``             (3,)       dipole / volume, e/A^2 (periodic only; defined
                                        modulo the polarization quantum e*a_k/volume)
``becs``                     (N, 9)     Born charges d dipole_i / d R_kj, row-major (i, j), e
``polarizability``           (9,)       reference convention: chi = alpha / (volume * eps0),
                                        dimensionless, row-major (periodic only)
``molecular_polarizability`` (3, 3)     alpha = d dipole/dE, e*A^2/V (not fully periodic only)
---------------------------- ---------- ------------------------------------------------------
``born_charges``             (N, 3, 3)  Z*[k, i, j] = d dipole_i / d R_kj, e
``alpha``                    (3, 3)     alpha = d dipole/dE (extensive), e*A^2/V (always)
``eps_inf``                  (3, 3)     1 + chi, dimensionless (periodic only)
``extrapolation``            (N,)       extrapolation grade per atom, dimensionless (models
                                        with statistics; > 1: extrapolating)
``extrapolation_max``        ()         its largest value in the structure
``field_extrapolation``      ()         |E| / E_ref: the field against the head's reference field, dimensionless
                                        (> 1: beyond what the training data describe; models with statistics)
============================ ========== ======================================================

Extrapolation.  Where the model has reference statistics
(``macefield-calibrate``; the embedded default model has them for both
heads) every result carries the per-atom extrapolation grade, at almost no
cost.  When a structure's largest grade passes ``extrapolation_threshold``
(default: the model's, from ListModels; 1 when it reports none: outside
everything the training set showed the model) the calculator, by default (``extrapolation="warn"``), emits one
:class:`~macefield_client.errors.ExtrapolationWarning` per calculator (one
per MD run: later ones are only counted in ``calc.extrapolation_flagged``);
``extrapolation="raise"`` raises
:class:`~macefield_client.errors.ExtrapolationError` at every such structure
(and at the first call if the model has no statistics);
``extrapolation="ignore"`` stays silent.  A model without statistics gives
no grade (``extrapolation`` is then not implemented) and, with "warn", one
warning saying so.

Structures that are not periodic in all three directions have no volume:
they get no ``polarization``, ``polarizability``, ``eps_inf`` or ``stress``
(asking for them raises ``PropertyNotImplementedError``) but get
``molecular_polarizability`` and ``alpha``.

The field (V/A) is the ``electric_field`` argument/attribute when set (it
may be changed between MD steps; a change discards cached results), else
``atoms.info["electric_field"]``, else ``atoms.info["REF_electric_field"]``,
else zero.  A non-zero field taken from ``atoms.info`` is announced with a
:class:`~macefield_client.errors.FieldFromFileWarning` naming the key and
the magnitude (once per calculator and key): a placeholder written into a
data file is never applied silently.  ``electric_field=(0, 0, 0)`` ignores
``atoms.info``.

The head: ``head`` when given, else the server chooses per structure the
head trained on its elements; a structure with elements its head was never
trained on is refused unless ``allow_unseen_elements=True``.

Cost: energy, forces, stress, dipole and polarization come from one
first-derivative pass and are computed together; ``becs``,
``born_charges``, ``polarizability``, ``molecular_polarizability``,
``alpha`` and ``eps_inf`` need the second-derivative pass (about 3x the
cost) and are only computed when asked for (pass ``outputs="all"`` to get
everything at every step).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ..contract import DEFAULT_OUTPUTS, field_vector
from ..core.channel import Target
from ..core.client import Client
from ..core.errors import FieldFromFileWarning
from .monitor import MODES, ExtrapolationMonitor, user_stacklevel

_FIRST = DEFAULT_OUTPUTS
_SECOND = _FIRST + ("born_charges", "polarizability")
_SECOND_ORDER_PROPERTIES = {"becs", "born_charges", "polarizability", "molecular_polarizability", "alpha", "eps_inf"}


def field_source(override, atoms) -> tuple[str | None, np.ndarray]:
    """(the ``atoms.info`` key the field came from, or None, the field in V/A) for ``atoms``:
    ``override``, else info["electric_field"], else info["REF_electric_field"], else 0."""
    if override is None and atoms is not None:
        for key in ("electric_field", "REF_electric_field"):
            if atoms.info.get(key) is not None:
                return key, field_vector(atoms.info[key], f"atoms.info[{key!r}]")
    return None, field_vector(override, "electric_field")


def resolve_field(override, atoms) -> np.ndarray:
    """The field for ``atoms``: ``override``, else info["electric_field"], else info["REF_electric_field"], else 0."""
    return field_source(override, atoms)[1]


def _getter(name: str, doc: str):
    """A ``get_<name>(atoms=None)`` method returning ``get_property(name, atoms)``."""

    def get(self, atoms=None):
        return self.get_property(name, atoms)

    get.__name__ = f"get_{name}"
    get.__doc__ = doc
    return get


class MACEFieldCalculator(Calculator):
    """ASE calculator for a MACE-Field server.

    Args:
        server: ``host:port`` of the server (default ``$MACEFIELD_SERVER`` or 127.0.0.1:50051), or
            several replicas (a list of ``host:port``, a comma-separated string, ``dns:///name:port``):
            the session stays on one replica and moves to another, resending the step, if that one
            dies or drains.
        electric_field: (3,) V/A for every calculation; None: from ``atoms.info`` (see module doc).
        model, head: served model and head (None: the server's default model; the head trained on the
            structure's elements).
        allow_unseen_elements: evaluate structures with elements the head was never trained on (refused
            otherwise).
        client: an existing :class:`~macefield_client.Client` to use instead of ``server``.
        tls, token, timeout, retry, tls_server_name, health_check: passed to
            :class:`~macefield_client.Client` (``tls_server_name``: TLS with a list of replicas).
        use_session: keep one PredictStream open across calls (MD); False: one Predict per call.
        outputs: None (what ASE asks for, see module doc) or "all" (second derivatives at every call).
        extrapolation: "warn" (one warning per calculator when a structure's grade passes the
            threshold), "raise" (ExtrapolationError at every such structure) or "ignore".
        extrapolation_threshold: grade above which a structure counts as extrapolating (None: the served
            model's, from ListModels; 1 when it reports none).
    """

    #: ASE's Calculator API: a class-level list
    implemented_properties = ["energy", "free_energy", "forces", "stress", "dipole", "polarization",  # noqa: RUF012
                              "becs", "polarizability", "molecular_polarizability", "born_charges", "alpha", "eps_inf",
                              "extrapolation", "extrapolation_max", "field_extrapolation"]

    def __init__(self, server: Target | None = None, *, electric_field: Sequence[float] | None = None,
                 model: str | None = None, head: str | None = None, client: Client | None = None,
                 tls=None, token: str | None = None, timeout: float | None = None, retry=None,
                 tls_server_name: str | None = None, health_check: bool | None = None,
                 use_session: bool = True, outputs=None, extrapolation: str = "warn",
                 extrapolation_threshold: float | None = None, allow_unseen_elements: bool = False, **kwargs):
        if extrapolation not in MODES:
            raise ValueError(f'extrapolation: "warn", "raise" or "ignore", got {extrapolation!r}')
        self._owns_client = client is None
        self.client = client if client is not None else Client(server, tls=tls, token=token, timeout=timeout,
                                                               retry=retry, tls_server_name=tls_server_name,
                                                               health_check=health_check)
        #: the extrapolation watch (threshold, mode, count of flagged calculations)
        self.monitor = ExtrapolationMonitor(self.client, mode=extrapolation, threshold=extrapolation_threshold,
                                            once_note="see calc.extrapolation_flagged")
        Calculator.__init__(self, **kwargs)
        self.extrapolation = extrapolation
        self.model = model
        self.head = head
        self.always_all = outputs == "all"
        if outputs not in (None, "all"):
            raise ValueError('outputs: None or "all"')
        self.allow_unseen_elements = allow_unseen_elements
        self._session = (self.client.session(model=model, head=head, allow_unseen_elements=allow_unseen_elements)
                         if use_session else None)
        self._announced: set[str] = set()  #: atoms.info keys whose field was announced
        self._electric_field = None if electric_field is None else resolve_field(electric_field, None)
        self.field_used: np.ndarray | None = None  #: the field of the cached results, V/A
        self.last_result = None  #: the client Result behind the cached results

    @property
    def extrapolation_flagged(self) -> int:
        """Calculations whose structure passed the threshold."""
        return self.monitor.flagged

    @property
    def extrapolation_threshold(self) -> float | None:
        """The threshold given (None: the served model's, see :class:`~.monitor.ExtrapolationMonitor`)."""
        return self.monitor.threshold

    # ------------------------------------------------------------- field
    @property
    def electric_field(self) -> np.ndarray | None:
        return None if self._electric_field is None else self._electric_field.copy()

    @electric_field.setter
    def electric_field(self, value) -> None:
        new = None if value is None else resolve_field(value, None)
        old = self._electric_field
        same = (new is None and old is None) or (new is not None and old is not None and np.array_equal(new, old))
        self._electric_field = new
        if not same:
            self.results = {}  # a changed field invalidates every cached result

    def check_state(self, atoms, tol: float = 1e-15):
        changes = Calculator.check_state(self, atoms, tol=tol)
        if (not changes and self.field_used is not None
                and not np.array_equal(resolve_field(self._electric_field, atoms), self.field_used)):
            changes.append("electric_field")
        return changes

    # -------------------------------------------------------- calculate
    def _outputs(self, properties) -> Sequence[str]:
        if self.always_all or properties is None or set(properties) & _SECOND_ORDER_PROPERTIES:
            return _SECOND
        return _FIRST

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        key, field = field_source(self._electric_field, atoms)
        if key is not None and key not in self._announced and np.any(field):
            self._announced.add(key)
            warnings.warn(f"electric field {field.tolist()} V/A (|E| = {np.linalg.norm(field):.3g} V/A) taken from "
                          f"atoms.info[{key!r}]; pass electric_field=(0, 0, 0) to the calculator to ignore it, or "
                          "electric_field=... to set it", FieldFromFileWarning, stacklevel=user_stacklevel())
        outputs = self._outputs(properties)
        if self._session is not None:
            r = self._session.predict(atoms, electric_field=field, outputs=outputs)
        else:
            r = self.client.predict(atoms, electric_field=field, outputs=outputs, model=self.model, head=self.head,
                                    allow_unseen_elements=self.allow_unseen_elements)
        n = len(atoms)
        results = {"energy": float(r.energy), "free_energy": float(r.energy)}
        if r.forces is not None:
            results["forces"] = r.forces
        if r.stress is not None:
            results["stress"] = full_3x3_to_voigt_6_stress(r.stress)
        if r.dipole is not None:
            results["dipole"] = r.dipole
        if r.polarization is not None:
            results["polarization"] = r.polarization
        if r.born_charges is not None:
            results["becs"] = r.born_charges.reshape(n, 9)
            results["born_charges"] = r.born_charges
        if r.polarizability is not None:
            results["alpha"] = r.polarizability
        if r.chi is not None:
            results["polarizability"] = r.chi.reshape(9)
            results["eps_inf"] = r.eps_inf
        elif r.polarizability is not None:
            results["molecular_polarizability"] = r.polarizability
        self.last_result = r
        if r.extrapolation is not None:
            results["extrapolation"] = r.extrapolation
            results["extrapolation_max"] = float(r.extrapolation_max)
        if r.get("field_extrapolation") is not None:
            results["field_extrapolation"] = float(r["field_extrapolation"])
        self.monitor.check(r, symbols=atoms.get_chemical_symbols(), field=field)
        self.results = results
        self.field_used = field

    # ASE-style getters, one per extra property: ``calc.get_born_charges(atoms)`` = ``get_property("born_charges")``
    get_extrapolation = _getter("extrapolation", "Extrapolation grade per atom (N,), dimensionless; above the "
                                "threshold: extrapolating (models with statistics).")
    get_polarization = _getter("polarization", "Reference convention: P (3,), e/A^2 (periodic only).")
    get_becs = _getter("becs", "Reference convention: Z* (N, 9), e.")
    get_polarizability = _getter("polarizability", "Reference convention: chi (9,), dimensionless (periodic only); "
                                 "see :meth:`get_alpha`.")
    get_born_charges = _getter("born_charges", "Z* (N, 3, 3), e.")
    get_alpha = _getter("alpha", "alpha = d dipole/dE (3, 3), e*A^2/V (extensive; any structure).")
    get_eps_inf = _getter("eps_inf", "Clamped-ion dielectric tensor eps_inf = 1 + chi (3, 3) (periodic only).")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._owns_client:
            self.client.close()


__all__ = ["MACEFieldCalculator", "field_source", "resolve_field"]
