"""Where one call's time went, as intervals: each stage of its pipeline (decode, detect, ...) and each model request
it made (its wait in the batcher's queue, then its batch's run). The stage durations the responses report
(``timings``) are summed from these intervals (``Stages``), traced or not; the intervals themselves are kept only
while the call is traced, for its child spans (server.tracing opens a ``StageLog`` for the call in
``CURRENT_STAGES``). Untraced, recording costs a context variable read.

Parts of a call that run side by side (an enrolment's clips, ``as_part``) keep their stages and requests apart:
each nests only within its own part. Intervals are recorded from coroutines on the event loop only (never from
pool threads), so a log needs no lock.
A log holds at most ``MAX_INTERVALS``; past that, intervals are counted, not kept: a large enrolment must not make
its trace unbounded. Intervals carry names, models, batch sizes and times, never what a request or response held.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

MAX_INTERVALS = 256

Attributes = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class Interval:
    name: str
    start_ns: int  # on the wall clock (time.time_ns), as spans are
    end_ns: int
    attributes: Attributes = field(default_factory=dict)
    stage: bool = True  # a stage may hold others; a model request holds none (requests that run side by side can
    # lie one within another without one having made the other)
    part: int = 0  # the part of the call it belongs to (``as_part``; 0: the call itself)

    @property
    def length(self) -> int:
        return self.end_ns - self.start_ns

    def contains(self, other: Interval) -> bool:
        return (self.stage and self.part in (0, other.part) and self.start_ns <= other.start_ns
                and other.end_ns <= self.end_ns and self.length > other.length)


class StageLog:
    """The intervals of one traced call, in the order they ended."""

    def __init__(self, limit: int = MAX_INTERVALS) -> None:
        self.intervals: list[Interval] = []
        self.dropped = 0
        self._limit = limit
        now = time.time_ns()
        # Stages are timed on perf_counter and batchers on the event loop's clock (monotonic): both are turned into
        # wall-clock times with the offsets read once here, so a call's intervals line up with one another.
        self._perf_offset = now - time.perf_counter_ns()
        self._mono_offset = now - time.monotonic_ns()

    def _keep(self, name: str, start: float, end: float, offset: int, attributes: Attributes, stage: bool,
              part: int) -> None:
        """An interval from ``start`` to ``end`` (seconds on a clock ``offset`` ns behind the wall clock)."""
        if len(self.intervals) >= self._limit:
            self.dropped += 1
            return
        start_ns = round(start * 1e9) + offset
        self.intervals.append(Interval(name, start_ns, max(start_ns, round(end * 1e9) + offset), attributes, stage,
                                       part))

    def add(self, name: str, start: float, end: float, attributes: Attributes | None = None) -> None:
        """A stage of the current part, timed on ``time.perf_counter`` (seconds)."""
        self._keep(name, start, end, self._perf_offset, attributes or {"facegate.stage": name}, True,
                   CURRENT_PART.get())

    def add_request(self, name: str, start: float, end: float, attributes: Attributes, part: int = 0) -> None:
        """A model request of ``part``, timed on ``time.monotonic`` (seconds), the clock of asyncio's
        ``loop.time()``."""
        self._keep(name, start, end, self._mono_offset, attributes, False, part)

    def parents(self) -> list[int | None]:
        """For each interval, the index of the shortest other interval that contains it (None: the call's own span
        holds it), so a model request nests under the stage that made it."""
        # Only stages hold others, and only those of the same part or of the call: a few for each interval (a
        # 16-clip enrolment's 256 intervals in 0.36 ms, where every pair took 4.8 ms of the event loop).
        holders: dict[int, list[int]] = {}
        for j, outer in enumerate(self.intervals):
            if outer.stage:
                holders.setdefault(outer.part, []).append(j)
        out: list[int | None] = []
        for inner in self.intervals:
            best: int | None = None
            for j in (*holders.get(inner.part, ()), *(holders.get(0, ()) if inner.part else ())):
                outer = self.intervals[j]
                if outer.contains(inner) and (best is None or outer.length < self.intervals[best].length):
                    best = j
            out.append(best)
        return out


CURRENT_STAGES: ContextVar[StageLog | None] = ContextVar("stages", default=None)
CURRENT_PART: ContextVar[int] = ContextVar("stage_part", default=0)


async def as_part(name: str, index: int, work: Awaitable[T]) -> T:
    """``work`` as part ``index`` of its call, for parts that run side by side (an enrolment's clips): it is one
    stage, ``name``, and its own stages and model requests nest only within it, never in another part's, which
    may lie around them in time. Run each part in a task of its own (``gather_or_cancel`` does), so that the part
    set here is that task's alone."""
    log = CURRENT_STAGES.get()
    if log is None:
        return await work
    CURRENT_PART.set(index + 1)
    start = time.perf_counter()
    try:
        return await work
    finally:
        log.add(name, start, time.perf_counter(), {"facegate.stage": name, "facegate.part": index})


class Stages:
    """One call's (or one clip's) stage durations in ms, ``ms``, which responses report as their timings; a stage
    timed in several pieces sums them. Each piece is also logged while the call is traced."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._log = CURRENT_STAGES.get()

    def add(self, name: str, start: float, end: float) -> None:
        """The stage ``name`` ran from ``start`` to ``end`` (``time.perf_counter`` seconds)."""
        self.ms[name] = self.ms.get(name, 0.0) + (end - start) * 1e3
        if self._log is not None:
            self._log.add(name, start, end)
