"""deploy/k8s: the manifests are valid Kubernetes objects and say what the deployment needs.

No cluster exists here.  Validation is offline with ``kubernetes-validate`` (PyPI; it ships the JSON
schemas generated from the Kubernetes OpenAPI specification of every release, nothing is fetched),
strict (an unknown or misspelt field is an error), for the oldest release the manifests need (1.27:
gRPC probes GA) and the newest it knows.  The kustomization is rendered with ``kubectl kustomize``
(kustomize inside kubectl) in a copy of deploy/k8s with a real certificate and token file in
``base/secrets/``; no package registry the project uses ships kubectl or kustomize, so those tests skip,
saying so, where kubectl is missing (``$MACEFIELD_REQUIRE_KUSTOMIZE=1`` makes that a failure on a machine
that should have it); everything else reads the files as written.  The CPU overlay's server
configuration then runs in a real server, and the probes' view of it is checked: alive but not ready
while loading, the health port answers in plaintext while the gRPC port wants TLS, readiness goes
NOT_SERVING on SIGTERM while liveness stays SERVING.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from conftest import REPO, quartz_like
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import self_signed_tls
from serving import ServerProcess, save_tiny_model, wait_for

from macefield_server.serving.config import ServerConfig, load_config

K8S = REPO / "deploy" / "k8s"
REQUIRE_KUSTOMIZE_ENV = "MACEFIELD_REQUIRE_KUSTOMIZE"
#: the oldest Kubernetes release the manifests need (gRPC probes GA) and the newest the validator knows
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
SELECTOR = {"app.kubernetes.io/name": "macefield-serve", "app.kubernetes.io/component": "server"}
IMAGE_UID = 10001  # the Dockerfile's macefield user


def validate_all(documents, versions=VERSIONS) -> None:
    for doc in documents:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema violation


def raw_manifests():
    """The base's plain manifests as written (every file kustomize lists under ``resources``)."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / "base" / name).read_text()) if doc]


def test_plain_manifests_pass_strict_schema_validation():
    docs = raw_manifests()
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "Deployment",
                                          "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                          "NetworkPolicy"}
    validate_all(docs)


def test_images_replicas_and_the_models_volume_as_written():
    """The GPU base runs the Dockerfile's gpu target (compose tags it <tag>-gpu), the CPU overlay the CPU image;
    the HPA alone sets the replica count; the CPU overlay (kind, minikube) has no claim to bind."""
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    cpu = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    (gpu_image,) = base["images"]
    (cpu_image,) = cpu["images"]
    assert f"{gpu_image['newName']}:{gpu_image['newTag']}" == compose["server-gpu"]["image"].replace(
        "${MACEFIELD_TAG:-latest}", "latest") and compose["server-gpu"]["build"]["target"] == "gpu"
    assert f"{cpu_image['newName']}:{cpu_image['newTag']}" == compose["server"]["image"].replace(
        "${MACEFIELD_TAG:-latest}", "latest") and "target" not in compose["server"]["build"]
    assert re.search(r"^FROM .* AS gpu$", (REPO / "Dockerfile").read_text(), re.M)
    (deployment,) = [d for d in raw_manifests() if d["kind"] == "Deployment"]
    assert "replicas" not in deployment["spec"]  # every `kubectl apply` would reset the HPA's count
    for text in ((REPO / "docs" / "scaling.md").read_text(),
                 (REPO / "deploy" / "slurm" / "macefield.sbatch").read_text()):
        assert "docker-daemon://macefield-serve:latest-gpu" in text and "docker-daemon://macefield-serve:latest " \
            not in text


