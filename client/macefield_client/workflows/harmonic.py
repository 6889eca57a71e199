"""The harmonic route: Gamma-point phonons, IR intensities and the static dielectric tensor from one batch.

For a periodic structure of N atoms (the cell as given: its 3N Gamma-point modes):

1. optionally relax the positions (and the cell) through the service (:func:`~.relax.relax`);
2. one call with Z* and alpha at the reference structure: Born charges Z*_k,ij = d mu_i / d R_kj (e),
   eps_inf = 1 + alpha / (Omega eps0);
3. phonopy's symmetry-reduced finite displacements (+-``displacement`` A), all displaced structures in one
   ``predict_many`` (PredictBatch) call, forces minus the reference forces;
4. phonopy builds and symmetrises the force constants (acoustic sum rule: translational invariance
   imposed by ``symmetrize_force_constants``) and diagonalises the dynamical matrix at Gamma (analytic
   part: TO modes); spglib/phonopy give each mode's irreducible representation;
5. mode effective charges Z_m,i = sum_k,j Z*_k,ij e_m,kj / sqrt(M_k) (e/sqrt(amu); e_m the unit
   eigenvector of the dynamical matrix), IR intensity I_m = sum_i Z_m,i^2 (e^2/amu), and

       eps_0 = eps_inf + 1/(Omega eps0) sum_m Z_m Z_m^T / omega_m^2

   over the optical modes, with omega_m^2 the dynamical matrix's eigenvalue in eV/(A^2 amu), Omega in
   A^3 and eps0 in e/(V A): Z_m Z_m / omega_m^2 is in e^2 A^2 / eV = e A^2 / V, so the sum is
   dimensionless.

6. Raman activities (``raman=True``): the Raman tensor of mode m is R_m = d alpha / d Q_m, with Q_m the
   mass-weighted normal coordinate (amu^1/2 A) of the standard convention (atoms displaced by
   u_k = Q e_m,k / sqrt(M_k), e_m the unit eigenvector), so R_m = sum_kj d alpha / d u_kj e_m,kj / sqrt(M_k).
   ``raman_method="symmetry"`` (default): d alpha / d u by central differences (+-``raman_step`` A along x,
   y, z) of the symmetry-distinct atoms only, expanded to every atom by the space group
   (:func:`alpha_derivatives`); ``"modes"``: central differences along every mode, the largest atomic
   displacement ``raman_step`` A (6N structures).  Either way all displaced structures go in one
   ``predict_many`` call (polarizability only).  With alpha in A^3 (alpha / (4 pi eps0), the served
   e*A^2/V divided by 4 pi eps0 in e/(V*A)) the tensor is in A^2/amu^1/2 and the Raman activity
   (90-degree scattering of light polarised perpendicular to the scattering plane, no analyser)

       S_m = 45 a_m^2 + 7 gamma_m^2   (A^4/amu),  a = tr(R)/3,  gamma^2 = (3/2) tr(b^2),  b = R - a 1

   (gamma^2 = 1/2 [(Rxx-Ryy)^2 + (Ryy-Rzz)^2 + (Rzz-Rxx)^2] + 3 (Rxy^2 + Ryz^2 + Rzx^2), R symmetrised).

Degenerate modes (an E pair) have eigenvectors defined only up to a rotation within their space; each mode
of a degenerate set is given the set's mean intensity (IR) and activity (Raman), which are independent of
that choice (and of the crystal's orientation): both are quadratic forms in the eigenvector, whose trace
over the set is basis-free.  A degenerate set is a run of frequencies closer than ``DEGENERACY_CM1`` that
share their symmetry label: modes of different irreducible representations that happen to lie close (an
A1 and an A2 a few tenths of a cm^-1 apart) stay apart, since symmetry keeps their eigenvectors apart and
their intensities differ (an A1 mode of D3 is IR-silent however close an A2 mode lies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import EPS0, THZ_TO_CM1, cm1_to_omega2, json_ready, omega2_to_cm1

#: the served polarizability (e*A^2/V) divided by this is alpha / (4 pi eps0) in A^3
E_A2_PER_V_PER_A3 = 4.0 * np.pi * EPS0
RAMAN_METHODS = ("symmetry", "modes")
RAMAN_UNIT = ("A^4/amu (45 a^2 + 7 gamma^2 of d alpha/d Q, alpha in A^3, Q the mass-weighted normal "
              "coordinate in amu^1/2 A; mean over each degenerate set)")

#: frequencies closer than this (cm^-1) and with the same symmetry label form one degenerate set
DEGENERACY_CM1 = 0.5


@dataclass
class HarmonicResult:
    """Gamma-point phonons and dielectric response of one structure (arrays in mode order, ascending frequency)."""

    atoms: Any                      #: the reference structure (relaxed if asked)
    frequencies_cm1: np.ndarray     #: (3N,) cm^-1, negative for unstable modes
    eigenvectors: np.ndarray        #: (3N, N, 3) unit eigenvectors of the dynamical matrix
    labels: list[str]               #: (3N,) irreducible representation of each mode ("" where unknown)
    acoustic: np.ndarray            #: (3N,) bool: the three uniform translations
    mode_charges: np.ndarray        #: (3N, 3) Z_m, e/sqrt(amu)
    ir_intensities: np.ndarray      #: (3N,) e^2/amu (mean over each degenerate set)
    born_charges: np.ndarray        #: (N, 3, 3) e
    eps_inf: np.ndarray             #: (3, 3)
    eps_static: np.ndarray          #: (3, 3)
    volume: float                   #: A^3
    force_constants: np.ndarray     #: (N, N, 3, 3) eV/A^2, symmetrised
    point_group: str = ""
    space_group: str = ""
    lo_frequencies_cm1: np.ndarray | None = None  #: (3N,) with the non-analytic term along ``lo_direction``
    lo_direction: np.ndarray | None = None
    raman_activities: np.ndarray | None = None  #: (3N,) A^4/amu (mean over each degenerate set); None: not asked
    raman_tensors: np.ndarray | None = None     #: (3N, 3, 3) d alpha / d Q_m, A^2/amu^1/2 (alpha in A^3)
    info: dict = field(default_factory=dict)

    def _active(self, values: np.ndarray, key: str, threshold: float) -> list[dict]:
        """One entry per optical degenerate set whose summed ``values`` exceed ``threshold`` times the
        largest, strongest first: frequency (cm^-1), label, degeneracy, the sum under ``key``."""
        rows = []
        top = float(values.max()) or 1.0
        for g in degenerate_sets(self.frequencies_cm1, labels=self.labels):
            if self.acoustic[g].any():
                continue
            total = float(values[g].sum())
            if total > threshold * top:
                rows.append({"frequency_cm1": float(self.frequencies_cm1[g].mean()), "label": self.labels[g[0]],
                             "degeneracy": len(g), key: total})
        return sorted(rows, key=lambda r: -r[key])

    def optical_ir(self, threshold: float = 1e-3) -> list[dict]:
        """The IR-active optical modes (intensity above ``threshold`` times the largest), one entry per
        degenerate set, strongest first: frequency (cm^-1), label, degeneracy, summed intensity (e^2/amu)."""
        return self._active(self.ir_intensities, "intensity_e2_per_amu", threshold)

    def optical_raman(self, threshold: float = 1e-3) -> list[dict]:
        """The Raman-active optical modes (activity above ``threshold`` times the largest), one entry per
        degenerate set, strongest first, with the summed activity (A^4/amu); empty without activities."""
        if self.raman_activities is None:
            return []
        return self._active(self.raman_activities, "activity_A4_per_amu", threshold)

    def to_dict(self) -> dict:
        """Every number, JSON-ready, with the units in the keys or beside them."""
        out = {
            "n_atoms": len(self.atoms),
            "formula": self.atoms.get_chemical_formula(),
            "space_group": self.space_group,
            "point_group": self.point_group,
            "volume_A3": self.volume,
            "frequencies_cm1": self.frequencies_cm1,
            "labels": self.labels,
            "acoustic": self.acoustic,
            "ir_intensities": self.ir_intensities,
            "ir_intensities_unit": "e^2/amu (sum over i of Z_m,i^2; mean over each degenerate set)",
            "mode_effective_charges_e_per_sqrt_amu": self.mode_charges,
            "ir_active_modes": self.optical_ir(),
            "eps_inf": self.eps_inf,
            "eps_static": self.eps_static,
            "born_charges_e": self.born_charges,
            "cell_A": np.asarray(self.atoms.cell),
            "positions_A": self.atoms.positions,
            "symbols": self.atoms.get_chemical_symbols(),
            "info": self.info,
        }
        if self.raman_activities is not None:
            out["raman_activities_A4_per_amu"] = self.raman_activities
            out["raman_activity_unit"] = RAMAN_UNIT
            out["raman_tensors_A2_per_sqrt_amu"] = self.raman_tensors
            out["raman_active_modes"] = self.optical_raman()
        if self.lo_frequencies_cm1 is not None:
            out["lo_direction"] = self.lo_direction
            out["lo_frequencies_cm1"] = self.lo_frequencies_cm1
        return json_ready(out)


def degenerate_sets(frequencies: np.ndarray, tol: float = DEGENERACY_CM1,
                    labels: list[str] | None = None) -> list[np.ndarray]:
    """Indices of ``frequencies`` (ascending, cm^-1) grouped into runs closer than ``tol`` to their neighbour,
    each run split by ``labels`` (the modes' symmetry labels; "" for an unlabelled mode) where given."""
    runs, current = [], [0]
    for i in range(1, len(frequencies)):
        if abs(frequencies[i] - frequencies[i - 1]) < tol:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    if labels is None:
        return [np.array(r) for r in runs]
    groups: list[np.ndarray] = []
    for run in runs:
        by_label: dict[str, list[int]] = {}
        for i in run:
            by_label.setdefault(labels[i], []).append(i)
        groups.extend(np.array(v) for v in by_label.values())
    return groups


def _phonopy_atoms(atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())


def _ase_atoms(ph_atoms):
    from ase import Atoms

    return Atoms(symbols=ph_atoms.symbols, cell=ph_atoms.cell, scaled_positions=ph_atoms.scaled_positions, pbc=True)


def _irrep_labels(ph, n_modes: int) -> tuple[list[str | None], str]:
    """(label of each mode in ascending order, point group) from phonopy's irreducible representations at
    Gamma; None for a set phonopy could not label (an accidental degeneracy)."""
    ph.run_irreps([0.0, 0.0, 0.0], degeneracy_tolerance=1e-4)
    irreps = ph.irreps
    labels: list[str | None] = [None] * n_modes
    for bands, name in zip(irreps.band_indices, getattr(irreps, "_ir_labels", None) or []):
        for b in bands:
            labels[b] = name
    return labels, str(getattr(irreps, "_pointgroup_symbol", "") or "")


def _labels(ph, atoms, fc, acoustic: np.ndarray, trans: np.ndarray) -> tuple[list[str], str]:
    """Mode labels; the three acoustic modes (degenerate at zero, which phonopy cannot label as one set) are
    labelled after a small on-site spring with the point group's symmetry splits them into their irreps."""
    n = len(atoms)
    try:
        labels, point_group = _irrep_labels(ph, 3 * n)
        cell = np.asarray(atoms.cell).T  # columns: lattice vectors
        rotations = [cell @ r @ np.linalg.inv(cell) for r in ph.symmetry.pointgroup_operations]
        a = np.diag([1.0, 2.0, 3.0]) + np.array([[0, 0.3, 0.5], [0.3, 0, 0.7], [0.5, 0.7, 0]])
        spring = sum(r @ a @ r.T for r in rotations) / len(rotations)
        spring *= 1e-3 / np.abs(spring).max()  # eV/A^2: splits the translations by a few cm^-1
        pinned = fc.copy()
        for k in range(n):
            pinned[k, k] += spring
        ph.force_constants = pinned
        split, _ = _irrep_labels(ph, 3 * n)
        for m, s in zip(_acoustic_indices(ph, trans), np.flatnonzero(acoustic)):
            labels[s] = split[m]
        ph.force_constants = fc
        return ["" if x is None else str(x) for x in labels], point_group
    except Exception:  # noqa: BLE001 - labels are informative; a symmetry failure must not lose the numbers
        return [""] * (3 * n), ""


def harmonic(client, structure, *, head: str | None = None, model: str | None = None,
             displacement: float = 0.01, relax: bool = False, relax_cell: bool = False, fmax: float = 1e-3,
             symprec: float = 1e-3, lo_direction=None, raman: bool = True, raman_step: float = 0.01,
             raman_method: str = "symmetry", timeout: float | None = None) -> HarmonicResult:
    """Gamma-point phonons, IR intensities, eps_inf and eps_0 of ``structure`` (ase.Atoms or a file).

    Args:
        client: a :class:`~macefield_client.Client`.
        displacement: finite displacement, A (+ and - each; default 0.01, phonopy's).
        relax: relax the positions first (``relax_cell``: and the cell), space group kept, to ``fmax`` eV/A.
        symprec: symmetry tolerance of spglib/phonopy, A (default 1e-3).
        lo_direction: Cartesian direction of q -> 0 for the LO frequencies (phonopy's non-analytic correction
            with the served Z* and eps_inf); None: TO only.
        raman: also the Raman tensors and activities (2 x 3N polarizability calls; False: skip them).
        raman_step: displacement for d alpha / d Q, A (default 0.01): of one atom along x, y, z
            (``raman_method="symmetry"``), or the largest atomic displacement along each mode (``"modes"``).
        raman_method: ``symmetry`` (default): d alpha / d u of the symmetry-distinct atoms only (6 per
            distinct atom), expanded to every atom by the space group and projected on the modes; ``modes``:
            central differences along every mode (6N structures, no symmetry used).
    Cost: one second-derivative call (Z*, alpha) and 2 x (symmetry-distinct displacements) force calls, the
    latter in one PredictBatch stream; e.g. 9-atom quartz: 12 displaced structures; with ``raman`` 6 per
    symmetry-distinct atom (``modes``: 6N) polarizability calls (about 3x a force call each) in a second stream.
    """
    from phonopy import Phonopy

    from .common import to_atoms

    if raman and not raman_step > 0:
        raise ValueError(f"raman_step: must be > 0 A, got {raman_step}")
    if raman_method not in RAMAN_METHODS:
        raise ValueError(f"raman_method: one of {', '.join(RAMAN_METHODS)}, got {raman_method!r}")
    from .relax import relax as relax_structure

    atoms = to_atoms(structure)
    if not atoms.pbc.all():
        raise ValueError("structure: the harmonic route needs a cell periodic in all three directions")
    info: dict = {"displacement_A": displacement, "symprec_A": symprec}
    if relax or relax_cell:
        atoms, info["relax"] = relax_structure(client, atoms, cell=relax_cell, fmax=fmax, head=head, model=model,
                                               symprec=symprec)
    ref = client.predict(atoms, outputs=["forces", "born_charges", "polarizability"], head=head, model=model,
                         timeout=timeout)
    info["max_residual_force_eV_A"] = float(np.abs(ref.forces).max())
    info["model"], info["head"] = ref.model, ref.head
    n = len(atoms)
    volume = float(abs(np.linalg.det(np.asarray(atoms.cell))))

    # primitive_matrix "P": the cell as given is phonopy's primitive cell (its default, "auto", would reduce a
    # supercell to the primitive cell and return 3 x (atoms of that) modes instead of the 3N of the cell)
    ph = Phonopy(_phonopy_atoms(atoms), supercell_matrix=np.eye(3, dtype=int), primitive_matrix="P",
                 symprec=symprec)
    ph.generate_displacements(distance=displacement, is_plusminus=True)
    displaced = [_ase_atoms(s) for s in ph.supercells_with_displacements or []]
    results = client.predict_many(displaced, outputs=["forces"], head=head, model=model, timeout=timeout)
    ph.forces = np.array([r.forces - ref.forces for r in results])
    info["displaced_structures"] = len(displaced)
    ph.produce_force_constants()
    ph.symmetrize_force_constants()
    fc = np.array(ph.force_constants)
    masses = atoms.get_masses()

    # the dynamical matrix at Gamma: D_(ki),(lj) = Phi_ki,lj / sqrt(M_k M_l), eigenvalues omega^2 in eV/(A^2 amu)
    dyn = fc.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n) / np.sqrt(np.outer(np.repeat(masses, 3),
                                                                             np.repeat(masses, 3)))
    omega2, vecs = np.linalg.eigh(0.5 * (dyn + dyn.T))
    freqs = omega2_to_cm1(omega2)
    eig = vecs.T.reshape(3 * n, n, 3)

    # the three uniform translations: the modes with the largest weight on sqrt(M)-weighted translations
    trans = np.zeros((3, n, 3))
    for a in range(3):
        trans[a, :, a] = np.sqrt(masses)
    trans = trans.reshape(3, -1) / np.linalg.norm(trans.reshape(3, -1), axis=1)[:, None]
    weight = np.sum((trans @ vecs) ** 2, axis=0)
    acoustic = np.zeros(3 * n, dtype=bool)
    acoustic[np.argsort(-weight)[:3]] = True

    zstar = np.asarray(ref.born_charges, dtype=float)
    mode_charges = np.einsum("kij,mkj->mi", zstar, eig / np.sqrt(masses)[None, :, None])
    intens = np.sum(mode_charges ** 2, axis=1)
    eps_inf = np.asarray(ref.eps_inf, dtype=float)
    optical = ~acoustic & (omega2 > 0)
    ionic = np.einsum("mi,mj,m->ij", mode_charges[optical], mode_charges[optical], 1.0 / omega2[optical])
    eps_static = eps_inf + ionic / (volume * EPS0)
    unstable = int(np.sum(~acoustic & (omega2 < 0)))
    if unstable:
        info["unstable_modes"] = unstable
        info["warning"] = f"{unstable} unstable optical mode(s) (negative frequencies) left out of eps_static"

    # phonopy's own frequencies are the same eigenvalues in the same (ascending) order: its labels apply
    ph_cm1 = np.asarray(ph.run_qpoints([[0.0, 0.0, 0.0]]).frequencies[0], dtype=float) * THZ_TO_CM1
    if np.allclose(ph_cm1, freqs, atol=0.05 + 1e-4 * np.abs(freqs).max()):
        labels, point_group = _labels(ph, atoms, fc, acoustic, trans)
    else:
        labels, point_group = [""] * (3 * n), ""
    sets = degenerate_sets(freqs, labels=labels)
    for g in sets:
        intens[g] = intens[g].mean()
    try:
        dataset: Any = ph.symmetry.dataset
        space_group = f"{dataset.international} ({int(dataset.number)})"
    except Exception:  # noqa: BLE001
        space_group = ""
    result = HarmonicResult(atoms=atoms, frequencies_cm1=freqs, eigenvectors=eig, labels=labels, acoustic=acoustic,
                            mode_charges=mode_charges, ir_intensities=intens, born_charges=zstar, eps_inf=eps_inf,
                            eps_static=eps_static, volume=volume, force_constants=fc, point_group=point_group,
                            space_group=space_group, info=info)
    if raman:
        if raman_method == "symmetry":
            symmetry: Any = ph.symmetry.dataset
            dalpha = alpha_derivatives(client, atoms, symmetry, step=raman_step, head=head, model=model,
                                       timeout=timeout)
            tensors = mode_raman_tensors(dalpha, eig, masses)
            info["raman_displaced_structures"] = 6 * len(set(np.asarray(symmetry.equivalent_atoms).tolist()))
        else:
            tensors, shifts = raman_tensors(client, atoms, eig, step=raman_step, head=head, model=model,
                                            timeout=timeout)
            info["raman_displaced_structures"] = 2 * len(shifts)
        result.raman_tensors = tensors
        result.raman_activities = raman_activity(tensors)
        for g in sets:
            result.raman_activities[g] = result.raman_activities[g].mean()
        info["raman_step_A"] = raman_step
        info["raman_method"] = raman_method
    if lo_direction is not None:
        result.lo_direction = np.asarray(lo_direction, dtype=float) / np.linalg.norm(lo_direction)
        result.lo_frequencies_cm1 = _lo_frequencies(ph, zstar, eps_inf, np.asarray(atoms.cell), result.lo_direction)
    return result


