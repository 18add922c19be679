"""Prometheus metrics on an HTTP port (``--metrics-port``, 8002 as Triton's; loopback by default).

Names and units follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms, base units). Labels
carry only bounded, server-defined values: the RPC's full method name (only registered methods are counted),
the gRPC status code, the model name (from the model repository) and the refusal reason; never a collection,
person or any other caller-supplied string.

Per-model figures (queue depth, queue and compute time, batch sizes) are read from the batchers' own statistics
at scrape time, so serving pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from engines.vision.video_watch import STOPS
from server.admission import Budget, WaitGate
from server.gpu_metrics import GpuCollector
from server.heap_metrics import HeapCollector
from server.memory_limit import MemoryLimitCollector
from server.model_registry import ModelRegistry
from server.servicers.answers import around_answer, final_code
from server.servicers.call_context import CURRENT_TRACE_ID, caller_label

if TYPE_CHECKING:
    from server.tracing import SpanCounts

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ModelCollector(Collector):
    """Per-model batcher statistics, collected when Prometheus scrapes."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily("facegate_model_queue_depth", "Requests waiting in the model's batcher queue "
                                  "(the autoscaling signal)", labels=["model"])
        inferences = CounterMetricFamily("facegate_model_inferences", "Items inferred by the model",
                                         labels=["model"])
        executions = CounterMetricFamily("facegate_model_executions", "Batches the model executed",
                                         labels=["model"])
        queue = CounterMetricFamily("facegate_model_queue_seconds", "Time requests spent queued", labels=["model"])
        compute = CounterMetricFamily("facegate_model_compute_seconds", "Time spent computing (input, infer, "
                                      "output)", labels=["model"])
        rejected = CounterMetricFamily("facegate_model_rejected", "Requests refused because the model's queue was "
                                       "full", labels=["model"])
        batches = HistogramMetricFamily("facegate_model_batch_size", "Executed batch sizes", labels=["model"])
        # Which engine serves each model here: `auto` picks per machine class, so pods on different nodes can
        # serve different runtimes and precisions, and a fleet is seen only through a metric (always 1).
        info = GaugeMetricFamily("facegate_model_info", "The model version this server serves and the runtime "
                                 "and precision serving it (always 1)", labels=["model", "version", "runtime"])
        for name, served in list(self._registry.models.items()):
            info.add_metric([name, served.meta.version, served.engine.runtime], 1)
            stats = served.batcher.stats
            depth.add_metric([name], served.batcher.queued)
            inferences.add_metric([name], stats.inference_count)
            executions.add_metric([name], stats.execution_count)
            queue.add_metric([name], stats.queue.ns / 1e9)
            compute.add_metric([name], (stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns)
                               / 1e9)
            rejected.add_metric([name], stats.rejected_queue_full)
            sizes = sorted(stats.batches.items())
            edges = [1, 2, 4, 8, 16, 32, 64, 128]
            cumulative = [(str(e), sum(b.executions for s, b in sizes if s <= e)) for e in edges]
            total = sum(b.executions for _, b in sizes)
            batches.add_metric([name], [*cumulative, ("+Inf", total)],
                               sum_value=sum(s * b.executions for s, b in sizes))
        yield from (info, depth, inferences, executions, queue, compute, rejected, batches)


class GateCollector(Collector):
    """Per pipeline: how long a call arriving now is expected to take, and how many calls were shed for it."""

    def __init__(self, gates: Mapping[str, WaitGate]) -> None:
        self._gates = dict(gates)

    def collect(self) -> Iterable[Any]:
        wait = GaugeMetricFamily("facegate_admission_expected_wait_seconds", "Expected time in the pipeline of a "
                                 "call arriving now (calls in flight over the measured completion rate; 0 before "
                                 "a rate is measured); over max_queue_wait_s new calls are shed", labels=["pipeline"])
        most = GaugeMetricFamily("facegate_admission_max_wait_seconds", "The expected time over which new calls are "
                                 "shed (max_queue_wait_s; a reload changes it)", labels=["pipeline"])
        shed = CounterMetricFamily("facegate_admission_shed", "Calls refused because they would have waited too "
                                   "long", labels=["pipeline"])
        for name, gate in self._gates.items():
            wait.add_metric([name], gate.expected_wait_s() or 0.0)
            most.add_metric([name], gate.max_wait_s)
            shed.add_metric([name], gate.refused)
        yield from (wait, most, shed)


