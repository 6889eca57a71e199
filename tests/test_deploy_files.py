"""Deployment files agree with each other and with the server: Dockerfile, docker-compose.yml,
docker/*.yaml, docker/requirements.txt, the health probe, --version, and the container
smoke test's skip path (the real build/run happens in .ci/container_smoke.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from macefield_server import __version__
from macefield_server.serving.config import ServerConfig, load_config
from macefield_server.cli.health import main as probe_main

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SMOKE = REPO / ".ci" / "container_smoke.py"


def instructions(name):
    return [ln for ln in re.sub(r"\\\n", " ", DOCKERFILE).splitlines() if ln.strip().upper().startswith(name + " ")]


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)?", str(text))
    assert m, text
    return float(m.group(1)) * (60 if m.group(2) == "m" else 1)


def stages():
    """{stage name: (base, its instructions)} of the Dockerfile, in order."""
    out, name = {}, None
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines():
        m = re.match(r"FROM (\S+) AS (\S+)$", line.strip())
        if m:
            name = m.group(2)
            out[name] = (m.group(1), [])
        elif name and line.strip() and not line.startswith("#"):
            out[name][1].append(line.strip())
    return out


def test_dockerfile_shape():
    built = stages()
    assert {name: base for name, (base, _) in built.items()} == {
        "builder": "debian:bookworm-slim", "builder-gpu": "builder", "runtime-base": "debian:bookworm-slim",
        "gpu": "runtime-base", "runtime": "runtime-base"}
    assert list(built)[-1] == "runtime"  # a plain `docker build` (CI's container smoke) makes the CPU/e3nn image
    assert built["runtime"][1] == ["COPY --from=builder /opt/venv /opt/venv"]
    assert built["gpu"][1] == ["COPY --from=builder-gpu /opt/venv /opt/venv"]
    # the GPU target installs cuEquivariance through the server[cueq] extra, its pins are not repeated here
    gpu_build = " ".join(built["builder-gpu"][1])
    assert '"/src/server[cueq]"' in gpu_build and "cuequivariance-ops-torch-cu" in gpu_build
    assert not re.search(r"cuequivariance(-torch)?==", DOCKERFILE)
    (user,) = instructions("USER")
    assert user.split()[1] not in ("root", "0")
    exposed = {p for e in instructions("EXPOSE") for p in e.split()[1:]}
    cfg = ServerConfig()
    assert {str(cfg.port), str(cfg.metrics_port)} <= exposed
    (hc,) = instructions("HEALTHCHECK")
    assert " CMD " in hc and "[" not in hc.split(" CMD ", 1)[1], "HEALTHCHECK must use the shell (CMD-SHELL) form"
    assert "macefield-health" in hc
    assert instructions("STOPSIGNAL") == ["STOPSIGNAL SIGTERM"]


def test_grace_periods_agree():
    grace = ServerConfig().grace_s
    (cmd,) = instructions("CMD")
    assert re.search(r'"--grace", "(\d+)"', cmd).group(1) == f"{grace:g}"
    stop_timeout = float(re.search(r'org\.macefield\.stop-timeout-seconds="(\d+)"', DOCKERFILE).group(1))
    assert stop_timeout > grace
    assert f"grace_s ({grace:g} s" in DOCKERFILE  # the header comment tells users the same
    for name in ("server", "server-gpu", "replica"):
        service = COMPOSE["services"][name]
        assert service["stop_signal"] == "SIGTERM"
        (config_mount,) = [v for v in service["volumes"] if v.endswith(":/etc/macefield/serve.yaml:ro")]
        served = load_config(REPO / config_mount.split(":")[0])  # also: the file is a valid server config
        assert seconds(service["stop_grace_period"]) > served.grace_s
        assert served.host == "0.0.0.0" and served.port == ServerConfig().port and served.metrics_port == 9100
    smoke = SMOKE.read_text()
    assert int(re.search(r"^STOP_TIMEOUT = (\d+)", smoke, re.M).group(1)) > grace



def test_torch_version_agrees():
    docker_arg = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILE, re.M).group(1)
    makefile = re.findall(r"torch==(\S+)", (REPO / "Makefile").read_text())
    smoke = re.search(r'^TORCH_VERSION = "(\S+)"', SMOKE.read_text(), re.M).group(1)
    assert set(makefile) == {docker_arg} == {smoke}


def test_compose_services():
    services = COMPOSE["services"]
    assert "profiles" not in services["server"]  # the default (CPU) service
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["target"] == "gpu" and "target" not in services["server"]["build"]
    assert gpu["image"] != services["server"]["image"]  # building one never overwrites the other
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "server" in gpu["networks"]["default"]["aliases"]
    for name in ("server", "server-gpu", "prometheus"):
        s = services[name]
        assert s["restart"] in ("always", "unless-stopped")
        assert s["healthcheck"]["test"][0] == "CMD-SHELL"
    assert any(v.startswith("models:/models") for v in services["server"]["volumes"])
    assert set(COMPOSE["volumes"]) >= {"models", "prometheus-data"}


def test_prometheus_finds_every_server_and_replica_by_dns():
    prom = COMPOSE["services"]["prometheus"]
    (mount,) = [v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    config = yaml.safe_load((REPO / mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    served = load_config(REPO / "docker" / "serve.yaml")
    (sd,) = jobs["macefield-serve"]["dns_sd_configs"]
    assert (sd["type"] == "A" and sd["port"] == served.metrics_port
            and jobs["macefield-serve"]["metrics_path"] == "/metrics")
    assert set(sd["names"]) == {"server", "replica"}  # the one-server services and every scale-profile replica
    assert "server" in COMPOSE["services"]["server-gpu"]["networks"]["default"]["aliases"]
    assert "replica" in COMPOSE["services"]
    (proxy_sd,) = jobs["macefield-proxy"]["dns_sd_configs"]
    envoy = yaml.safe_load((REPO / "deploy" / "envoy" / "envoy.yaml").read_text())
    listeners = {item["name"]: item for item in envoy["static_resources"]["listeners"]}
    # Prometheus scrapes Envoy's `metrics` listener (only /stats/prometheus); the admin port stays private
    assert proxy_sd["names"] == ["proxy"] and proxy_sd["port"] == listeners["metrics"]["address"]["socket_address"][
        "port_value"] != envoy["admin"]["address"]["socket_address"]["port_value"]
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert jobs["macefield-proxy"]["metrics_path"] == "/stats/prometheus"


def test_compose_scale_profile():
    services = COMPOSE["services"]
    replica, proxy = services["replica"], services["proxy"]
    assert replica["profiles"] == proxy["profiles"] == ["scale"]
    assert replica["image"] == services["server"]["image"] and replica["ports"] == []  # only via the proxy
    assert replica["stop_signal"] == "SIGTERM"
    served = load_config(REPO / replica["volumes"][1].split(":")[0])
    assert seconds(replica["stop_grace_period"]) > served.grace_s
    assert proxy["build"]["context"] == "deploy/envoy" and proxy["image"].startswith("macefield-envoy:")
    assert any(p.endswith(":50051") and p.startswith("127.0.0.1:") for p in proxy["ports"])
    assert proxy["healthcheck"]["test"][0] == "CMD-SHELL" and "envoy-ready" in proxy["healthcheck"]["test"][1]
    envoy = yaml.safe_load((REPO / "deploy" / "envoy" / "envoy.yaml").read_text())
    clusters = {item["name"]: item for item in envoy["static_resources"]["clusters"]}
    assert set(clusters) == {"macefield", "admin"}  # the replicas; the admin interface for the metrics listener
    cluster = clusters["macefield"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert cluster["type"] == "STRICT_DNS"  # every replica container's A record
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "replica", "port_value": served.port}
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "macefield.v1.MaceField"
    listeners = {item["name"]: item for item in envoy["static_resources"]["listeners"]}
    assert listeners["grpc"]["address"]["socket_address"]["port_value"] == 50051
    dockerfile = (REPO / "deploy" / "envoy" / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim", dockerfile, re.M) and re.search(r"^USER envoy$", dockerfile, re.M)
    assert "COPY envoy.yaml /etc/envoy/envoy.yaml" in dockerfile


def envoy_validates(binary: str, config: Path) -> None:
    done = subprocess.run([binary, "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                           "--log-level", "warn"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout + done.stderr, done.stdout + done.stderr


def test_envoy_accepts_the_compose_proxy_configuration():
    """Envoy's own validation mode (no network, no upstream needed) on deploy/envoy/envoy.yaml."""
    from envoy_proxy import require_envoy

    envoy_validates(require_envoy(), REPO / "deploy" / "envoy" / "envoy.yaml")


