"""A call's stages and model requests as intervals (server.stages), and their child spans (server.tracing): the
durations responses report are summed from the same intervals, traced or not; a model request nests under the
stage that holds it and never under another request; a log is bounded, and what it could not keep is counted on
the call's span."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engines.batching import BatcherConfig
from engines.errors import DeadlineExceededError, InternalError
from server.batching.scheduler import DynamicBatcher
from server.stages import CURRENT_PART, CURRENT_STAGES, MAX_INTERVALS, StageLog, Stages, as_part
from server.tracing import TracingInterceptor
from tests.fakes import FakeModel


def test_untraced_stages_sum_their_pieces_and_keep_no_intervals() -> None:
    stages = Stages()
    stages.add("decode", 1.0, 1.010)
    stages.add("detect", 1.010, 1.015)
    stages.add("decode", 1.015, 1.017)
    assert abs(stages.ms["decode"] - 12.0) < 1e-9 and CURRENT_STAGES.get() is None
    assert abs(stages.ms["detect"] - 5.0) < 1e-9


def test_traced_stages_log_each_piece_on_the_wall_clock() -> None:
    log = StageLog()
    token = CURRENT_STAGES.set(log)
    try:
        stages = Stages()
        t0 = time.perf_counter()
        stages.add("decode", t0, t0 + 0.010)
        stages.add("decode", t0 + 0.020, t0 + 0.025)
    finally:
        CURRENT_STAGES.reset(token)
    assert [i.name for i in log.intervals] == ["decode", "decode"]
    assert [round((i.end_ns - i.start_ns) / 1e3) for i in log.intervals] == [10_000, 5_000]  # (us)
    assert abs(log.intervals[0].start_ns - time.time_ns()) < 1e9  # (on the wall clock, not perf_counter's)
    assert abs(stages.ms["decode"] - 15.0) < 1e-6


def test_both_clocks_line_up() -> None:
    """Stages are timed on perf_counter, batchers on the event loop's monotonic clock: one moment read on each
    lands within a millisecond in the log."""
    log = StageLog()
    perf, mono = time.perf_counter(), time.monotonic()
    log.add("stage", perf, perf)
    log.add_request("infer m", mono, mono, {})
    assert abs(log.intervals[0].start_ns - log.intervals[1].start_ns) < 1_000_000


def test_requests_nest_under_the_shortest_stage_that_holds_them_never_under_each_other() -> None:
    log = StageLog()
    log.add("liveness", 0.0, 10.0)  # a stage that holds stages of its own (IdentifyFromClip's liveness check)
    log.add("classify", 5.0, 9.0)
    log.add_request("infer a", 5.1, 8.9, {})  # a and b ran side by side; b lies within a
    log.add_request("infer b", 5.2, 8.0, {})
    log.add("decode", 9.5, 11.0)  # overlaps liveness, not within it
    assert log.parents() == [None, 0, 1, 1, None]


def test_a_log_is_bounded_and_counts_what_it_dropped() -> None:
    log = StageLog()
    for i in range(MAX_INTERVALS + 6):
        log.add_request(f"infer m{i}", i, i + 0.5, {})
    assert len(log.intervals) == MAX_INTERVALS and log.dropped == 6


def test_the_intervals_become_child_spans_of_the_call() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    log = StageLog(limit=3)
    t0 = time.perf_counter()
    log.add("classify", t0, t0 + 0.004)
    log.add_request("infer m", time.monotonic(), time.monotonic() + 0.002, {"facegate.batch_size": 3})
    log.add("crop", t0 - 0.001, t0)
    log.add("total", t0 - 0.001, t0 + 0.004)  # past the limit: counted, not kept
    call = tracer.start_span("call")
    TracingInterceptor(tracer)._children(call, log)
    call.end()
    spans: dict[str, Any] = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"call", "classify", "infer m", "crop"}
    assert spans["call"].attributes["facegate.stages_dropped"] == 1
    assert spans["classify"].parent.span_id == spans["call"].context.span_id
    assert spans["crop"].parent.span_id == spans["call"].context.span_id
    assert spans["infer m"].parent.span_id == spans["classify"].context.span_id
    assert spans["infer m"].attributes["facegate.batch_size"] == 3
    assert abs(spans["classify"].end_time - spans["classify"].start_time - 4_000_000) <= 1


def test_the_batcher_logs_each_traced_request_with_its_wait_and_batch() -> None:
    """Requests of traced calls land in their own call's log, with the time they queued behind a running batch;
    an untraced call's request is logged nowhere; a failed batch marks its requests failed."""
    async def main() -> tuple[StageLog, StageLog, StageLog]:
        batcher = DynamicBatcher(FakeModel(delay_s=0.05), BatcherConfig(max_batch_size=8, max_queue_delay_us=0))
        failing = DynamicBatcher(FakeModel(fail=True), BatcherConfig(max_batch_size=1, max_queue_delay_us=0))
        await batcher.start()
        await failing.start()
        x = {"x": np.zeros(2, np.float32)}

        async def traced(b: DynamicBatcher, log: StageLog) -> None:
            CURRENT_STAGES.set(log)  # (each task has its own copy of the context)
            with contextlib.suppress(InternalError):
                await b.infer(x)

        first, second, broken = StageLog(), StageLog(), StageLog()
        running = asyncio.create_task(traced(batcher, first))  # takes the only instance for 50 ms
        await asyncio.sleep(0.01)
        await asyncio.gather(running, traced(batcher, second), batcher.infer(x), traced(failing, broken))
        await batcher.stop()
        await failing.stop()
        return first, second, broken

    first, second, broken = asyncio.run(main())
    (a,), (b,), (f,) = first.intervals, second.intervals, broken.intervals
    assert a.name == b.name == "infer fake" and not a.stage
    assert a.attributes["facegate.batch_size"] == 1 and b.attributes["facegate.batch_size"] == 2  # (with the untraced)
    assert float(a.attributes["facegate.queue_ms"]) < 20 < float(b.attributes["facegate.queue_ms"])
    # b's interval: its wait, then its own batch's 50 ms (the fake engine reports compute without its delay)
    assert (b.end_ns - b.start_ns) / 1e6 >= float(b.attributes["facegate.queue_ms"]) + 45
    assert float(b.attributes["facegate.compute_ms"]) > 0 and b.start_ns < a.end_ns < b.end_ns
    assert f.attributes["facegate.failed"] is True and "facegate.compute_ms" not in f.attributes