class BudgetCollector(Collector):
    """Per server-wide budget: what calls in flight hold of it now, its size, and how many calls it refused. When
    RESOURCE_EXHAUSTED rises, these say which limit sheds (calls, request bytes, decoded pixels, ModelInfer's
    inputs, health checks and streams)."""

    def __init__(self, budgets: Mapping[str, Budget]) -> None:
        self._budgets = dict(budgets)

    def collect(self) -> Iterable[Any]:
        held = GaugeMetricFamily("facegate_budget_in_use", "What the calls in flight hold of a server-wide budget, "
                                 "in its unit (calls, bytes or pixels)", labels=["budget"])
        size = GaugeMetricFamily("facegate_budget_capacity", "A server-wide budget's size (its setting)",
                                 labels=["budget"])
        refused = CounterMetricFamily("facegate_budget_refused", "Calls refused because a server-wide budget "
                                      "had no room for them (RESOURCE_EXHAUSTED)", labels=["budget"])
        for name, budget in self._budgets.items():
            held.add_metric([name], budget.in_use)  # (ints written on the event loop: a read is never torn)
            size.add_metric([name], budget.capacity)
            refused.add_metric([name], budget.refused)
        yield from (held, size, refused)


class VideoStopCollector(Collector):
    """Video decodes a limit stopped, by which: a rise of ``busy`` says the server is short of CPU for the videos
    it admits, of ``memory`` that its memory control group reached its limit; ``cpu`` and ``stalled`` are callers'
    videos."""

    def collect(self) -> Iterable[Any]:
        stops = CounterMetricFamily("facegate_video_decodes_stopped", "Video decodes stopped at a limit: cpu (the "
                                    "video cost more than video_cpu_s; INVALID_ARGUMENT), busy (video_timeout_s "
                                    "passed while the server kept the decode from a CPU; RESOURCE_EXHAUSTED), "
                                    "stalled (video_timeout_s passed while the decoder neither ran nor waited for a "
                                    "CPU; INVALID_ARGUMENT), memory (the kernel killed the decoder under its CPU "
                                    "limit: out of memory; RESOURCE_EXHAUSTED)", labels=["reason"])
        for why, n in STOPS.snapshot().items():
            stops.add_metric([why.value], n)
        yield stops


