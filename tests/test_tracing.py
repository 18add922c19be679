"""OpenTelemetry spans (server.tracing), received by a real OTLP/gRPC endpoint in the test (the collector's own
service, from opentelemetry-proto): a call that brings a sampled ``traceparent`` continues that trace; one that brings
an unsampled parent, or none at a ratio of 0, and a health check, are not traced; a span carries the status, the
stages and the models, and no score, decision or image; a collector that is down never holds the server's stop; the
metrics count the spans exported, failed and dropped from a full queue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client import CollectorRegistry

from benchmarks.server_process import free_port, metrics_text
from facegate.v1 import common_pb2, identification_pb2, identification_pb2_grpc, liveness_pb2, liveness_pb2_grpc
from facegate_client.client import clip_from_folder
from server.config import ServerConfig, load_config
from server.metrics import SpanCollector
from server.tracing import Tracing, TracingConfig
from tests.conftest import ROOT, clip_dir, scrape, start_server, stop_server, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """What the OpenTelemetry Collector's OTLP receiver does with spans, minus the pipeline: keeps them."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 - the proto's name
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, with its resource's attributes."""
        with self._lock:
            return [({a.key: a.value.string_value for a in rs.resource.attributes}, span)
                    for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for span in ss.spans]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    found = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield found, port
    server.stop(0)


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.mark.weights
def test_calls_are_traced_as_their_callers_ask(repository_dir: Path, samples: Path,
                                               collector: tuple[Collector, int]) -> None:
    found, port = collector
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # (the SDK's 5 s default between exports)
    try:
        running, thread = start_server(repository_dir, tracing=TracingConfig(
            otlp_endpoint=f"http://127.0.0.1:{port}", sample_ratio=0.0))
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    stub = liveness_pb2_grpc.LivenessServiceStub(running.channel())
    live = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes()))
    bad = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=b"not an image"))
    try:
        answer = stub.CheckLiveness(live, metadata=(("traceparent", f"00-{TRACE}-{PARENT}-01"),
                                                    ("x-request-id", "traced-1")), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.CheckLiveness(bad, metadata=(("traceparent", f"00-{TRACE}-{PARENT}-01"),), timeout=30)
        unsampled = "0af7651916cd43dd8448eb211c80319c"
        stub.CheckLiveness(live, metadata=(("traceparent", f"00-{unsampled}-b7ad6b7169203331-00"),), timeout=30)
        stub.CheckLiveness(live, timeout=30)  # no trace of its own, at a ratio of 0
        health = health_pb2_grpc.HealthStub(running.channel())  # probes are not traced, even when asked
        health.Check(health_pb2.HealthCheckRequest(), metadata=(("traceparent", f"00-{unsampled[::-1]}-{PARENT}-01"),),
                     timeout=10)
        assert wait_until(lambda: len(found.spans()) >= 2, 10), found.spans()
        time.sleep(0.5)  # (anything else would have been exported by now)
        registry = running.server.metrics.registry  # type: ignore[attr-defined]
        counted = {o: registry.get_sample_value("facegate_trace_spans_total", {"outcome": o})
                   for o in ("exported", "failed", "dropped")}
    finally:
        stop_server(running, thread)
    spans = found.spans()
    # none for the unsampled, untraced, probe
    assert {s.trace_id.hex() for _, s in spans} == {TRACE}, [s.name for _, s in spans]
    (resource, ok), (_, refused) = sorted((rs for rs in spans if rs[1].kind == rs[1].SPAN_KIND_SERVER),
                                          key=lambda rs: rs[1].start_time_unix_nano)
    assert counted == {"exported": float(len(spans)), "failed": 0.0, "dropped": 0.0}
    assert resource["service.name"] == "facegate" and resource["service.instance.id"]
    assert ok.name == "facegate.v1.LivenessService/CheckLiveness" and ok.kind == ok.SPAN_KIND_SERVER
    assert ok.parent_span_id.hex() == PARENT and ok.end_time_unix_nano > ok.start_time_unix_nano
    seen = attributes(ok)
    assert seen["rpc.system"] == "grpc" and seen["rpc.method"] == "CheckLiveness"
    assert seen["rpc.grpc.status_code"] == 0 and seen["facegate.request_id"] == "traced-1"
    assert seen["facegate.caller"] == "anonymous"
    assert seen["facegate.stage.total_ms"] == pytest.approx(answer.timings.total_ms)
    assert {m.split()[0] for m in seen["facegate.models"]} == {m.name for m in answer.models}
    assert not [k for k in seen if any(w in k for w in ("score", "decision", "image", "probab"))], seen
    assert ok.status.code == ok.status.STATUS_CODE_UNSET
    assert_stage_spans(ok, [s for _, s in spans if s.kind == s.SPAN_KIND_INTERNAL], answer)
    # The caller's error: its code, and the span's status left unset (OpenTelemetry's rule for gRPC servers).
    assert attributes(refused)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.status.code == refused.status.STATUS_CODE_UNSET


def assert_stage_spans(call: Any, children: list[Any], answer: liveness_pb2.CheckLivenessResponse) -> None:
    """The call's stages as child spans of its span, each as long as the response says, and each model request
    under the stage that made it, with its batch; no score or image in any of them (the refused call had none: it
    failed before its first stage)."""
    by_name = {s.name: s for s in children}
    stages = ("decode", "detect", "crop", "classify")
    infers = {f"infer {m.name}" for m in answer.models}
    assert sorted(by_name) == sorted([*stages, *infers]) and len(children) == len(by_name), sorted(by_name)
    for name in stages:
        span = by_name[name]
        assert span.parent_span_id == call.span_id and span.trace_id == call.trace_id
        assert (call.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
                <= call.end_time_unix_nano)
        took_ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
        assert took_ms == pytest.approx(getattr(answer.timings, f"{name}_ms"), abs=0.01), name
    order = [by_name[n].start_time_unix_nano for n in stages]
    assert order == sorted(order)  # one after the other, as they ran
    classifiers = {s.model for s in answer.model_scores}
    for name in infers:
        span, seen = by_name[name], attributes(by_name[name])
        stage = "classify" if seen["facegate.model"] in classifiers else "detect"
        assert span.parent_span_id == by_name[stage].span_id, (name, stage)
        assert seen["facegate.model"] == name.split()[1] and seen["facegate.batch_size"] >= 1
        assert seen["facegate.queue_ms"] >= 0 and seen["facegate.compute_ms"] > 0
        assert seen["facegate.queue_ms"] + seen["facegate.compute_ms"] <= (
            span.end_time_unix_nano - span.start_time_unix_nano) / 1e6 + 0.01
    for span in children:
        assert not [k for k in attributes(span) if any(w in k for w in ("score", "decision", "image", "probab"))]


@pytest.mark.weights
@pytest.mark.slow
def test_an_identification_traces_its_stages_members_and_liveness_check(
        repository_dir: Path, trained: dict[str, Any], tmp_path: Path) -> None:
    """Every stage under the call; each member's request under the embedding stage; the liveness check's own
    stages under its stage, and its classifiers' requests under its classification."""
    found = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        running, thread = start_server(repository_dir, gallery_path=tmp_path / "gallery.sqlite", tracing=TracingConfig(
            otlp_endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0))
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    try:
        stub = identification_pb2_grpc.IdentificationServiceStub(running.channel())
        stub.CreateCollection(identification_pb2.CreateCollectionRequest(collection="traced"), timeout=10)
        enrolled = stub.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
            collection="traced", person_id="p1", clips=[clip_from_folder(clip_dir(trained, k), 200.0)
                                                        for k in trained["enrol2_gallery"][:2]]), timeout=120)
        assert enrolled.clips_accepted == 2
        answer = stub.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
            collection="traced", clip=clip_from_folder(clip_dir(trained, trained["test_probes"][0]), 200.0),
            check_liveness=True), timeout=120)
        members = {m.name for m in answer.models} - {m.name for m in answer.liveness.models} - {"retinaface"}
        assert wait_until(lambda: sum(s.name.startswith("infer ") for _, s in found.spans())
                          >= 3 * len(members) + 2, 10)
        time.sleep(0.5)
    finally:
        stop_server(running, thread)
        receiver.stop(0)
    spans = [s for _, s in found.spans()]
    (call,) = [s for s in spans if s.name.endswith("/IdentifyFromClip")]
    under: dict[bytes, list[Any]] = {}
    for span in spans:
        under.setdefault(span.parent_span_id, []).append(span)

    def took_ms(group: list[Any]) -> float:
        return sum(s.end_time_unix_nano - s.start_time_unix_nano for s in group) / 1e6

    stages = {name: [s for s in under[call.span_id] if s.name == name]
              for name in ("decode", "detect", "window", "embed", "match", "liveness")}
    for name, group in stages.items():  # a stage timed in pieces (decoding, here) is one span a piece
        assert group and took_ms(group) == pytest.approx(getattr(answer.timings, f"{name}_ms"), abs=0.01), name
    assert {s.name for s in under[call.span_id]} == set(stages)
    assert sorted(s.name for s in under[stages["embed"][0].span_id]) == sorted(f"infer {m}" for m in members)
    assert all(s.name == "infer retinaface" for d in stages["detect"] for s in under[d.span_id])
    (check,) = stages["liveness"]
    inner = {s.name: s for s in under[check.span_id]}
    assert set(inner) == {"decode", "detect", "crop", "classify"}
    classifiers = sorted(f"infer {x.model}" for x in answer.liveness.model_scores)
    assert len(classifiers) == 2 and sorted(s.name for s in under[inner["classify"].span_id]) == classifiers
    # An enrolment's clips run side by side: each clip's stages and requests under its own clip, never another's.
    (enrolment,) = [s for s in spans if s.name.endswith("/EnrollFromClip")]
    assert sorted(s.name for s in under[enrolment.span_id]) == ["clip 0", "clip 1"]
    for clip in under[enrolment.span_id]:
        (embed,) = [s for s in under[clip.span_id] if s.name == "embed"]
        assert sorted(s.name for s in under[embed.span_id]) == sorted(f"infer {m}" for m in members), clip.name


