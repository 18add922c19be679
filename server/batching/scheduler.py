"""The dynamic batcher: a bounded queue per model, a dispatcher, and engine instances on worker threads.

Interface: ``await batcher.infer(inputs, deadline)`` for one request (tensors without the batch axis), and
``start()`` / ``stop()``. Requests with different input shapes never share a batch: a batch is formed from
the head request and the queued requests whose shapes match it, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.batching import BatcherConfig
from engines.errors import (
    DeadlineExceededError,
    InternalError,
    ResourceExhaustedError,
    UnavailableError,
    UnrecoverableError,
)
from engines.runtime.base import EngineInstance, InferTimings, Model
from server.batching.policy import QueueState, decide
from server.batching.stats import ModelStats
from server.stages import CURRENT_PART, CURRENT_STAGES, Attributes, StageLog

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]

# Consecutive failed batches after which a model is declared broken (health goes NOT_SERVING).
_MAX_CONSECUTIVE_FAILURES = 3
# Arrival gaps longer than this mean the server went idle; the rate estimate starts afresh.
_IDLE_GAP_S = 0.5


@dataclass
class _Item:
    inputs: Mapping[str, np.ndarray]
    key: ShapeKey
    future: asyncio.Future[Tensors]
    enqueued: float
    deadline: float | None  # loop clock (monotonic) seconds
    finish: Callable[[Tensors], Any] | None = None  # run on the engine thread on this item's outputs
    stages: StageLog | None = None  # the caller's, while its call is traced
    part: int = 0  # (server.stages.as_part)


@dataclass
class _Batch:
    items: list[_Item]
    dispatched: float
    timings: InferTimings | None = None
    outputs: list[Any] = field(default_factory=list)  # per item: its tensors, what finish made, or _Failed


@dataclass(frozen=True)
class _Failed:
    error: Exception  # one item's finish raised: only that item fails


def _stack(items: list[_Item]) -> tuple[Tensors, int]:
    t0 = time.perf_counter_ns()
    names = items[0].inputs.keys()
    batch = {n: np.stack([it.inputs[n] for it in items]) for n in names}
    return batch, time.perf_counter_ns() - t0


def _split(outputs: Tensors, n: int) -> tuple[list[Tensors], int]:
    t0 = time.perf_counter_ns()
    # Copies, so one request's result does not keep the whole batch's arrays alive.
    per_item = [{k: np.array(v[i]) for k, v in outputs.items()} for i in range(n)]
    return per_item, time.perf_counter_ns() - t0


def _finished(item: _Item, outputs: Tensors) -> Any:
    if item.finish is None:
        return outputs
    try:
        return item.finish(outputs)
    except Exception as exc:  # handed to that item's caller; the rest of the batch is fine
        return _Failed(exc)


class DynamicBatcher:
    def __init__(self, model: Model, config: BatcherConfig,
                 thread_init: Callable[[], None] | None = None) -> None:
        if config.max_batch_size > model.max_batch_size:
            raise ValueError(
                f"{model.name}: batcher max_batch_size {config.max_batch_size} exceeds the engine's "
                f"max_batch_size {model.max_batch_size}"
            )
        self.model = model
        self.config = config
        self.stats = ModelStats()
        self._thread_init = thread_init  # run first on each engine thread (e.g. its scheduling priority)
        self._queue: deque[_Item] = deque()
        self._idle: list[EngineInstance] = []
        self._busy = 0
        self._changed = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._last_arrival: float | None = None
        self._gap_ewma: float | None = None
        self._stopping = False
        self._broken: BaseException | None = None
        self._consecutive_failures = 0

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(self.config.instances, thread_name_prefix=f"engine-{self.name}",
                                            initializer=self._thread_init)
        self._idle = [self.model.new_instance() for _ in range(self.config.instances)]
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish batches in flight, fail what is still queued with UNAVAILABLE, release the instances."""
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(UnavailableError(f"{self.name}: server is shutting down"))
        for inst in self._idle:
            inst.close()
        self._idle.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def infer(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None,
                    finish: Callable[[Tensors], Any] | None = None) -> Any:
        """Queue one request (tensors without the batch axis) and wait for its outputs, or for what ``finish``
        made of them: post-processing given here runs on the engine's thread, not on the event loop, which must
        stay free to admit and shed calls."""
        if self._broken is not None:
            raise UnrecoverableError(f"{self.name}: engine failed earlier; the model is not serving")
        if self._stopping:
            raise UnavailableError(f"{self.name}: server is shutting down")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None and now >= deadline:
            self.stats.expired_before_run += 1
            raise DeadlineExceededError(f"{self.name}: deadline passed before the request was queued")
        if self.config.max_queue_size and len(self._queue) >= self.config.max_queue_size:
            self.stats.rejected_queue_full += 1
            raise ResourceExhaustedError(
                f"{self.name}: queue full ({self.config.max_queue_size} requests waiting); retry later"
            )
        self._note_arrival(now)
        key: ShapeKey = tuple((n, tuple(a.shape)) for n, a in inputs.items())
        item = _Item(inputs, key, loop.create_future(), now, deadline, finish, CURRENT_STAGES.get(), CURRENT_PART.get())
        self._queue.append(item)
        self._changed.set()
        return await item.future

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            if gap > _IDLE_GAP_S:
                self._gap_ewma = None
            else:
                self._gap_ewma = gap if self._gap_ewma is None else 0.8 * self._gap_ewma + 0.2 * gap
        self._last_arrival = now

    def _expected_gap(self, now: float) -> float | None:
        if self._gap_ewma is None or self._last_arrival is None:
            return None
        # If nothing has arrived for longer than the usual gap, the burst is over: expect no one soon.
        return max(self._gap_ewma, now - self._last_arrival)

    def _drop_dead_head(self, now: float) -> None:
        """Remove cancelled requests and fail expired ones at the head, so they never run."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
            elif head.deadline is not None and now >= head.deadline:
                self._expire(self._queue.popleft(), now)
            else:
                return

    def _expire(self, item: _Item, now: float) -> None:
        """Fail a queued request whose deadline has passed; its call's trace shows how long it waited."""
        self.stats.expired_before_run += 1
        self._log(item, now, now, {"facegate.expired": True})
        item.future.set_exception(DeadlineExceededError(f"{self.name}: deadline passed while queued"))

    def _compatible(self, limit: int) -> int:
        head_key = self._queue[0].key
        n = 0
        for it in self._queue:
            if it.key == head_key and not it.future.done():
                n += 1
                if n >= limit:
                    break
        return n

    def _take(self, n: int, now: float) -> list[_Item]:
        head_key = self._queue[0].key
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        while self._queue and len(taken) < n:
            it = self._queue.popleft()
            if it.future.done():
                continue
            if it.key != head_key:
                kept.append(it)
            elif it.deadline is not None and now >= it.deadline:
                self._expire(it, now)
            else:
                taken.append(it)
        kept.extend(self._queue)
        self._queue = kept
        return taken

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            now = loop.time()
            self._drop_dead_head(now)
            if not self._queue or not self._idle:
                await self._changed.wait()
                continue
            state = QueueState(
                queued=self._compatible(self.config.max_batch_size),
                oldest_wait_s=now - self._queue[0].enqueued,
                busy_instances=self._busy,
                arrival_gap_s=self._expected_gap(now),
                idle_instances=len(self._idle),
            )
            decision = decide(self.config, state)
            if decision.run == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=decision.wait_s)
                continue
            for _ in range(decision.batches):
                items = self._take(decision.run, now) if self._queue and self._idle else []
                if not items:
                    break
                instance = self._idle.pop()
                self._busy += 1
                task = asyncio.create_task(self._execute(instance, _Batch(items, now)))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    def _run_on_thread(self, instance: EngineInstance, batch: _Batch) -> None:
        inputs, input_ns = _stack(batch.items)
        outputs, t = instance.infer(inputs)
        per_item, output_ns = _split(outputs, len(batch.items))
        batch.outputs = [_finished(it, out) for it, out in zip(batch.items, per_item, strict=True)]
        batch.timings = InferTimings(input_ns + t.input_ns, t.infer_ns, output_ns + t.output_ns)

    async def _execute(self, instance: EngineInstance, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        for it in batch.items:
            self.stats.queue.add(int((batch.dispatched - it.enqueued) * 1e9))
        try:
            await loop.run_in_executor(self._executor, self._run_on_thread, instance, batch)
        except Exception as exc:
            log.exception("%s: batch of %d failed", self.name, len(batch.items))
            self._consecutive_failures += 1
            if self._consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                self._broken = exc
            err = InternalError(f"{self.name}: inference failed")
            end = loop.time()
            self._log_items(batch, end, None)
            for it in batch.items:
                self.stats.fail.add(int((end - it.enqueued) * 1e9))
                if not it.future.done():
                    it.future.set_exception(err)
        else:
            assert batch.timings is not None
            self._consecutive_failures = 0
            t = batch.timings
            self.stats.record_batch(len(batch.items), t.input_ns, t.infer_ns, t.output_ns)
            end = loop.time()
            self._log_items(batch, end, t)
            for it, out in zip(batch.items, batch.outputs, strict=True):
                self.stats.success.add(int((end - it.enqueued) * 1e9))
                if it.future.done():
                    continue
                if isinstance(out, _Failed):
                    it.future.set_exception(out.error)
                else:
                    it.future.set_result(out)
        finally:
            self._busy -= 1
            self._idle.append(instance)
            self._changed.set()

    def _log_items(self, batch: _Batch, end: float, t: InferTimings | None) -> None:
        """Each item of a batch that ran from ``dispatched`` to ``end``; ``t`` None: the batch failed."""
        outcome: Attributes = {"facegate.batch_size": len(batch.items)}
        if t is None:
            outcome["facegate.failed"] = True
        else:
            outcome["facegate.compute_ms"] = (t.input_ns + t.infer_ns + t.output_ns) / 1e6
        for it in batch.items:
            self._log(it, batch.dispatched, end, outcome)

    def _log(self, item: _Item, dequeued: float, end: float, outcome: Attributes) -> None:
        """A traced item's request as an interval of its call: queued from ``enqueued`` to ``dequeued``, ended at
        ``end`` (loop clock), with ``outcome``."""
        if item.stages is not None:
            item.stages.add_request(f"infer {self.name}", item.enqueued, end, {
                "facegate.model": self.name, "facegate.queue_ms": (dequeued - item.enqueued) * 1e3, **outcome},
                item.part)

    @property
    def broken(self) -> bool:
        return self._broken is not None