class SpanCollector(Collector):
    """What became of the sampled spans ([tracing]): a collector that is down or slow shows as failed or dropped
    spans here, not only in the SDK's log."""

    def __init__(self, counts: SpanCounts, sample_ratio: Callable[[], float] | None = None) -> None:
        self._counts = counts
        self._sample_ratio = sample_ratio

    def collect(self) -> Iterable[Any]:
        c = self._counts
        spans = CounterMetricFamily("facegate_trace_spans", "Sampled spans by outcome: exported (the collector took "
                                    "them), failed (refused, or not delivered after the exporter's retries), dropped "
                                    "(the export queue was full)", labels=["outcome"])
        for outcome, n in (("exported", c.exported), ("failed", c.failed), ("dropped", c.dropped)):
            spans.add_metric([outcome], n)
        waiting = GaugeMetricFamily("facegate_trace_spans_queued", "Sampled spans waiting for export",
                                    value=c.waiting)
        capacity = GaugeMetricFamily("facegate_trace_spans_queue_capacity", "Spans the export queue holds before "
                                     "new ones are dropped ([tracing] max_queue)", value=c.max_queue)
        yield from (spans, waiting, capacity)
        if self._sample_ratio is not None:  # (a reload may change it: the one in force)
            yield GaugeMetricFamily("facegate_trace_sample_ratio", "Share of the calls without a trace of their own "
                                    "that are traced ([tracing] sample_ratio in force)", value=self._sample_ratio())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("facegate_requests", "RPCs answered, by method, gRPC status code and caller (a "
                                "configured caller's name, anonymous with authentication off, none when no caller "
                                "was identified)", ["method", "code", "caller"], registry=r)
        self.latency = Histogram("facegate_request_duration_seconds", "RPC latency as the server sees it",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("facegate_requests_in_flight", "RPCs being served now", registry=r)
        self.refused = Counter("facegate_refused", "Calls refused before any work, by reason",
                               ["reason"], registry=r)
        self.decode = Histogram("facegate_decode_duration_seconds", "Decoding per image or clip: kind image "
                                "(CheckLiveness), clip (a clip's frames) or video (a clip's video container), in "
                                "IdentifyFromClip and each clip of EnrollFromClip",
                                ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.credential_reloads = Counter("facegate_credential_reloads", "Credential reloads (SIGHUP or changed "
                                          "files), by outcome: applied, or refused (the credentials in force kept)",
                                          ["outcome"], registry=r)
        self.rate_syncs = Counter("facegate_deployment_rate_syncs", "Exchanges of what callers ask for with the "
                                  "other replicas ([auth] rate_scope = \"deployment\"), by outcome: ok, or failed "
                                  "(the database unreachable; after 3 in a row each replica holds the whole rate)",
                                  ["outcome"], registry=r)
        self.rate_share = Gauge("facegate_caller_rate_share", "With rate_scope = \"deployment\": the part of a "
                                "caller's rate_per_s that this server refills its bucket at now (1: all of it, as when "
                                "the shares are stale), by caller", ["caller"], registry=r)
        self.credentials_loaded = Gauge("facegate_credentials_loaded_timestamp_seconds",
                                        "When the credentials in force were read (Unix time)", registry=r)
        self.credentials_reload_ok = Gauge("facegate_credentials_last_reload_successful",
                                           "1 when the last credential reload was applied (or none was tried since "
                                           "the start), 0 when it was refused: the files hold what is not served",
                                           registry=r)
        self.credentials_reload_ok.set(1)
        self.certificate_expiry = Gauge("facegate_tls_certificate_expiration_timestamp_seconds",
                                        "When the TLS certificate in force stops being valid (Unix time): the "
                                        "served one (server), the first CA to expire of those client "
                                        "certificates are checked against (client_ca)", ["certificate"], registry=r)
        # With the expiry, the certificate's life: an alert on the share of it left holds for 90-day and 1-hour
        # certificates alike.
        self.certificate_start = Gauge("facegate_tls_certificate_not_before_timestamp_seconds",
                                       "When the TLS certificate in force became valid (Unix time), labelled as "
                                       "its expiration", ["certificate"], registry=r)
        self.gallery_templates = Gauge("facegate_gallery_templates", "Templates held in memory for search, over "
                                       "all collections and members", registry=r)
        r.register(VideoStopCollector())
        heap = HeapCollector()
        if heap.active:  # glibc's counts where the C library is glibc; nothing elsewhere
            r.register(heap)
        r.register(MemoryLimitCollector())
        # This process's own resident memory, CPU time and descriptors (process_*), as the library's default
        # registry has them: per serving worker, where the working set above is the whole group's.
        ProcessCollector(registry=r)

    def watch_models(self, registry: ModelRegistry) -> None:
        self.registry.register(ModelCollector(registry))
        gpus = GpuCollector()
        if gpus.active:  # NVML where a GPU is; nothing elsewhere
            self.registry.register(gpus)

    def watch_gates(self, gates: Mapping[str, WaitGate]) -> None:
        self.registry.register(GateCollector(gates))

    def watch_budgets(self, budgets: Mapping[str, Budget]) -> None:
        self.registry.register(BudgetCollector(budgets))

    def watch_tracing(self, counts: SpanCounts, sample_ratio: Callable[[], float]) -> None:
        self.registry.register(SpanCollector(counts, sample_ratio))

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)


_REASONS = {grpc.StatusCode.UNAUTHENTICATED: "unauthenticated", grpc.StatusCode.PERMISSION_DENIED: "permission",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted"}


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Outermost: counts every answered call that has one response (unary methods, which the auth interceptor
    serves as stream-unary) with its final status code, and its latency."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method, m = details.method, self._m

        async def measured(answer: Awaitable[Any], context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            m.in_flight.inc()
            code = grpc.StatusCode.OK
            try:
                return await answer
            except BaseException as err:  # aborts (the mapped status is on the context), cancellation, anything else
                code = final_code(err, context)
                raise
            finally:
                m.in_flight.dec()
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                m.requests.labels(method, name, caller_label()).inc()
                # A traced call's latency carries its trace id (an OpenMetrics exemplar, in scrapes that ask for
                # OpenMetrics): a dashboard goes from a slow bucket to a call that fell in it.
                trace_id = CURRENT_TRACE_ID.get()
                m.latency.labels(method).observe(time.perf_counter() - t0,
                                                 {"trace_id": trace_id} if trace_id is not None else None)
                if code in _REASONS:
                    m.refused.labels(_REASONS[code]).inc()

        return around_answer(handler, measured)