@pytest.mark.weights
def test_without_stage_spans_a_call_is_one_span(repository_dir: Path, samples: Path) -> None:
    found = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    config = TracingConfig(otlp_endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0, stage_spans=False)
    running, thread = start_server(repository_dir, tracing=config)
    try:
        stub = liveness_pb2_grpc.LivenessServiceStub(running.channel())
        answer = stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(
            image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes())), timeout=30)
    finally:
        stop_server(running, thread)  # (the stop exports what is queued)
        receiver.stop(0)
    (span,) = [s for _, s in found.spans()]
    assert attributes(span)["facegate.stage.classify_ms"] == pytest.approx(answer.timings.classify_ms)


@pytest.mark.weights
@pytest.mark.slow
def test_a_reload_changes_the_sampling_without_a_restart(repository_dir: Path, samples: Path, tmp_path: Path) -> None:
    """A server process started as an operator starts it (``--config``, SIGHUP to reload): at ratio 0 a call is not
    traced; after a reload to ratio 1 without stage spans, one span a call; after another with them, the children
    too. A new collector address is reported as waiting for a start, and the spans go on to the first collector."""
    found = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    config, log = tmp_path / "facegate.toml", tmp_path / "server.log"

    def settings(ratio: float, stage_spans: bool, endpoint: str = f"http://127.0.0.1:{port}") -> None:
        config.write_text(f'[auth]\nreload_poll_s = 0.0\n\n[tracing]\notlp_endpoint = "{endpoint}"\n'
                          f"sample_ratio = {ratio}\nstage_spans = {str(stage_spans).lower()}\n")

    settings(0.0, True)
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--config", str(config), "--port", str(grpc_port),
                                 "--model-repository", str(repository_dir), "--metrics-port", str(metrics_port),
                                 "--gallery-url", f"sqlite:///{tmp_path / 'gallery.sqlite'}",
                                 "--audit-log", str(tmp_path / "audit.jsonl")],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    request = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes()))
    received: list[int] = []

    def call_and_count(reloads: int) -> None:
        """(After a reload, once the metrics count it:) one call, then the spans it made."""
        if reloads:
            proc.send_signal(signal.SIGHUP)
            line = f'facegate_credential_reloads_total{{outcome="applied"}} {float(reloads)}'
            assert wait_until(lambda: line in (metrics_text(metrics_port) or ""), 20), log.read_text()[-2000:]
        before = len(found.spans())
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            liveness_pb2_grpc.LivenessServiceStub(channel).CheckLiveness(request, timeout=30)
        wait_until(lambda: len(found.spans()) > before, 3)
        time.sleep(0.5)  # (anything else would have been exported by now)
        received.append(len(found.spans()) - before)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert wait_until(lambda: proc.poll() is not None or _serving(channel), 180), log.read_text()[-2000:]
        call_and_count(0)
        settings(1.0, False)
        call_and_count(1)
        ratio = scrape(metrics_port)[("facegate_trace_sample_ratio", ())]
        exemplars = openmetrics_exemplars(metrics_port, "CheckLiveness")
        settings(1.0, True)
        call_and_count(2)
        settings(1.0, True, endpoint=f"http://127.0.0.1:{free_port()}")
        call_and_count(3)
    finally:
        proc.terminate()
        proc.wait(60)
        receiver.stop(0)
    assert received == [0, 1, 8, 8] and ratio == 1.0
    # The traced call's latency names its trace, for a scrape that asks for OpenMetrics (as Prometheus does with
    # exemplar storage on); the untraced call before it left none.
    (traced,) = [sp for _, sp in found.spans() if sp.kind == sp.SPAN_KIND_SERVER][:1]
    assert exemplars == {traced.trace_id.hex()}
    text = log.read_text()
    assert "tracing: sample_ratio 0 -> 1, stage_spans true -> false" in text
    assert "tracing: stage_spans false -> true" in text
    assert "take effect at the next start: tracing.otlp_endpoint" in text


