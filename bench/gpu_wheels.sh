#!/usr/bin/env bash
# Download the cp312 manylinux wheels bench/gpu_suite.py needs on a GPU host without a package registry.
#
# The target host (Python 3.12, torch 2.11 + CUDA 13, grpcio, protobuf, numpy, scipy, e3nn of another
# version; no mace-torch, no ase) reaches no registry, so the wheels are copied there with the repository,
# at most 64 MiB per copy.  cuequivariance-ops-cu13 alone is 45 MB, so two folders, both git-ignored,
# installed by two consecutive steps on that host:
#
#   .whl-ops/  cuequivariance-ops-cu13 (the CUDA kernel library)      -> step 1: install, exit
#   .whl/      everything else (mace-torch, e3nn 0.4.4, ase, matscipy, vesin,
#              grpc, cuequivariance, cuequivariance-ops-torch-cu13, ...) -> step 2: install, run the suite
#
# Step 1 (with .whl-ops/):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ops .whl-ops/*.whl && ls /tmp/site-ops
# Step 2 (with .whl/, about 330 s: the suite's 240 s budget plus installs, imports and stopping the servers):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:/tmp/site-ops:client:server PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out $OUT
# $OUT then holds the JSON, the text summary and both servers' logs (4 files).
# If /tmp/site-ops is missing on that host (step 1 not run), the suite still runs e3nn-only and says so.
#
# Usage: bash bench/gpu_wheels.sh        (from the repository root; needs pip and the package registry)
# Checks that every requirement of every wheel is carried or on the device, and that each call fits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# the versions the test suite passed with (docker/requirements.txt); grpc/protobuf carried too, so the
# committed stubs (grpcio-tools 1.85.1) never meet an older runtime on the device
OPS=(cuequivariance-ops-cu13==0.13.0)
REST=(
  mace-torch==0.3.16 e3nn==0.4.4 opt-einsum-fx==0.1.4 torch-ema==0.3
  ase==3.29.0 matscipy==1.3.1 vesin==0.6.2
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 prometheus-client==0.26.0
  cuequivariance==0.13.0 cuequivariance-torch==0.13.0 cuequivariance-ops-torch-cu13==0.13.0 platformdirs==4.5.0
  # declared by mace-torch though the serving path never imports them (carried so that the check below is strict)
  prettytable==3.18.0 wcwidth==0.7.0 configargparse==1.9.0 gitpython==3.2.1 gitdb==4.0.12
  smmap==5.0.3 lmdb==3.0.0 orjson==3.11.4
)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

grep -qx '/.whl/' .gitignore && grep -qx '/.whl-ops/' .gitignore  # both folders stay out of git
rm -rf .whl .whl-ops
mkdir -p .whl .whl-ops
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl-ops "${OPS[@]}"
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${REST[@]}"

"$PYTHON" - <<'EOF'
"""Every non-optional requirement of the carried wheels is carried or already on the device."""
import pathlib, re, subprocess, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# installed on the target host's image already (its package list, 2026-11)
DEVICE = """accelerate aiohttp certifi charset-normalizer click colorama contourpy cycler e3nn filelock fonttools fsspec
grpcio h5py idna jinja2 joblib kiwisolver lightning-utilities markupsafe matplotlib mpmath networkx numpy nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-ml-py opt-einsum opt-einsum-fx packaging
pandas pillow prometheus-client protobuf psutil pyparsing python-dateutil pyyaml regex requests scipy six sympy
torch torchmetrics tqdm typing-extensions urllib3""".split()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
wheels = sorted(pathlib.Path(".whl").glob("*.whl")) + sorted(pathlib.Path(".whl-ops").glob("*.whl"))
carried = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name == "python-hostlist":  # sdist only; imported by mace's SLURM helper alone (mace/tools/slurm_distributed.py)
            continue
        if name not in carried and name not in {canonicalize_name(d) for d in DEVICE}:
            missing.append(f"{w.name}: {line}")
for w in wheels:
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.parent}/{w.name}")
tree = subprocess.run("git ls-files -z | xargs -0 du -cb | tail -1", shell=True, capture_output=True, text=True)
tree_mib = int(tree.stdout.split()[0]) / 2**20
for folder in (".whl-ops", ".whl"):
    size = sum(w.stat().st_size for w in pathlib.Path(folder).glob("*.whl")) / 2**20
    total = size + tree_mib
    print(f"call with {folder}: wheels {size:.1f} MiB + working tree {tree_mib:.1f} MiB = {total:.1f} MiB (limit 64)")
    if total > 63:
        sys.exit(f"{folder} does not fit one call")
if missing:
    sys.exit("requirements neither carried nor on the device:\n  " + "\n  ".join(missing))
print("every requirement is carried or on the device")
EOF
