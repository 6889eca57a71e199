"""Quasi-static P-E sweep: relax alpha-quartz at each field and record the polarization.

    macefield-serve &                                   # the default model on 127.0.0.1:50051
    python client/examples/pe_sweep.py --emax 0.2 --points 5 --direction 0 0 1

For each field E along ``--direction`` (0 -> +Emax -> -Emax -> 0 with
``--loop``, else 0 -> +Emax) the ions are relaxed at fixed cell in the
electric enthalpy F(R, E) (forces -dF/dR) starting from the previous
field's structure, and P (followed continuously across polarization quanta)
is recorded.  A linear fit of P against E through the first branch gives the
static (relaxed-ion) susceptibility chi_0 = (dP/dE)/eps0, printed next to
the clamped-ion chi_inf that the server computes directly at zero field.

Needs: pip install 'macefield-client[ase]'.  Options: --help.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
from ase.optimize import BFGS

from macefield_client.ase import MACEFieldCalculator
from macefield_client.structures import alpha_quartz

E_PER_A2_TO_UC_PER_CM2 = 1602.176634
EPS0 = 8.8541878128e-12 / 1.602176634e-19 / 1e10  # vacuum permittivity, e/(V*A)


def follow_branch(p, p_ref, quantum):
    """P moved by integer polarization quanta (rows of ``quantum``) to lie closest to ``p_ref``."""
    n = np.rint(np.linalg.solve(quantum.T, p - p_ref))
    return p - quantum.T @ n


def field_path(emax: float, points: int, loop: bool):
    up = np.linspace(0.0, emax, points)
    if not loop:
        return up
    return np.concatenate([up, np.linspace(emax, -emax, 2 * points - 1)[1:], np.linspace(-emax, 0.0, points)[1:]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="host:port (default $MACEFIELD_SERVER or 127.0.0.1:50051)")
    ap.add_argument("--model", help="served model (default: the server's default)")
    ap.add_argument("--head", help="model head (default: the model's default)")
    ap.add_argument("--direction", type=float, nargs=3, default=(0.0, 0.0, 1.0), help="field direction (default z)")
    ap.add_argument("--emax", type=float, default=0.2, help="largest |E|, V/A (default 0.2)")
    ap.add_argument("--points", type=int, default=5, help="fields from 0 to emax (default 5)")
    ap.add_argument("--loop", action="store_true", help="sweep 0 -> +emax -> -emax -> 0")
    ap.add_argument("--fmax", type=float, default=0.01, help="relaxation threshold, eV/A (default 0.01)")
    ap.add_argument("--max-steps", type=int, default=200, help="relaxation steps per field (default 200)")
    ap.add_argument("--cell", choices=["pbe", "experiment"], default="pbe",
                    help="quartz lattice: the PBE cell of the default model's data (default) or experiment")
    ap.add_argument("--repeat", type=int, nargs=3, default=(1, 1, 1), help="supercell (default 1 1 1)")
    ap.add_argument("--csv", help="write the table here")
    args = ap.parse_args(argv)

    direction = np.asarray(args.direction, dtype=float)
    direction /= np.linalg.norm(direction)
    atoms = alpha_quartz(cell=args.cell, repeat=args.repeat)
    calc = MACEFieldCalculator(args.server, model=args.model, head=args.head, electric_field=(0.0, 0.0, 0.0))
    atoms.calc = calc

    calc.get_property("polarizability", atoms)  # clamped-ion chi at E = 0 (second derivatives)
    chi_inf = float(direction @ calc.results["polarizability"].reshape(3, 3) @ direction)

    rows = []
    p_prev = None
    print(f"# server {calc.client.target}: {len(atoms)} atoms, field along {direction.round(4).tolist()}")
    print(f"# {'E/(V/A)':>9} {'Px':>10} {'Py':>10} {'Pz':>10} {'P.e':>10} {'F/eV':>14} {'steps':>5} converged"
          "   (P in uC/cm^2)")
    for e in field_path(args.emax, args.points, args.loop):
        calc.electric_field = e * direction
        opt = BFGS(atoms, logfile=None)
        converged = bool(opt.run(fmax=args.fmax, steps=args.max_steps))
        atoms.get_forces()
        r = calc.last_result
        p = r.polarization if p_prev is None else follow_branch(r.polarization, p_prev, r.polarization_quantum)
        p_prev = p
        pc = p * E_PER_A2_TO_UC_PER_CM2
        row = {"E": e, "Px": pc[0], "Py": pc[1], "Pz": pc[2], "P_par": float(pc @ direction),
               "F": float(r.energy), "steps": opt.nsteps, "converged": converged}
        rows.append(row)
        print(f"{e:11.4f} {pc[0]:10.5f} {pc[1]:10.5f} {pc[2]:10.5f} {row['P_par']:10.5f} {row['F']:14.6f} "
              f"{opt.nsteps:5d} {converged}", flush=True)

    first = rows[: args.points]
    if len(first) >= 2 and args.emax != 0:
        es = np.array([r["E"] for r in first])
        ps = np.array([r["P_par"] for r in first]) / E_PER_A2_TO_UC_PER_CM2
        slope = np.polyfit(es, ps, 1)[0]
        print(f"# static (relaxed-ion) chi_0 = {slope / EPS0:.4f}; clamped-ion chi_inf(E=0) = {chi_inf:.4f} "
              "(along the field)")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    calc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