def test_a_reload_applies_the_sampling_and_reports_the_rest_of_tracing(tmp_path: Path) -> None:
    from server.auth.reload import restart_needed

    def config(text: str) -> ServerConfig:
        (tmp_path / "c.toml").write_text(f"[tracing]\n{text}\n")
        return load_config(tmp_path / "c.toml")

    on = config('otlp_endpoint = "http://collector:4317"')
    assert restart_needed(on, config('otlp_endpoint = "http://collector:4317"\nsample_ratio = 1.0\n'
                                     "stage_spans = false\nmax_queue = 16")) == ["tracing.max_queue"]
    # Off at the start, there is no tracer to adjust: turning it on, at any ratio, waits for a start.
    assert restart_needed(config(""), config('otlp_endpoint = "http://collector:4317"\nsample_ratio = 1.0')) == [
        "tracing.otlp_endpoint", "tracing.sample_ratio"]


def openmetrics_exemplars(port: int, method: str) -> set[str]:
    """The trace ids in the exemplars of ``method``'s latency buckets, scraped as OpenMetrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        text = answer.read().decode()
    return {m.group(1) for line in text.splitlines() if line.startswith("facegate_request_duration_seconds_bucket")
            and f"/{method}\"" in line and (m := re.search(r'# \{trace_id="([0-9a-f]{32})"\}', line))}


def _serving(channel: grpc.Channel) -> bool:
    try:
        return bool(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


class SlowCollector(Collector):
    """A collector whose first export waits until it is let go, as one under load or across a slow link."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 - the proto's name
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.release.wait(10)
        return super().Export(request, context)


