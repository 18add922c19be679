"""The Kubernetes manifests: every overlay renders with kubectl kustomize and every resource validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail); the Prometheus Operator's ServiceMonitor,
a custom resource with no schema there, is checked against the Service it scrapes. Plus the facts that must agree
across files: the drain timings, the probe ports, the GPU request."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (make test installs Debian's kubernetes-client)")
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True,
                         check=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] in ("facegate", "facegate-config")]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_of_every_overlay_validates(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
            "ConfigMap"} <= set(kinds)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a custom resource: checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_probes_and_services_agree_with_the_server_settings(overlay: str) -> None:
    docs = render(overlay)
    config = tomllib.loads(by_kind(docs, "ConfigMap")["data"]["facegate.toml"])["server"]
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config["drain_delay_s"] + config["drain_grace_s"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config["port"] and ports["metrics"] == config["metrics_port"]
    assert container["readinessProbe"]["grpc"]["port"] == config["port"]
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    assert headless["spec"]["ports"][0]["appProtocol"] == "grpc"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert "facegate-gallery" in secrets  # the PostgreSQL URL comes from a Secret
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "facegate-engines"
        assert "emptyDir" not in volumes["models"]


def test_a_typo_fails_validation() -> None:
    docs = render("cpu")
    deployment = by_kind(docs, "Deployment")
    deployment["spec"]["replcas"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
