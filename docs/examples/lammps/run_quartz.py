"""Run quartz.in with forces, energy and virial from a MACE-Field server (docs/md_engines.md).

    python run_quartz.py --server 127.0.0.1:50051 --steps 200 [--field 0 0 0.01] [--log dipole.log]
"""

import argparse

from macefield_client.lammps import attach, create_lammps

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--server", default="127.0.0.1:50051", help="MACE-Field server, host:port")
parser.add_argument("--steps", type=int, default=200, help="MD steps")
parser.add_argument("--field", type=float, nargs=3, default=None, metavar=("EX", "EY", "EZ"), help="field, V/A")
parser.add_argument("--log", default="dipole.log", help="per-step field, energy, dipole and polarization")
args = parser.parse_args()

lmp = create_lammps(["-log", "log.lammps", "-screen", "none"])
lmp.file("quartz.in")
with attach(lmp, "mf", server=args.server, type_map={1: "Si", 2: "O"}, field=args.field, log=args.log) as bridge:
    bridge.run(args.steps)
    print(f"{bridge.calls} force calls; last step: etotal {lmp.get_thermo('etotal'):.6f} eV, "
          f"polarization {bridge.last_result.polarization} e/A^2")
lmp.close()
