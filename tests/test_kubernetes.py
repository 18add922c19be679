"""The Kubernetes manifests: every overlay renders with kubectl kustomize and every resource validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail), so an overlay applies to a cluster with no
custom resource definitions; the opt-in Prometheus Operator component's ServiceMonitor, a custom resource with no
schema there, is checked against the Service it scrapes. Plus the facts that must agree across files: the drain
timings, the probe ports, the GPU request, the replica count left to the autoscaler."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.config import load_config
from tests.conftest import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize`` renders for an overlay (a name under overlays/, or a folder)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (make test installs Debian's kubernetes-client)")
    folder = overlay if isinstance(overlay, Path) else KUBE / "overlays" / overlay
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] in ("facegate", "facegate-config")]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_of_every_overlay_validates(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= set(kinds)
    for doc in docs:  # every one a built-in kind: a ServiceMonitor here would fail where its CRD is not installed
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def with_component(overlay: str, component: str, folder: Path) -> list[dict[str, Any]]:
    """An overlay with an opt-in component added in an overlay of one's own, as the README shows; what it renders."""
    up = Path(os.path.relpath(KUBE, folder))  # kustomize refuses absolute paths
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(up / "overlays" / overlay)], "components": [str(up / "components" / component)]}))
    return render(folder)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_prometheus_operator_component_scrapes_the_service(overlay: str, tmp_path: Path) -> None:
    """The opt-in component: its ServiceMonitor selects the regular Service and scrapes a port that Service names;
    its PrometheusRule (the alerts, tested in tests/test_alert_rules.py) and Grafana dashboard come with it."""
    docs = with_component(overlay, "prometheus-operator", tmp_path)
    assert len(docs) == len(render(overlay)) + 3
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["spec"]["groups"]
    # The Grafana dashboard, in a ConfigMap Grafana's sidecar picks up by its label (a built-in kind: validated).
    (board,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "facegate-grafana-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["grafana-dashboard.json"])["uid"] == "facegate"
    kubernetes_validate.validate(board, K8S_VERSION, strict=True)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_identification_component_names_the_ensemble_bundle_for_the_entrypoint(overlay: str,
                                                                                   tmp_path: Path) -> None:
    """The opt-in component adds the two variables the entrypoint installs an ensemble bundle from, taken from the
    operator's ConfigMap, to the container's own; every resource still validates."""
    docs = with_component(overlay, "identification", tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (container,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    (plain,) = by_kind(render(overlay), "Deployment")["spec"]["template"]["spec"]["containers"]
    added = [e for e in container["env"] if e not in plain["env"]]
    assert {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in added} == {
        "FACEGATE_ENSEMBLE": {"name": "facegate-ensemble", "key": "source"},
        "FACEGATE_ENSEMBLE_SHA256": {"name": "facegate-ensemble", "key": "sha256"}}
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert all(f'"${{{e["name"]}:' in entrypoint for e in added)


def qos_class(pod: dict[str, Any]) -> str:
    """The QoS class the kubelet gives a pod, by Kubernetes' rules: Guaranteed when every container (init ones too)
    sets CPU and memory limits and its requests equal them (a request left out is the limit), BestEffort when none
    sets either, else Burstable. The kubelet sets the containers' oom_score_adj by it."""
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    resources = [c.get("resources", {}) for c in containers]
    if not any(r.get(k, {}).get(m) for r in resources for k in ("requests", "limits") for m in ("cpu", "memory")):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits", {}), r.get("requests", {})
        if any(m not in limits or str(requests.get(m, limits[m])) != str(limits[m]) for m in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_guaranteed_component_makes_the_pod_guaranteed_at_the_same_limits(overlay: str, tmp_path: Path) -> None:
    """Each overlay is Burstable as shipped (no CPU limit, a memory request under the limit), and the kubelet then
    gives the server a score at which it, not a video decoder, is killed at the memory limit (README, *Whom the
    kernel kills*). The opt-in component makes it Guaranteed (-997) without changing its memory limit or the CPUs it
    asks for; every resource still validates."""
    shipped = by_kind(render(overlay), "Deployment")["spec"]["template"]["spec"]
    (plain,) = shipped["containers"]
    docs = with_component(overlay, "guaranteed", tmp_path)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert qos_class(shipped) == "Burstable"
    assert qos_class(pod) == "Guaranteed"
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["memory"] == plain["resources"]["limits"]["memory"]
    assert container["resources"]["limits"]["cpu"] == plain["resources"]["requests"]["cpu"]
    assert {k: v for k, v in container.items() if k != "resources"} == {k: v for k, v in plain.items()
                                                                         if k != "resources"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tls_component_serves_its_certificate_and_probes_the_health_port(overlay: str, tmp_path: Path) -> None:
    """The opt-in component: a cert-manager Certificate whose Secret is mounted as a folder and named to the
    entrypoint (certificate, key, the roots clients trust), whose DNS names are the names the server checks and
    those of the Services, and the three probes moved to the plaintext health port (kubelet's gRPC probes cannot
    speak TLS). Every built-in resource still validates; the Certificate, a custom resource, is checked here."""
    docs = with_component(overlay, "tls", tmp_path)
    assert len(docs) == len(render(overlay)) + 1
    for doc in docs:
        if doc["kind"] != "Certificate":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (cert,) = [d for d in docs if d["kind"] == "Certificate"]
    assert cert["apiVersion"] == "cert-manager.io/v1" and "server auth" in cert["spec"]["usages"]
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == cert["spec"]["secretName"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount and mount["readOnly"]
    for variable, key in (("FACEGATE_TLS_CERT", "tls.crt"), ("FACEGATE_TLS_KEY", "tls.key"),
                          ("FACEGATE_TLS_TRUST_ROOTS", "ca.crt")):
        assert env[variable] == f"{mount['mountPath']}/{key}"
    names = env["FACEGATE_TLS_SERVER_NAMES"].split(",")
    assert names == cert["spec"]["dnsNames"]
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert services <= {n.split(".")[0] for n in names}
    config = tomllib.loads(by_kind(docs, "ConfigMap")["data"]["facegate.toml"])["server"]
    health = int(env["FACEGATE_HEALTH_PORT"])
    assert health not in (config["port"], config["metrics_port"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == health
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == health
    assert container["readinessProbe"]["grpc"]["service"] == "facegate.v1.LivenessService"
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert all(f'"${{{name}:' in entrypoint for name in env if name.startswith("FACEGATE_TLS_") or
               name == "FACEGATE_HEALTH_PORT")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_owns_the_replica_count(overlay: str) -> None:
    """A Deployment that an HPA scales has no spec.replicas (Kubernetes' advice): with one, every kubectl apply
    would scale a scaled-out Deployment back to it. The HPA's floor keeps more than the one pod the PDB lets go."""
    docs = render(overlay)
    deployment, hpa, pdb = (by_kind(docs, k) for k in ("Deployment", "HorizontalPodAutoscaler",
                                                        "PodDisruptionBudget"))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_share_each_callers_rate_through_the_gallery_database(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    (config := tmp_path / "facegate.toml").write_text(by_kind(docs, "ConfigMap")["data"]["facegate.toml"])
    (container,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "FACEGATE_GALLERY_URL" in {e["name"] for e in container["env"]}
    token = {"token_file": tmp_path / "token"}  # (FACEGATE_TOKEN_FILE: the pod's caller)
    assert load_config(config, token, gallery_url="postgresql://u@db/facegate").shared_rates_url
    with pytest.raises(ValueError, match="postgresql://"):  # (a pod without the database would not start)
        load_config(config, token, gallery_url="sqlite:///data/gallery.sqlite")


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
    # The settings and the caller token are mounted as folders: a file mounted with subPath is never updated, and
    # the server reloads credentials only from files that change (server.auth.reload).
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name, variable in (("config", "FACEGATE_CONFIG"), ("token", "FACEGATE_TOKEN_FILE")):
        assert "subPath" not in mounts[name] and env[variable].startswith(mounts[name]["mountPath"] + "/")
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "facegate-engines"
        assert "emptyDir" not in volumes["models"]


def test_the_adapter_rule_feeds_the_autoscaler_the_metric_the_server_exports() -> None:
    """deploy/prometheus-adapter/values.yaml: the custom metric it names is the one the HPA reads, made from the
    gauge the server exports (``facegate_model_queue_depth``, on /metrics in tests/test_metrics.py), per pod."""
    (rule,) = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    hpa = by_kind(render("cpu"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    exported = "facegate_model_queue_depth"
    assert re.fullmatch(rule["name"]["matches"], exported)
    assert rule["seriesQuery"].startswith(exported + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].startswith("sum(") and "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_a_typo_fails_validation() -> None:
    docs = render("cpu")
    deployment = by_kind(docs, "Deployment")
    deployment["spec"]["replcas"] = 3  # (a typo of replicas, which the Deployment leaves to the HPA)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
