"""Distributed tracing: a server span per call, with a child span for each stage of its pipeline and each model
request it made, exported over OTLP/gRPC to a collector (``[tracing]``).

Off unless ``otlp_endpoint`` is set. A call that arrives with a W3C ``traceparent`` continues its caller's trace and
follows its caller's sampling decision; any other call starts a trace, sampled at ``sample_ratio``. A span names the
method, the status code, the caller, the request id, the models that served the call and the time of each stage.
Under it, the stages (decode, detect, ...) are spans of their own, and a model request is a span under the stage
that made it, with its model, its batch's size, its wait in the queue and its batch's compute time
(server.stages); a slow call then shows whether it queued or computed, and where.
It never carries an image, a frame, an embedding, a score, a decision, a person or a collection, as the logs never
do. Spans wait in a bounded queue (``max_queue``; past it they are dropped) for a background thread that exports
them, so a slow or absent collector costs a call only the queueing, never a wait. What becomes of each span
(exported, failed, dropped) is counted for the metrics (``SpanCounts``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, format_trace_id, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.servicers.answers import around_answer, final_code
from server.servicers.call_context import CURRENT_REQUEST_ID, CURRENT_TRACE_ID, caller_label
from server.stages import CURRENT_STAGES, StageLog

log = logging.getLogger(__name__)

# OpenTelemetry's semantic conventions for gRPC servers: these codes are the server's fault, so the span is an error;
# the others (a bad argument, a refusal) are the caller's, and leave the span's status unset.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})
_PROPAGATOR = TraceContextTextMapPropagator()
_UNTRACED = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str = ""
    """The collector's OTLP/gRPC address: ``http://host:4317`` (plaintext, e.g. a sidecar on the pod's loopback)
    or ``https://host:4317`` (TLS). Empty: no tracing."""
    sample_ratio: float = 0.01
    """Share of the calls that arrive without a trace of their own that are traced. A call with a ``traceparent``
    follows its caller's decision."""
    ca_file: Path | None = None
    """PEM CA that the collector's certificate is checked against (https only; default: the system's)."""
    service_name: str = "facegate"
    max_queue: int = 2048
    """Spans waiting for export; past this, new ones are dropped (bounded memory when the collector is slow)."""
    export_timeout_s: float = 5.0
    """Longest one export may take, and what a stop waits for the last spans."""
    stage_spans: bool = True
    """Each stage and model request of a traced call as a child span (7 more spans a CheckLiveness: about 0.4 ms
    more of the server's CPU a traced call, measured). False: the call's span alone, the stage times its
    attributes."""

    def __post_init__(self) -> None:
        if self.otlp_endpoint:
            url = urlsplit(self.otlp_endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"[tracing] otlp_endpoint must be http://HOST:PORT or https://HOST:PORT, got "
                                 f"{self.otlp_endpoint!r}")
            if self.ca_file is not None and url.scheme != "https":
                raise ValueError("[tracing] ca_file needs an https:// otlp_endpoint")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"[tracing] sample_ratio must lie in [0, 1], got {self.sample_ratio}")
        if self.max_queue < 1 or not 0 < self.export_timeout_s <= 60:
            raise ValueError(f"[tracing] max_queue must be >= 1 and export_timeout_s in (0, 60], got "
                             f"{self.max_queue}, {self.export_timeout_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


class SpanCounts:
    """What became of the sampled spans: handed to the collector (``exported``), refused by it or not delivered
    after the exporter's retries (``failed``), or ``dropped`` because the queue was full, and how many wait now.

    The SDK's batch processor drops silently past its queue (one log line in 20 s; its own counters need
    OpenTelemetry metrics, which facegate does not export). So the count of spans waiting is kept here, from the
    spans handed in and the spans the exporter took, and a span that would overflow the queue is dropped here,
    counted, before the SDK's queue sees it: its queue never fills, and no drop goes uncounted. (Between the
    exporter thread taking a batch and the count of it, the count runs high: a span can be dropped a moment before
    the queue was really full, never after.)"""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.queued_in = self.taken = self.exported = self.failed = self.dropped = 0

    @property
    def waiting(self) -> int:
        return self.queued_in - self.taken

    def admit(self) -> bool:
        with self._lock:
            if self.queued_in - self.taken >= self.max_queue:
                self.dropped += 1
                return False
            self.queued_in += 1
            return True

    def take(self, n: int) -> None:
        with self._lock:
            self.taken += n

    def done(self, n: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.exported += n
            else:
                self.failed += n


class _CountingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, counts: SpanCounts) -> None:
        self._inner, self._counts = inner, counts

    def export(self, spans: Any) -> SpanExportResult:
        self._counts.take(len(spans))
        result = SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
            return result
        finally:
            self._counts.done(len(spans), result is SpanExportResult.SUCCESS)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """The batch processor behind a queue bound that counts what it drops (SpanCounts)."""

    def __init__(self, inner: SpanProcessor, counts: SpanCounts) -> None:
        self._inner, self._counts = inner, counts

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._counts.admit():
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def package_version() -> str:
    try:
        return importlib.metadata.version("facegate")
    except importlib.metadata.PackageNotFoundError:  # (run from a source tree that was never installed)
        return ""


class _AdjustableRatio(Sampler):
    """The SDK's ratio sampler, which a reload may replace (the SDK's samplers are fixed once made): an operator
    can trace every call for the length of an incident, then go back, without a restart."""

    def __init__(self, ratio: float) -> None:
        self.inner = TraceIdRatioBased(ratio)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"AdjustableRatio{{{self.inner.rate}}}"


class Tracing:
    """The tracer of one server process and the exporter behind it (not the global provider: each server in a
    process, as in the tests, has its own). ``adjust`` applies the settings a reload may change: ``sample_ratio``
    and ``stage_spans``."""

    def __init__(self, config: TracingConfig, version: str = "") -> None:
        secure = urlsplit(config.otlp_endpoint).scheme == "https"
        credentials = None
        if secure:
            root = config.ca_file.read_bytes() if config.ca_file is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
        self.counts = SpanCounts(config.max_queue)
        exporter = _CountingExporter(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=not secure,
                                                      credentials=credentials, timeout=config.export_timeout_s),
                                     self.counts)
        self._timeout_s = config.export_timeout_s
        resource = Resource.create({"service.name": config.service_name, "service.version": version,
                                    "service.instance.id": f"{socket.gethostname()}-{os.getpid()}"})
        self._root = _AdjustableRatio(config.sample_ratio)
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(self._root))
        # (The exporter's timeout bounds an export: the processor's own export_timeout_millis is not used by the SDK.)
        self._provider.add_span_processor(_BoundedProcessor(BatchSpanProcessor(
            exporter, max_queue_size=config.max_queue, max_export_batch_size=min(512, config.max_queue)), self.counts))
        self.tracer: Tracer = self._provider.get_tracer("facegate.server")
        self.stage_spans = config.stage_spans
        log.info("tracing: spans to %s, %g of the calls without a trace of their own sampled", config.otlp_endpoint,
                 config.sample_ratio)

    @property
    def sample_ratio(self) -> float:
        return float(self._root.inner.rate)

    def adjust(self, config: TracingConfig) -> str:
        """Apply a reloaded ``sample_ratio`` and ``stage_spans`` to the calls that start from now on; returns what
        changed, for the log ("" if nothing)."""
        changed = []
        if config.sample_ratio != self.sample_ratio:
            changed.append(f"sample_ratio {self.sample_ratio:g} -> {config.sample_ratio:g}")
            self._root.inner = TraceIdRatioBased(config.sample_ratio)  # (one assignment: read whole by any call)
        if config.stage_spans != self.stage_spans:
            changed.append(f"stage_spans {str(self.stage_spans).lower()} -> {str(config.stage_spans).lower()}")
            self.stage_spans = config.stage_spans
        return ", ".join(changed)

    def interceptor(self) -> TracingInterceptor:
        return TracingInterceptor(self.tracer, lambda: self.stage_spans)

    def close(self) -> None:
        """The spans still queued exported, waiting at most ``export_timeout_s`` (a collector that is down must not
        hold the server's stop)."""
        done = threading.Thread(target=self._provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(self._timeout_s + 1.0)
        if done.is_alive():
            log.warning("tracing: the last spans were not exported within %.1f s; dropped", self._timeout_s)


def _annotate(span: Any, response: Any) -> None:
    """What a response may say in a span: the time of each stage and the models that served it."""
    timings = getattr(response, "timings", None)
    if timings is not None and hasattr(timings, "ListFields"):
        for field, value in timings.ListFields():
            span.set_attribute(f"facegate.stage.{field.name}", float(value))
    models = getattr(response, "models", None)
    if models:
        span.set_attribute("facegate.models", [f"{m.name} {m.version} {m.runtime}".strip() for m in models])


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Outside the error mapping (the span sees the final status): one server span per call that has one
    response (the unary methods, which the auth interceptor serves as stream-unary), and its children from the
    ``StageLog`` it opens for a sampled call (unsampled calls open none)."""

    def __init__(self, tracer: Tracer, stage_spans: Callable[[], bool] = lambda: True) -> None:
        self._tracer = tracer
        self._stage_spans = stage_spans  # (read at each call: a reload may change it)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_UNTRACED):
            return handler  # (health checks: a probe every few seconds; streams pass through around_answer)
        service, _, name = method.lstrip("/").partition("/")
        carrier = {k: v for k, v in (details.invocation_metadata or ()) if k in ("traceparent", "tracestate")
                   and isinstance(v, str)}

        async def traced(answer: Awaitable[Any], context: grpc.aio.ServicerContext) -> Any:
            span = self._tracer.start_span(method.lstrip("/"), context=_PROPAGATOR.extract(carrier),
                                           kind=SpanKind.SERVER, attributes={
                                               "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
            if not span.is_recording():  # not sampled: nothing more to pay
                return await answer
            CURRENT_TRACE_ID.set(format_trace_id(span.get_span_context().trace_id))  # (the metrics' exemplar)
            stages = StageLog() if self._stage_spans() else None
            token = CURRENT_STAGES.set(stages)
            code = grpc.StatusCode.OK
            try:
                response = await answer
                _annotate(span, response)
                return response
            except BaseException as err:  # aborts (the mapped status is on the context), cancellation, the rest
                code = final_code(err, context)
                raise
            finally:
                code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_attribute("facegate.caller", caller_label())
                if (request_id := CURRENT_REQUEST_ID.get()) is not None:
                    span.set_attribute("facegate.request_id", request_id)
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                CURRENT_STAGES.reset(token)
                if stages is not None:
                    self._children(span, stages)
                span.end()

        return around_answer(handler, traced)

    def _children(self, span: Any, stages: StageLog) -> None:
        """The call's stages and model requests as child spans, each under the shortest interval that contains it
        (a model request under the stage that made it), else under the call's span."""
        intervals, parents = stages.intervals, stages.parents()
        made: dict[int, Any] = {}
        # Longest first: an interval's parent is strictly longer, so its span exists by the time the child is made.
        for i in sorted(range(len(intervals)), key=lambda i: -intervals[i].length):
            up, interval = parents[i], intervals[i]
            made[i] = self._tracer.start_span(
                interval.name, context=set_span_in_context(span if up is None else made[up]),
                kind=SpanKind.INTERNAL, start_time=interval.start_ns, attributes=interval.attributes)
            made[i].end(end_time=interval.end_ns)
        if stages.dropped:
            span.set_attribute("facegate.stages_dropped", stages.dropped)