def test_the_validator_catches_a_misspelt_field_and_a_wrong_type():
    (deployment,) = [d for d in raw_manifests() if d["kind"] == "Deployment"]
    typo = copy.deepcopy(deployment)
    probe = typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["prot"] = probe["grpc"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_all([typo])
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_all([wrong])


def self_signed(directory: Path) -> None:
    """tls.crt / tls.key for the Services' names and 127.0.0.1, and a token file, as secrets/README.md says."""
    self_signed_tls(directory, ("macefield.macefield.svc", "macefield-headless.macefield.svc"), ("127.0.0.1",))
    (directory / "tokens").write_text("# tokens\nk8s-test-token\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of deploy/k8s with the secrets a user would add."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root)
    self_signed(root / "base" / "secrets")
    return root


def kustomize(tree: Path, overlay: str):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "needs kubectl (kubectl kustomize renders deploy/k8s)"
        if os.environ.get(REQUIRE_KUSTOMIZE_ENV) == "1":
            pytest.fail(f"{reason}, and ${REQUIRE_KUSTOMIZE_ENV}=1 requires it")
        pytest.skip(reason)
    done = subprocess.run([kubectl, "kustomize", str(tree / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/cpu"])
def rendered(request, tree):
    docs = kustomize(tree, request.param)
    return request.param, {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] in ("ConfigMap", "Secret")
                            else d["metadata"]["name"]): d for d in docs}


def served_config(objects) -> dict:
    return yaml.safe_load(objects["ConfigMap", "macefield-config"]["data"]["serve.yaml"])


def test_rendered_objects_pass_strict_schema_validation(rendered):
    _, objects = rendered
    assert all(d["metadata"].get("namespace") == "macefield" for (kind, _), d in objects.items() if kind != "Namespace")
    validate_all(objects.values())


def test_gpu_request_probes_grace_and_security(rendered):
    overlay, objects = rendered
    config = served_config(objects)
    deployment = objects["Deployment", "macefield"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    gpus = {k: v.get("nvidia.com/gpu") for k, v in container["resources"].items()}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "replicas" not in deployment["spec"]
    if overlay == "base":
        assert gpus == {"requests": 1, "limits": 1}
        assert {m["device"] for m in config["models"]} == {"cuda"}
        assert container["image"] == "macefield-serve:latest-gpu"
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "macefield-models"
        assert ("PersistentVolumeClaim", "macefield-models") in objects
    else:
        assert gpus == {"requests": None, "limits": None}
        assert {m["device"] for m in config["models"]} == {"cpu"}
        assert container["image"] == "macefield-serve:latest"
        assert volumes["models"] == {"name": "models", "emptyDir": {}}  # nothing to bind on kind / minikube
        assert not [key for key in objects if key[0] == "PersistentVolumeClaim"]
    assert config["liveness_timeout_s"] > 0  # a hung compute fails the liveness probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config["port"], "health": config["health_port"], "metrics": config["metrics_port"]}
    for probe, service in (("startupProbe", "macefield.v1.MaceField"), ("readinessProbe", "macefield.v1.MaceField"),
                           ("livenessProbe", "liveness")):
        assert container[probe]["grpc"] == {"port": config["health_port"], "service": service}, probe
    from macefield_server.serving.app import LIVENESS_SERVICE, SERVICE_NAME

    assert {SERVICE_NAME, LIVENESS_SERVICE} == {"macefield.v1.MaceField", "liveness"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load and warm a model
    (sleep,) = [int(a) for a in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and sleep >= 3
    assert pod["terminationGracePeriodSeconds"] > sleep + config["grace_s"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    assert re.search(rf"useradd --system --uid {IMAGE_UID}\b", (REPO / "Dockerfile").read_text())
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config["metrics_port"])


def test_labels_selectors_and_references_agree(rendered):
    _, objects = rendered
    deployment = objects["Deployment", "macefield"]
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR and SELECTOR.items() <= labels.items()
    assert labels.get("app.kubernetes.io/part-of") == "macefield-serve"
    for name in ("macefield", "macefield-headless"):
        service = objects["Service", name]
        assert service["spec"]["selector"] == SELECTOR
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == "grpc" and port["appProtocol"] == "grpc"
    assert objects["Service", "macefield-headless"]["spec"]["clusterIP"] == "None"
    assert objects["Service", "macefield"]["spec"]["type"] == "ClusterIP"
    assert objects["PodDisruptionBudget", "macefield"]["spec"]["selector"]["matchLabels"] == SELECTOR
    policy = objects["NetworkPolicy", "macefield"]["spec"]
    assert policy["podSelector"]["matchLabels"] == SELECTOR and policy["egress"] == []
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"grpc", "metrics"}
    spread = template["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    assert spread == SELECTOR
    hpa = objects["HorizontalPodAutoscaler", "macefield"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "macefield"}
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "macefield_queue_depth"
    assert hpa["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, one replica always serves
    from macefield_server.serving.metrics import Metrics

    assert "macefield_queue_depth" in {m.name for m in Metrics().registry.collect()}
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith("macefield_queue_depth{") and rule["name"]["as"] == "macefield_queue_depth"
    # kustomize gave the generated ConfigMap and Secrets hashed names, and the pod refers to those
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap", "macefield-config"]["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == objects["Secret", "macefield-tls"]["metadata"]["name"]
    assert volumes["tokens"]["secret"]["secretName"] == objects["Secret", "macefield-tokens"]["metadata"]["name"]
    assert objects["Secret", "macefield-tls"]["type"] == "kubernetes.io/tls"
    (container,) = template["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = served_config(objects)
    assert container["args"] == ["--config", f"{mounts['config']}/serve.yaml"]
    assert config["security"]["tls_cert"] == f"{mounts['tls']}/tls.crt"
    assert config["security"]["auth_token_file"] == f"{mounts['tokens']}/tokens"


def test_docs_in_cluster_target_names_the_headless_service_and_is_balanced_with_health_checks():
    from macefield_client.core.channel import REPLICAS_SERVICE_CONFIG, resolve_target, service_config

    (target,) = re.findall(r'Client\("(dns:///[^"]+)"', (REPO / "docs" / "scaling.md").read_text())
    service = yaml.safe_load((K8S / "base" / "service-headless.yaml").read_text())
    namespace = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"]
    (port,) = service["spec"]["ports"]
    assert target == f"dns:///{service['metadata']['name']}.{namespace}.svc.cluster.local:{port['port']}"
    assert service_config(resolve_target(target)) == REPLICAS_SERVICE_CONFIG


def test_cpu_overlay_config_differs_from_the_base_only_in_the_device():
    base = yaml.safe_load((K8S / "base" / "serve.yaml").read_text())
    cpu = yaml.safe_load((K8S / "overlays" / "cpu" / "serve.yaml").read_text())
    for m in base["models"]:
        m["device"] = "cpu"
    assert base == cpu


def test_the_served_config_runs_and_the_probes_see_what_the_kubelet_should(tree, tmp_path):
    """The CPU overlay's serve.yaml (the file its ConfigMap is generated from), with local paths (certificate,
    tokens, a small model) and ports, in a real server: alive but not ready while the models load (held 2 s
    by a test fault), plaintext health answers on the health port while the gRPC port needs TLS and a token;
    on SIGTERM readiness (macefield.v1.MaceField) goes NOT_SERVING while a call is still in flight, liveness
    stays SERVING."""
    config = yaml.safe_load((tree / "overlays" / "cpu" / "serve.yaml").read_text())
    secrets = tree / "base" / "secrets"
    config.update(host="127.0.0.1", port=0, metrics_port=0, health_port=0)
    config["security"] = {"tls_cert": str(secrets / "tls.crt"), "tls_key": str(secrets / "tls.key"),
                          "auth_token_file": str(secrets / "tokens")}
    config["models"] = [{"path": str(save_tiny_model(tmp_path / "tiny.pt")), "device": "cpu"}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)  # every key known, every value valid
    assert loaded.max_connection_age_s > 0 and loaded.health_port == 0 and loaded.grace_s == ServerConfig().grace_s
    assert loaded.liveness_timeout_s > 0
    proc = ServerProcess(["--config", str(path)], env={"MACEFIELD_TEST_FAULT": "compute_delay_s=3,load_delay_s=2"})
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{proc.health_port}"))

        def status(service):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        # loading (the fault holds it 2 s before the models even start to load): the startup probe waits,
        # the liveness probe must not restart the pod
        assert status("macefield.v1.MaceField") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: status("macefield.v1.MaceField") == health_pb2.HealthCheckResponse.SERVING, timeout=120,
                 what="ready")
        with pytest.raises(grpc.RpcError) as refused:  # the gRPC port itself: TLS only
            health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{proc.port}")).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        from macefield_client import Client

        with Client(f"127.0.0.1:{proc.port}", tls=str(secrets / "tls.crt"), token="k8s-test-token") as client:
            call = _predict_in_background(client)
            wait_for(lambda: proc.metric("macefield_in_flight", method="Predict") == 1, what="a call in flight")
            proc.terminate()
            wait_for(lambda: status("macefield.v1.MaceField") == health_pb2.HealthCheckResponse.NOT_SERVING,
                     timeout=5, what="readiness NOT_SERVING")
            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING  # draining is not dying
            assert not call.done()
            assert call.result(timeout=60).forces.shape == (9, 3)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def _predict_in_background(client):
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(client.predict, quartz_like(seed=1), outputs=["energy", "forces"])
    pool.shutdown(wait=False)
    return future
