"""Finite-field NVT molecular dynamics of alpha-quartz with ASE and a MACE-Field server.

    macefield-serve &                                   # the default model on 127.0.0.1:50051
    python client/examples/nvt_quartz.py --field 0 0 0.05 --steps 500

Langevin dynamics at constant temperature in a uniform field E (V/A).  The
forces are -dF/dR of the electric enthalpy F(R, E), so the field pushes the
ions and the crystal polarizes; the log shows the polarization P (uC/cm^2,
followed continuously across polarization quanta) and its change from the
first step.  One PredictStream is kept open for the whole run.

Needs: pip install 'macefield-client[ase]'.  Options: --help.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.constraints import FixCom
from ase.md.velocitydistribution import Stationary

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)

from macefield_client.ase import MACEFieldCalculator
from macefield_client.structures import alpha_quartz

E_PER_A2_TO_UC_PER_CM2 = 1602.176634


def follow_branch(p, p_ref, quantum):
    """P moved by integer polarization quanta (rows of ``quantum``) to lie closest to ``p_ref``."""
    n = np.rint(np.linalg.solve(quantum.T, p - p_ref))
    return p - quantum.T @ n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="host:port (default $MACEFIELD_SERVER or 127.0.0.1:50051)")
    ap.add_argument("--model", help="served model (default: the server's default)")
    ap.add_argument("--head", help="model head (default: the model's default)")
    ap.add_argument("--field", type=float, nargs=3, default=(0.0, 0.0, 0.05), metavar=("EX", "EY", "EZ"),
                    help="uniform field, V/A (default 0 0 0.05)")
    ap.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    ap.add_argument("--steps", type=int, default=500, help="MD steps (default 500)")
    ap.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    ap.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    ap.add_argument("--cell", choices=["pbe", "experiment"], default="pbe",
                    help="quartz lattice: the PBE cell of the default model's data (default) or experiment")
    ap.add_argument("--repeat", type=int, nargs=3, default=(2, 2, 2), help="supercell (default 2 2 2: 72 atoms)")
    ap.add_argument("--log-every", type=int, default=10, help="print every N steps (default 10)")
    ap.add_argument("--trajectory", help="write frames (extxyz) with energy, forces and polarization here")
    ap.add_argument("--seed", type=int, default=0)
    env = os.environ.get
    ap.add_argument("--tls-ca", default=env("MACEFIELD_TLS_CA") or None, metavar="CA.pem",
                    help="TLS, trusting this CA (default $MACEFIELD_TLS_CA; none: plaintext)")
    ap.add_argument("--tls-server-name", default=env("MACEFIELD_TLS_SERVER_NAME") or None, metavar="NAME",
                    help="the name in the servers' certificates: TLS with a list of replicas "
                         "(default $MACEFIELD_TLS_SERVER_NAME)")
    ap.add_argument("--token", default=env("MACEFIELD_TOKEN") or None, help="bearer token (default $MACEFIELD_TOKEN)")
    args = ap.parse_args(argv)

    atoms = alpha_quartz(cell=args.cell, repeat=args.repeat)
    calc = MACEFieldCalculator(args.server, electric_field=args.field, model=args.model, head=args.head,
                               tls=args.tls_ca, tls_server_name=args.tls_server_name, token=args.token)
    atoms.calc = calc
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, args.temperature, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(FixCom())  # no drift of the centre of mass (the field pushes the ions)
    dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=args.temperature,
                   friction=args.friction / units.fs, fixcm=False, rng=rng)

    state = {"p0": None, "p": None}
    frames = []

    def log():
        r = calc.last_result  # the server's full result for the current positions
        p = r.polarization
        if state["p"] is not None:
            p = follow_branch(p, state["p"], r.polarization_quantum)
        if state["p0"] is None:
            state["p0"] = p
        state["p"] = p
        dp = (p - state["p0"]) * E_PER_A2_TO_UC_PER_CM2
        print(f"{dyn.nsteps:6d} {dyn.nsteps * args.timestep:8.1f} {atoms.get_temperature():8.1f} "
              f"{atoms.get_potential_energy():14.6f} {atoms.get_total_energy():14.6f} "
              f"{p[0] * E_PER_A2_TO_UC_PER_CM2:10.5f} {p[1] * E_PER_A2_TO_UC_PER_CM2:10.5f} "
              f"{p[2] * E_PER_A2_TO_UC_PER_CM2:10.5f} {dp[2]:10.5f}", flush=True)
        if args.trajectory:
            frame = atoms.copy()
            frame.calc = None
            frame.info.update(MACE_energy=float(r.energy), MACE_polarization=p, electric_field=np.asarray(args.field))
            frame.arrays["MACE_forces"] = r.forces
            frames.append(frame)

    atoms.get_forces()
    info = calc.client.list_models()
    m = info.default_model if not args.model else next(x for x in info.models if x.name == args.model)
    print(f"# server {calc.client.target}, model {m.name} ({'trained' if m.trained else 'UNTRAINED'}), "
          f"{len(atoms)} atoms, E = {list(args.field)} V/A, T = {args.temperature} K")
    print(f"# {'step':>4} {'t/fs':>8} {'T/K':>8} {'F/eV':>14} {'F+K/eV':>14} "
          f"{'Px':>10} {'Py':>10} {'Pz':>10} {'dPz':>10}   (P in uC/cm^2)")
    dyn.attach(log, interval=max(1, args.log_every))
    dyn.run(args.steps)
    if args.trajectory:
        import ase.io

        ase.io.write(args.trajectory, frames, format="extxyz")
    calc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
