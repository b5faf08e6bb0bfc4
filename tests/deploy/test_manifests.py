"""Kubernetes, KServe, compose and Docker files: valid, and tied to the server's own defaults.

Built-in kinds validate offline against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail); the ServiceMonitor and InferenceService against crd_schemas.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.deploy.crd_schemas import INFERENCE_SERVICE, SERVICE_MONITOR, validator
from tests.deploy.promql import DEPLOY, REPO, check_expressions, scraped_names
from xaid_server.settings import Settings, load_settings

DEFAULTS = Settings()
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
#: The oldest Kubernetes the manifests need (gRPC probes, the preStop sleep action), and the newest.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    pairs = [ln.strip().split(None, 1) for ln in joined.splitlines() if ln.strip()]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def _instructions(path: Path, name: str) -> list[str]:
    return [args for instr, args in _dockerfile(path) if instr == name]


def _image_env(path: Path) -> dict[str, str]:
    pairs = [item.partition("=") for a in _instructions(path, "ENV") for item in shlex.split(a)]
    return {key: value for key, _, value in pairs}


def _effective(container: dict[str, Any], dockerfile: Path) -> Settings:
    """The settings `xaid serve` runs with in this container: image env, container env, args."""
    env = _image_env(dockerfile) | {e["name"]: e["value"] for e in container.get("env", [])}
    return load_settings(container.get("args", []), env)


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _check_pod(pod: dict[str, Any], container: dict[str, Any], grpc_port_name: str) -> None:
    """Probes on the gRPC port, GPU requested, and a termination grace that covers deadlines."""
    settings = _effective(container, DOCKER / "gpu.Dockerfile")
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert settings.port == DEFAULTS.port == _ports(container)[grpc_port_name]
    assert settings.require_gpu
    # Probes go to the plaintext health port when one is set (the gRPC port may need TLS).
    probe_port = settings.health_port if settings.health_port > 0 else settings.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": probe_port}, probe
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert settings.grace_period >= settings.max_deadline
    # OPERATIONS.md: the process exits within its grace period + 2 s.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_period + 2
    user = _instructions(DOCKER / "gpu.Dockerfile", "USER")[-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user)
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert str(settings.models) in mounts
    # Whatever the server writes lands on a writable volume, not the image's file system.
    writable = [Path(m) for m, read_only in mounts.items() if not read_only]
    assert any(settings.gradient_cache.is_relative_to(m) for m in writable)


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path: Path) -> None:
    doc = _load(path)
    if doc["kind"] == "ServiceMonitor":
        validator(SERVICE_MONITOR).validate(doc)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_inference_service_validates() -> None:
    validator(INFERENCE_SERVICE).validate(_load(DEPLOY / "kserve" / "inferenceservice.yaml"))


def test_validation_rejects_unknown_fields() -> None:
    deployment = _load(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    service = _load(DEPLOY / "kserve" / "inferenceservice.yaml")
    service["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(jsonschema.ValidationError):
        validator(INFERENCE_SERVICE).validate(service)
    monitor = _load(K8S / "servicemonitor.yaml")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validator(SERVICE_MONITOR).validate(monitor)


def test_deployment_matches_the_server() -> None:
    pod = _load(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    _check_pod(pod, container, "grpc")
    settings = _effective(container, DOCKER / "gpu.Dockerfile")
    assert _ports(container)["metrics"] == settings.metrics_port == DEFAULTS.metrics_port


def test_inference_service_matches_the_server() -> None:
    predictor = _load(DEPLOY / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]
    _check_pod(predictor, predictor["containers"][0], "h2c")


def test_service_is_headless_and_selects_the_pods() -> None:
    deployment = _load(K8S / "deployment.yaml")
    service = _load(K8S / "service.yaml")
    container_ports = _ports(deployment["spec"]["template"]["spec"]["containers"][0])
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == DEFAULTS.port
    assert ports["metrics"]["port"] == DEFAULTS.metrics_port
    assert {p["targetPort"] for p in ports.values()} <= container_ports.keys()


def test_service_monitor_scrapes_the_metrics_port_with_the_gpu_label() -> None:
    deployment = _load(K8S / "deployment.yaml")
    service = _load(K8S / "service.yaml")
    monitor = _load(K8S / "servicemonitor.yaml")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert set(monitor["spec"]["podTargetLabels"]) <= pod_labels.keys()
    rules = (DEPLOY / "prometheus" / "rules" / "xaid.rules.yml").read_text()
    assert f'accelerator="{pod_labels["accelerator"]}"' in rules
    # The alert rules and the dashboard select job="xaid": the job label is the service name.
    assert service["metadata"]["name"] == "xaid"


def test_autoscaler_metric_comes_from_a_real_series(scrape: str, tmp_path: Path) -> None:
    hpa = _load(K8S / "hpa.yaml")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == _load(K8S / "deployment.yaml")["metadata"]["name"]
    )
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(_load(K8S / "prometheus-adapter.yaml")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "xaid_inflight_requests"
    assert "xaid_inflight_requests" in scraped_names(scrape)
    query = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "namespace, pod")
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0].strip("'"))
        .replace("<<.LabelMatchers>>", 'namespace="default"')
    )
    check_expressions({"adapter": query, "series": rule["seriesQuery"]}, tmp_path)


def test_compose_wires_xaid_prometheus_and_grafana() -> None:
    compose = _load(DEPLOY / "compose.yaml")["services"]
    build = compose["xaid"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKER / "cpu.Dockerfile"
    assert compose["xaid"]["ports"] == [f"{DEFAULTS.port}:{DEFAULTS.port}"]
    assert float(compose["xaid"]["stop_grace_period"].rstrip("s")) > DEFAULTS.grace_period + 2
    prometheus = _load(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "xaid"
    assert job["static_configs"][0]["targets"] == [f"xaid:{DEFAULTS.metrics_port}"]
    mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"])
    assert prometheus["rule_files"] == [mounts["./prometheus/rules"] + "/*.yml"]
    assert list((DEPLOY / "prometheus" / "rules").glob("*.yml"))


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "gpu.Dockerfile"])
def test_dockerfile_matches_the_server(name: str) -> None:
    path = DOCKER / name
    env = _image_env(path)
    settings = load_settings([], env)
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert (settings.port, settings.metrics_port) == (DEFAULTS.port, DEFAULTS.metrics_port)
    exposed = {int(p) for args in _instructions(path, "EXPOSE") for p in args.split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.metrics_port}
    assert json.loads(_instructions(path, "ENTRYPOINT")[-1]) == ["xaid", "serve"]
    uid, gid = _instructions(path, "USER")[-1].split(":")
    assert int(uid) > 0
    assert int(gid) > 0
    healthcheck = _instructions(path, "HEALTHCHECK")[-1]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:3] == ["python", "-m", "xaid_server.healthcheck"]
    assert importlib.util.find_spec(command[2]) is not None


def test_the_image_entrypoint_runs() -> None:
    xaid = Path(sys.executable).parent / "xaid"
    result = subprocess.run(
        [str(xaid), "serve", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--require-gpu" in result.stdout


def test_gpu_image_carries_the_cuda_and_cudnn_onnxruntime_was_built_for() -> None:
    path = DOCKER / "gpu.Dockerfile"
    args = dict(a.split("=", 1) for a in _instructions(path, "ARG"))
    installed = importlib.metadata.version("onnxruntime-gpu")
    assert args["ONNXRUNTIME_VERSION"] == installed, "update ONNXRUNTIME_VERSION and CUDA_IMAGE"
    pyproject = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'"onnxruntime-gpu([^"]*)"', pyproject)
    assert spec is not None
    assert installed in SpecifierSet(spec.group(1))
    requires = importlib.metadata.requires("onnxruntime-gpu") or []
    cuda = re.search(r"nvidia-cuda-runtime\S*~=(\d+)\.", " ".join(requires))
    cudnn = re.search(r"nvidia-cudnn-cu(\d+)~=(\d+)\.", " ".join(requires))
    assert cuda is not None
    assert cudnn is not None
    image = re.fullmatch(
        r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-ubuntu\S+", args["CUDA_IMAGE"]
    )
    assert image is not None, args["CUDA_IMAGE"]
    assert image.group(1) == cuda.group(1) == cudnn.group(1)
    # Since CUDA 12.3 the unnumbered "-cudnn-" tags carry cuDNN 9.
    assert cudnn.group(2) == "9"
    assert image.group(2) in ("", cudnn.group(2))
    assert _instructions(path, "FROM") == ["${CUDA_IMAGE}"]


def test_dockerignore_keeps_what_the_build_needs() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*"
    kept = {p[1:] for p in patterns if p.startswith("!")}
    pyproject = (REPO / "pyproject.toml").read_text()
    where = re.search(r"where = \[([^\]]*)\]", pyproject)
    assert where is not None
    needed = {"pyproject.toml", "README.md"} | set(re.findall(r'"([^"]+)"', where.group(1)))
    assert kept == needed