def test_spans_that_a_full_queue_drops_are_counted() -> None:
    """The SDK drops past its queue with a log line at most once in 20 s: the metrics count every drop."""
    slow = SlowCollector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(slow, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tracing = Tracing(TracingConfig(otlp_endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0, max_queue=4,
                                    export_timeout_s=10.0))
    registry = CollectorRegistry()
    registry.register(SpanCollector(tracing.counts))
    try:
        for _ in range(4):  # a full batch: the exporter takes it and waits on the collector
            tracing.tracer.start_span("call").end()
        assert wait_until(lambda: tracing.counts.taken == 4, 5)
        for _ in range(10):  # 4 fill the queue again, 6 find it full
            tracing.tracer.start_span("call").end()
        assert registry.get_sample_value("facegate_trace_spans_queued") == 4
        assert registry.get_sample_value("facegate_trace_spans_queue_capacity") == 4
        assert registry.get_sample_value("facegate_trace_spans_total", {"outcome": "dropped"}) == 6
        slow.release.set()
        tracing.close()
    finally:
        slow.release.set()
        server.stop(0)
    assert len(slow.spans()) == 8
    assert {o: registry.get_sample_value("facegate_trace_spans_total", {"outcome": o})
            for o in ("exported", "failed", "dropped")} == {"exported": 8, "failed": 0, "dropped": 6}
    assert registry.get_sample_value("facegate_trace_spans_queued") == 0


def test_a_collector_that_is_down_does_not_hold_the_stop() -> None:
    tracing = Tracing(TracingConfig(otlp_endpoint=f"http://127.0.0.1:{free_port()}", sample_ratio=1.0,
                                    export_timeout_s=1.0))
    for _ in range(10):
        tracing.tracer.start_span("call").end()
    t0 = time.monotonic()
    tracing.close()
    assert time.monotonic() - t0 < 3.0
    counts = tracing.counts  # (what the exporter had given up on by the stop is counted as failed)
    assert counts.exported == counts.dropped == 0 and counts.failed + counts.waiting == 10


@pytest.mark.parametrize(("text", "why"), [
    ('otlp_endpoint = "collector:4317"', "must be http://HOST:PORT or https://HOST:PORT"),
    ('otlp_endpoint = "http://collector:4317"\nsample_ratio = 1.5', r"sample_ratio must lie in \[0, 1\]"),
    ('otlp_endpoint = "http://collector:4317"\nca_file = "ca.pem"', "ca_file needs an https://"),
    ('otlp_endpoint = "https://collector:4317"\nmax_queue = 0', "max_queue must be >= 1"),
    ('endpoint = "http://collector:4317"', r"unknown setting\(s\) \['endpoint'\]"),
    ('otlp_endpoint = "http://collector:4317"\nstage_spans = "no"', "stage_spans must be bool"),
])
def test_bad_tracing_settings_stop_the_start(text: str, why: str, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f"[tracing]\n{text}\n")
    with pytest.raises(ValueError, match=why):
        load_config(tmp_path / "c.toml")