def test_docs_render_command_for_a_replica_list_gives_a_valid_envoy_configuration(tmp_path):
    """docs/scaling.md's render_config.py command, as written (output redirected here), then envoy --mode validate."""
    from envoy_proxy import require_envoy

    binary = require_envoy()
    text = (REPO / "docs" / "scaling.md").read_text().replace("\\\n", " ")
    (command,) = [ln.strip() for ln in text.splitlines()
                  if ln.strip().startswith("python deploy/envoy/render_config.py")]
    args = command.split()[2:]
    assert args[-2] == "-o"
    args[-1] = str(tmp_path / "envoy.yaml")
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "envoy" / "render_config.py"), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    (cluster,) = config["static_resources"]["clusters"]
    hosts = [e["endpoint"]["address"]["socket_address"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert hosts == [{"address": "gpu017", "port_value": 50051}, {"address": "gpu018", "port_value": 50051}]
    assert cluster["type"] == "STRICT_DNS"  # host names: re-resolved
    envoy_validates(binary, tmp_path / "envoy.yaml")


def test_package_data_ships_the_default_model_and_card():
    import tomllib

    project = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["macefield_server.weights"]
    assert {"*.pt", "*.card.json", "*.card.md"} <= set(patterns)
    assert project["project"]["scripts"]["macefield-health"] == "macefield_server.cli.health:main"


def test_image_requirements_cover_and_satisfy_the_declared_dependencies():
    import tomllib

    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "docker" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for pkg in ("server", "client"):
        deps = tomllib.loads((REPO / pkg / "pyproject.toml").read_text())["project"]["dependencies"]
        for spec in deps:
            req = Requirement(spec)
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            if name in ("torch", "macefield-client") or (req.marker and not req.marker.evaluate()):
                continue
            assert name in pins, (f"{pkg}: {name} missing from docker/requirements.txt "
                                  "(python3 docker/freeze_requirements.py)")
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec}"


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_health_probe(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe_main(["--address", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe_main(["--address", address]) == 0
    assert probe_main(["--address", address, "--service", "macefield.v1.MaceField"]) == 1  # unknown service
    servicer.set("macefield.v1.MaceField", health_pb2.HealthCheckResponse.SERVING)
    assert probe_main(["--address", address, "--service", "macefield.v1.MaceField"]) == 0


def test_health_probe_unreachable(capsys, monkeypatch):
    monkeypatch.setenv("MACEFIELD_HEALTH_ADDRESS", "127.0.0.1:1")
    assert probe_main(["--timeout", "2"]) == 1
    assert "127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().out


def test_serve_version():
    out = subprocess.run([sys.executable, "-m", "macefield_server.cli.serve", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(f"macefield-serve {__version__} ")


def test_container_smoke_skips_loudly_when_the_engine_cannot_start(tmp_path):
    env = dict(os.environ, MACEFIELD_SMOKE_DOCKERD="/bin/false", MACEFIELD_CI_CACHE=str(tmp_path),
               MACEFIELD_SMOKE_DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    out = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    loud = [ln for ln in out.stdout.splitlines() if "CONTAINER SMOKE TEST NOT RUN" in ln]
    assert len(loud) == 1 and "dockerd did not start" in loud[0]


def test_every_deploy_path_the_scaling_docs_name_exists():
    for doc in ("README.md", "docs/scaling.md"):
        text = (REPO / doc).read_text()
        paths = set(re.findall(r"\b((?:deploy|docker|bench|client/examples)/[\w./-]*[\w/])(?![\w*.-])", text))
        assert paths, doc
        missing = sorted(p for p in paths if not (REPO / p).exists())
        assert not missing, f"{doc} names {missing}"
    readme = (REPO / "README.md").read_text()
    scaling = (REPO / "docs" / "scaling.md").read_text()
    for command in re.findall(r"`(docker compose --profile scale up [^`]+)`", readme):
        assert command in scaling  # the README's compose command is the one docs/scaling.md explains
    for target in re.findall(r'"(dns:///[^"]+)"', readme):
        assert target in scaling


def test_container_smoke_creates_a_cache_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    import importlib.util

    cache = tmp_path / "not" / "yet"
    monkeypatch.setenv("MACEFIELD_CI_CACHE", str(cache))
    spec = importlib.util.spec_from_file_location("container_smoke_under_test", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.CACHE == cache and cache.is_dir()


def test_docker_docs_cover_compose_v1_and_a_local_base_image():
    for doc in ("README.md", "docs/docker.md"):
        text = (REPO / doc).read_text()
        assert "docker compose up -d" in text and "docker-compose" in text, doc
        assert "docker import - debian:bookworm-slim" in text and "docker tag" in text, doc
    assert "FROM debian:bookworm-slim" in (REPO / "Dockerfile").read_text()  # the tag the docs make locally