def raman_tensors(client, atoms, eigenvectors: np.ndarray, *, step: float = 0.01, head: str | None = None,
                  model: str | None = None, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """d alpha / d Q_m (M, 3, 3; A^2/amu^1/2 with alpha in A^3, symmetrised) for the unit eigenvectors
    ``eigenvectors`` (M, N, 3) of the dynamical matrix, by central differences: the atoms are moved by
    +-h_m e_m,k / sqrt(M_k) with h_m (amu^1/2 A, returned) such that the largest displacement is ``step`` A.
    The 2M displaced structures are sent in one ``predict_many`` call."""
    masses = atoms.get_masses()
    cartesian = np.asarray(eigenvectors, dtype=float) / np.sqrt(masses)[None, :, None]  # A per unit Q
    shifts = step / np.abs(cartesian).max(axis=(1, 2))
    displaced = []
    for m in range(len(cartesian)):
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions = atoms.positions + sign * shifts[m] * cartesian[m]
            displaced.append(moved)
    results = client.predict_many(displaced, outputs=["polarizability"], head=head, model=model, timeout=timeout)
    alpha = np.array([r.polarizability for r in results], dtype=float).reshape(len(cartesian), 2, 3, 3)
    tensors = (alpha[:, 0] - alpha[:, 1]) / (2.0 * shifts[:, None, None]) / E_A2_PER_V_PER_A3
    return 0.5 * (tensors + tensors.transpose(0, 2, 1)), shifts


def alpha_derivatives(client, atoms, dataset, *, step: float = 0.01, head: str | None = None,
                      model: str | None = None, timeout: float | None = None) -> np.ndarray:
    """d alpha / d u_kj of every atom (N, 3 [j], 3, 3), e*A^2/V per A, from central differences (+-``step`` A
    along x, y, z) of the symmetry-distinct atoms of spglib's ``dataset`` only, in one ``predict_many`` call.

    A space-group operation {R|t} (Cartesian rotation R) that takes atom k to atom m maps the crystal with
    atom k displaced by u onto the crystal with atom m displaced by R u, and alpha to R alpha R^T, so
    d alpha_ab / d u_mj = sum R_jj' R_aa' R_bb' d alpha_a'b' / d u_kj'; every atom's tensor is the mean over
    all operations that reach it.  Translation invariance (sum over k of d alpha / d u_k = 0) is imposed by
    removing the mean over atoms (what is removed is the finite-difference error)."""
    cell = np.asarray(atoms.cell, dtype=float)
    frac = atoms.get_scaled_positions()
    equivalent = np.asarray(dataset.equivalent_atoms)
    unique = sorted(set(equivalent.tolist()))
    displaced = []
    for k in unique:
        for j in range(3):
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.positions[k, j] += sign * step
                displaced.append(moved)
    results = client.predict_many(displaced, outputs=["polarizability"], head=head, model=model, timeout=timeout)
    alpha = np.array([r.polarizability for r in results], dtype=float).reshape(len(unique), 3, 2, 3, 3)
    base = {k: (alpha[i, :, 0] - alpha[i, :, 1]) / (2.0 * step) for i, k in enumerate(unique)}
    n = len(atoms)
    total = np.zeros((n, 3, 3, 3))
    count = np.zeros(n)
    to_frac = np.linalg.inv(cell)
    for rot, trans in zip(np.asarray(dataset.rotations, dtype=float), np.asarray(dataset.translations)):
        r = cell.T @ rot @ to_frac.T  # Cartesian rotation: r' = R r for r = cell^T x
        moved = frac @ rot.T + trans
        diff = moved[:, None, :] - frac[None, :, :]
        diff -= np.rint(diff)
        image = np.argmin(np.linalg.norm(diff @ cell, axis=2), axis=1)  # atom i goes to atom image[i]
        for k in unique:
            m = image[k]
            total[m] += np.einsum("jJ,aA,bB,JAB->jab", r, r, r, base[k])
            count[m] += 1
    if np.any(count == 0):
        raise ValueError("symmetry: an atom is reached by no operation from its representative (symprec?)")
    deriv = total / count[:, None, None, None]
    return deriv - deriv.mean(axis=0, keepdims=True)


def mode_raman_tensors(dalpha: np.ndarray, eigenvectors: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """d alpha / d Q_m (M, 3, 3), A^2/amu^1/2 with alpha in A^3, from d alpha / d u (N, 3, 3, 3; e*A^2/V per A):
    sum_kj d alpha / d u_kj e_m,kj / sqrt(M_k), symmetrised in the two alpha indices."""
    weights = np.asarray(eigenvectors, dtype=float) / np.sqrt(np.asarray(masses))[None, :, None]
    tensors = np.einsum("mkj,kjab->mab", weights, dalpha) / E_A2_PER_V_PER_A3
    return 0.5 * (tensors + tensors.transpose(0, 2, 1))


def raman_activity(tensors: np.ndarray) -> np.ndarray:
    """45 a^2 + 7 gamma^2 of each Raman tensor (..., 3, 3): a = tr/3, gamma^2 = (3/2) tr(b^2), b = R - a 1."""
    r = np.asarray(tensors, dtype=float)
    a = np.trace(r, axis1=-2, axis2=-1) / 3.0
    b = r - a[..., None, None] * np.eye(3)
    gamma2 = 1.5 * np.einsum("...ij,...ji->...", b, b)
    return 45.0 * a ** 2 + 7.0 * gamma2


def _acoustic_indices(ph, trans) -> np.ndarray:
    """Indices (ascending) of phonopy's three modes at Gamma with the largest weight on the translations."""
    vecs = ph.run_qpoints([[0.0, 0.0, 0.0]], with_eigenvectors=True).eigenvectors[0]
    weight = np.sum(np.abs(trans @ np.asarray(vecs)) ** 2, axis=0)
    return np.sort(np.argsort(-weight)[:3])


def _lo_frequencies(ph, zstar, eps_inf, cell, direction) -> np.ndarray:
    """Gamma frequencies (cm^-1) with phonopy's non-analytic term for q -> 0 along Cartesian ``direction``."""
    ph.nac_params = {"born": zstar, "dielectric": eps_inf, "factor": _nac_factor()}
    q_reduced = cell @ direction  # q_cart = q_red @ reciprocal(cell), reciprocal = inv(cell).T
    gamma = ph.run_qpoints([[0.0, 0.0, 0.0]], nac_q_direction=q_reduced)
    freqs = np.asarray(gamma.frequencies[0], dtype=float) * THZ_TO_CM1
    ph.nac_params = None
    return np.sort(freqs)


def _nac_factor() -> float:
    """e^2/(4 pi eps0) in eV*A (Hartree * Bohr, phonopy's factor for eV and A)."""
    from ..contract.constants import BOHR, HARTREE

    return HARTREE * BOHR


def finite_field_eps_static(client, atoms, *, field: float = 0.005, axes=(0, 1, 2), head: str | None = None,
                            model: str | None = None, fmax: float = 1e-4, steps: int = 1000) -> np.ndarray:
    """eps_0 the other way: relax the ions at +-``field`` V/A along each axis; column j of eps_0 - 1 is
    (P(+E_j) - P(-E_j)) / (2 E eps0) (relaxed ions and electrons; even orders in E cancel).

    Rows or columns of axes not asked for are NaN.  ``atoms`` should be relaxed at zero field first.
    """
    from .common import follow_branch
    from .relax import relax as relax_structure

    eps = np.full((3, 3), np.nan)
    ref = client.predict(atoms, head=head, model=model)
    for j in axes:
        ps = []
        for sign in (1.0, -1.0):
            e = np.zeros(3)
            e[j] = sign * field
            relaxed, _ = relax_structure(client, atoms, electric_field=e, fmax=fmax, steps=steps, symmetry=False,
                                         head=head, model=model)
            r = client.predict(relaxed, electric_field=e, head=head, model=model)
            ps.append(follow_branch(r.polarization, ref.polarization, r.polarization_quantum))
        eps[:, j] = (ps[0] - ps[1]) / (2.0 * field * EPS0)
        eps[j, j] += 1.0
    return eps


__all__ = ["DEGENERACY_CM1", "E_A2_PER_V_PER_A3", "RAMAN_METHODS", "RAMAN_UNIT", "HarmonicResult", "alpha_derivatives",
           "cm1_to_omega2", "degenerate_sets", "finite_field_eps_static", "harmonic", "mode_raman_tensors",
           "raman_activity", "raman_tensors"]