def test_parts_that_run_side_by_side_hold_only_their_own_stages_and_requests() -> None:
    """An enrolment's clips: clip 1's embedding and its request lie within clip 0's embedding in time, and nest
    under clip 1 all the same."""
    log = StageLog()

    async def clip(index: int, wait_s: float, embed_s: float) -> None:
        async def work() -> None:
            await asyncio.sleep(wait_s)
            start, mono = time.perf_counter(), time.monotonic()
            await asyncio.sleep(embed_s)
            log.add_request("infer m", mono + 0.001, time.monotonic() - 0.001, {}, CURRENT_PART.get())
            Stages().add("embed", start, time.perf_counter())
        await as_part(f"clip {index}", index, work())

    async def main() -> None:
        CURRENT_STAGES.set(log)
        await asyncio.gather(clip(0, 0.0, 0.08), clip(1, 0.02, 0.03))

    asyncio.run(main())
    keys = [f"{i.name}/{i.part}" for i in log.intervals]
    by_key = dict(zip(keys, log.intervals, strict=True))
    outer, inner = by_key["embed/1"], by_key["infer m/2"]  # clip 0's embedding holds clip 1's request in time
    assert outer.start_ns < inner.start_ns < inner.end_ns < outer.end_ns and not outer.contains(inner)
    assert {k: keys[p] if p is not None else None for k, p in zip(keys, log.parents(), strict=True)} == {
        "embed/1": "clip 0/1", "infer m/1": "embed/1", "embed/2": "clip 1/2", "infer m/2": "embed/2",
        "clip 0/1": None, "clip 1/2": None}


def test_a_request_that_expires_in_the_queue_shows_its_wait() -> None:
    async def main() -> StageLog:
        batcher = DynamicBatcher(FakeModel(delay_s=0.2), BatcherConfig(max_batch_size=1, max_queue_delay_us=0))
        await batcher.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(batcher.infer({"x": np.zeros(2, np.float32)}))  # holds the only instance
        await asyncio.sleep(0.02)
        log = StageLog()
        CURRENT_STAGES.set(log)
        with contextlib.suppress(DeadlineExceededError):
            await batcher.infer({"x": np.ones(2, np.float32)}, deadline=loop.time() + 0.05)
        await blocker
        await batcher.stop()
        return log

    (expired,) = asyncio.run(main()).intervals
    assert expired.attributes["facegate.expired"] is True and float(expired.attributes["facegate.queue_ms"]) >= 50
