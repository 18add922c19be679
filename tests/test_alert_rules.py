"""The alerts (deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml), checked and unit-tested with
Prometheus's own promtool: each alert fires on the series it is for, after its ``for``, with its labels and texts,
and stays silent on the healthy series beside them; every metric an alert reads is one the server exports. The
Grafana dashboard beside them: its queries are valid PromQL on exported metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prometheus_client import generate_latest

from server.admission import Budget, WaitGate
from server.metrics import Metrics
from server.tracing import SpanCounts
from tests.conftest import ROOT, promtool

COMPONENT = ROOT / "deploy" / "kubernetes" / "components" / "prometheus-operator"
RULE = COMPONENT / "prometheusrule.yaml"
DASHBOARD = COMPONENT / "grafana-dashboard.json"
NS = {"namespace": "ns"}


def rules() -> dict[str, Any]:
    doc = yaml.safe_load(RULE.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    return doc["spec"]  # type: ignore[no-any-return]


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ",".join(f'{k}="{v}"' for k, v in sorted({**NS, **labels}.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def alert(name: str, at: str, *fired: tuple[dict[str, str], dict[str, str]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": {**NS, **labels}, "exp_annotations": notes} for labels, notes in fired]}


EXPIRY = "facegate_tls_certificate_expiration_timestamp_seconds"
START = "facegate_tls_certificate_not_before_timestamp_seconds"
REQUESTS = "facegate_requests_total"
SPANS = "facegate_trace_spans_total"
SYNCS = "facegate_deployment_rate_syncs_total"
VIDEO_STOPS = "facegate_video_decodes_stopped_total"
WORKING_SET = "facegate_memory_working_set_bytes"
LIMIT = "facegate_memory_limit_bytes"
OOM_KILLS = "facegate_memory_oom_kills_total"
GIB = 2**30
MIB = 2**20


def _memory(pod: str, values: str, instances: int = 1) -> list[dict[str, str]]:
    """A pod's working set (``values``) and 4 GiB limit, as each of its ``instances`` serving workers exports
    them (the same: they read the one control group)."""
    return [s for i in range(instances) for s in (series(WORKING_SET, values, pod=pod, instance=f"w{i}"),
                                                  series(LIMIT, f"{4 * GIB}x70", pod=pod, instance=f"w{i}"))]


def _near(pod: str, share: str, severity: str) -> tuple[dict[str, str], dict[str, str]]:
    minutes, limit = ("15", "80") if severity == "warning" else ("5", "90")
    tail = (" Compare facegate_heap_in_use_bytes (a leak raises it) and facegate_gallery_templates, and raise the "
            "limit or lower the budgets (max_inflight_*).") if severity == "warning" else (
        " the kernel kills it, and every call in flight, at 100 %.")
    middle = "; the kernel kills it at 100 %." if severity == "warning" else ";"
    return ({"pod": pod, "severity": severity},
            {"summary": f"facegate's container uses over {limit} % of its memory limit",
             "description": f"ns/{pod} has used {share} of its memory limit for {minutes} minutes{middle}{tail}"})


def _expiring(pod: str, certificate: str, left: str, severity: str) -> tuple[dict[str, str], dict[str, str]]:
    if severity == "warning":
        summary = (f"facegate's TLS {certificate} certificate expires within a quarter of its life or a week, "
                   "whichever is shorter")
        tail = (". Its renewal has failed, or the renewed files have not reached the pod (see "
                "FacegateCredentialReloadRefused).")
    else:
        summary = (f"facegate's TLS {certificate} certificate expires within a tenth of its life or a day, "
                   "whichever is shorter")
        tail = "; after that every client's TLS handshake fails."
    return ({"pod": pod, "certificate": certificate, "severity": severity},
            {"summary": summary,
             "description": f"The TLS {certificate} certificate of ns/{pod} expires in {left}{tail}"})


def _certificate(pod: str, certificate: str, left_s: int, life_s: int) -> list[dict[str, str]]:
    """A certificate's two series, with ``left_s`` of its ``life_s`` left at time 0 (where promtool's time()
    starts)."""
    return [series(EXPIRY, f"{left_s}x40", pod=pod, certificate=certificate),
            series(START, f"{left_s - life_s}x40", pod=pod, certificate=certificate)]


DAY_S = 86400
CASES: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [*_certificate("p-1", "server", 3 * DAY_S, 90 * DAY_S),  # a week at most: warned
                         *_certificate("p-1", "client_ca", 50000, 3650 * DAY_S),  # 13.9 hours: both
                         *_certificate("p-2", "server", 30 * DAY_S, 90 * DAY_S),  # a third left: quiet
                         # a day-long certificate with half its life left: quiet (a fixed week fired here)
                         *_certificate("p-3", "server", DAY_S // 2, DAY_S),
                         *_certificate("p-4", "server", 7200, DAY_S)],  # 2 hours of a day-long one: both
        "alert_rule_test": [
            alert("FacegateTLSCertificateExpiresSoon", "10m",  # the warning's 15 minutes not yet over
                  _expiring("p-1", "client_ca", "13h 43m 20s", "critical"),
                  _expiring("p-4", "server", "1h 50m 0s", "critical")),
            alert("FacegateTLSCertificateExpiresSoon", "20m",
                  _expiring("p-1", "server", "2d 23h 40m 0s", "warning"),
                  _expiring("p-1", "client_ca", "13h 33m 20s", "warning"),
                  _expiring("p-1", "client_ca", "13h 33m 20s", "critical"),
                  _expiring("p-4", "server", "1h 40m 0s", "warning"),
                  _expiring("p-4", "server", "1h 40m 0s", "critical")),
        ],
    },
    {
        "interval": "1m",
        "input_series": [series("facegate_credentials_last_reload_successful", "1 1 0x20", pod="p-1"),
                         series("facegate_credentials_last_reload_successful", "1 0 0 1x20", pod="p-2")],
        "alert_rule_test": [
            alert("FacegateCredentialReloadRefused", "5m"),  # refused 3 minutes ago: pending
            alert("FacegateCredentialReloadRefused", "8m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "facegate refused its new credential files and serves the previous ones",
                 "description": "ns/p-1 refused the last change to its callers, token file or TLS files; the reason "
                                'is in its log and audit ("rpc": "ReloadCredentials").'})),
        ],
    },
    {   # p-1 refuses 10 of every 110 calls, p-2 2 of 102
        "interval": "1m",
        "input_series": [series(REQUESTS, "0+100x30", pod="p-1", code="OK", method="/m"),
                         series(REQUESTS, "0+10x30", pod="p-1", code="RESOURCE_EXHAUSTED", method="/m"),
                         series(REQUESTS, "0+100x30", pod="p-2", code="OK", method="/m"),
                         series(REQUESTS, "0+2x30", pod="p-2", code="RESOURCE_EXHAUSTED", method="/m"),
                         series(REQUESTS, "0+60x30", pod="p-2", code="INVALID_ARGUMENT", method="/m"),
                         series(REQUESTS, "0+6x30", pod="p-3", code="INTERNAL", method="/m")],
        "alert_rule_test": [
            alert("FacegateShedding", "10m"),  # (the rate needs two samples, then 10 minutes)
            alert("FacegateShedding", "20m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "facegate refuses over 5 % of its calls as RESOURCE_EXHAUSTED",
                 "description": "ns/p-1 refused 9.091% of its calls in the last 5 minutes as RESOURCE_EXHAUSTED."})),
            alert("FacegateInternalErrors", "20m", (
                {"pod": "p-3", "severity": "critical"},
                {"summary": "facegate answers calls with INTERNAL, UNKNOWN or DATA_LOSS",
                 "description": "ns/p-3 answered 0.10 calls a second with INTERNAL, UNKNOWN or DATA_LOSS over the "
                                "last 5 minutes; its log has the traceback."})),
        ],
    },
    {   # p-1 cannot reach the database it shares callers' rates through (a sync a second); p-2 can
        "interval": "1m",
        "input_series": [series(SYNCS, "0+60x40", pod="p-1", outcome="failed"),
                         series(SYNCS, "0+0x40", pod="p-1", outcome="ok"),
                         series(SYNCS, "0+60x40", pod="p-2", outcome="ok"),
                         series(SYNCS, "0+0x40", pod="p-2", outcome="failed")],
        "alert_rule_test": [
            alert("FacegateDeploymentRatesUnshared", "10m"),  # (pending)
            alert("FacegateDeploymentRatesUnshared", "20m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "facegate cannot share callers' rates with the other replicas",
                 "description": "ns/p-1 failed 100% of its exchanges with the other replicas over the last 5 "
                                "minutes (the gallery's PostgreSQL is unreachable from it): it holds each caller to "
                                "its whole rate_per_s, so a caller spread over N replicas may start up to N times "
                                "its rate."})),
        ],
    },
    {   # p-1 fails to export 30 spans a minute (its collector is down); p-2 exports all of its own
        "interval": "1m",
        "input_series": [series(SPANS, "0+30x40", pod="p-1", outcome="failed"),
                         series(SPANS, "0+0x40", pod="p-1", outcome="dropped"),
                         series(SPANS, "0+600x40", pod="p-2", outcome="exported"),
                         series(SPANS, "0+0x40", pod="p-2", outcome="dropped")],
        "alert_rule_test": [
            alert("FacegateTraceSpansLost", "15m"),  # (pending: 15 minutes from its first firing evaluation)
            alert("FacegateTraceSpansLost", "25m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "facegate loses trace spans on the way to its OpenTelemetry collector",
                 "description": "ns/p-1 lost 0.50 spans a second over the last 5 minutes (facegate_trace_spans_total: "
                                "failed when the collector is down or refuses them, dropped when the export queue "
                                "is full)."})),
        ],
    },
    {   # p-1 stops a video a minute because the server kept it from a CPU; p-2 stops them for their own cost only
        "interval": "1m",
        "input_series": [series(VIDEO_STOPS, "0+1x40", pod="p-1", reason="busy"),
                         series(VIDEO_STOPS, "0+0x40", pod="p-1", reason="cpu"),
                         series(VIDEO_STOPS, "0+0x40", pod="p-2", reason="busy"),
                         series(VIDEO_STOPS, "0+3x40", pod="p-2", reason="cpu")],
        "alert_rule_test": [
            alert("FacegateVideoDecodesStarved", "15m"),  # (pending)
            alert("FacegateVideoDecodesStarved", "25m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "facegate is too busy to decode the videos it admits within video_timeout_s",
                 "description": "ns/p-1 stopped 0.017 video decodes a second over the last 10 minutes because the "
                                "server kept them from a CPU until video_timeout_s (answered RESOURCE_EXHAUSTED). "
                                "Add CPU or replicas, or admit fewer videos at once (max_inflight_pixels)."})),
        ],
    },
    {   # of a 4 GiB limit: p-1 (two workers) holds 3.5 GiB, p-2 3.875 GiB, p-3 1 GiB; p-4 grows 10 MiB a minute
        # from 2.2 GiB, p-5 20 MiB a minute from 0.5 GiB (its trend reaches the limit too, but it is under half)
        "interval": "1m",
        "input_series": [*_memory("p-1", f"{int(3.5 * GIB)}x70", instances=2),
                         *_memory("p-2", f"{int(3.875 * GIB)}x70"),
                         *_memory("p-3", f"{GIB}x70"),
                         *_memory("p-4", f"{int(2.2 * GIB)}+{10 * MIB}x70"),
                         *_memory("p-5", f"{GIB // 2}+{20 * MIB}x70")],
        "alert_rule_test": [
            alert("FacegateMemoryNearLimit", "10m", _near("p-2", "96.88%", "critical")),
            alert("FacegateMemoryNearLimit", "20m", _near("p-1", "87.5%", "warning"),
                  _near("p-2", "96.88%", "warning"), _near("p-2", "96.88%", "critical")),
            alert("FacegateMemoryFillsUp", "20m"),  # (pending)
            alert("FacegateMemoryFillsUp", "40m", (
                {"pod": "p-4", "severity": "warning"},
                {"summary": "facegate's memory grows to reach its limit within four hours",
                 "description": "ns/p-4's memory, at the rate it grew over the last two hours, reaches its limit "
                                "within four hours. A leak raises facegate_heap_in_use_bytes too; free heap kept "
                                "(facegate_heap_free_bytes) levels off."})),
        ],
    },
    {   # p-1 (two workers, the same group) has a decoder killed at 5 minutes; p-2 never has one
        "interval": "1m",
        "input_series": [series(OOM_KILLS, "0x4 1x40", pod="p-1", instance="w0"),
                         series(OOM_KILLS, "0x4 1x40", pod="p-1", instance="w1"),
                         series(OOM_KILLS, "0x44", pod="p-2", instance="w0")],
        "alert_rule_test": [
            alert("FacegateMemoryProcessKilled", "4m"),
            alert("FacegateMemoryProcessKilled", "6m", (
                {"pod": "p-1", "severity": "warning"},
                {"summary": "the kernel killed a process of facegate's container for want of memory",
                 "description": "ns/p-1 reached its memory limit in the last 10 minutes, and the kernel killed a "
                                "process in it (a video decoder first: its call was answered RESOURCE_EXHAUSTED). "
                                "See FacegateMemoryNearLimit; raise the limit or lower the budgets "
                                "(max_inflight_*)."})),
            alert("FacegateMemoryProcessKilled", "20m"),  # (10 minutes on, quiet again)
        ],
    },
]


def test_the_rules_are_valid_promql_and_fire_as_meant(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    check = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 12 rules found" in check.stdout, check.stdout + check.stderr
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": CASES}, sort_keys=False))
    run = subprocess.run([promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    tested = {t["alertname"] for case in CASES for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for g in rules()["groups"] for r in g["rules"]}  # every alert has a case


def exported() -> set[str]:
    """The names of the series the server exports: its registry as a scrape sees it, with the per-model,
    per-pipeline and per-budget collectors (here over no models: their families are named all the same)."""
    metrics = Metrics()
    metrics.watch_gates({"liveness": WaitGate("liveness", 1.0, 1)})
    metrics.watch_budgets({"calls": Budget("calls", 1, "calls")})
    metrics.watch_models(SimpleNamespace(models={}))  # type: ignore[arg-type]
    metrics.watch_tracing(SpanCounts(1), lambda: 0.01)
    names: set[str] = set()
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name} if kind != "histogram" else {f"{name}_{s}" for s in ("bucket", "sum", "count")}
    return names


def test_every_metric_an_alert_reads_is_exported_by_the_server() -> None:
    read = {m for g in rules()["groups"] for r in g["rules"] for m in re.findall(r"facegate_[a-z_]+", r["expr"])}
    names = exported()
    assert read and read <= names, read - names


def test_the_dashboards_queries_are_valid_promql_on_exported_metrics(tmp_path: Path) -> None:
    """Each panel's query, its Grafana variables given values, checked by promtool as a recording rule's
    expression; every metric it reads is exported."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "facegate"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) == len(dashboard["panels"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all("$namespace" in e and "$pod" in e for e in exprs)  # every panel follows the chosen pods
    concrete = [e.replace("$__rate_interval", "5m").replace("$namespace", "ns").replace("$pod", ".*") for e in exprs]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"facegate:dashboard_{i}", "expr": e} for i, e in enumerate(concrete)]}]}))
    check = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in check.stdout, check.stdout + check.stderr
    read = {m for e in exprs for m in re.findall(r"facegate_[a-z_]+", e)}
    names = exported()
    assert read <= names, read - names


def test_the_certificate_panel_shows_the_share_of_life_the_alert_reads(tmp_path: Path) -> None:
    """The dashboard's share-of-life panel, evaluated by promtool on two certificates (half of 90 days left, a
    quarter of a day left), and its threshold lines at the alert's shares (a tenth: critical; a quarter: warning)."""
    panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"]
                 if p["title"] == "Share of each TLS certificate's life left")
    assert [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 0.1, 0.25]
    expr = panel["targets"][0]["expr"].replace("$namespace", "ns").replace("$pod", ".*")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": [{
        "interval": "1m",
        "input_series": [*_certificate("p-1", "server", 45 * DAY_S, 90 * DAY_S),
                         *_certificate("p-2", "server", DAY_S // 4, DAY_S)],
        "promql_expr_test": [{"expr": expr, "eval_time": "0m", "exp_samples": [
            {"labels": '{certificate="server", namespace="ns", pod="p-1"}', "value": 0.5},
            {"labels": '{certificate="server", namespace="ns", pod="p-2"}', "value": 0.25}]}],
    }]}, sort_keys=False))
    run = subprocess.run([promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
