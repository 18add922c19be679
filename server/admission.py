"""Admission: what requests in flight may hold, and how long a new one would wait.

``Budget`` bounds resources (request bytes, decoded pixels). ``WaitGate`` bounds time: it refuses a call that
would wait longer than the server is willing to queue. Neither ever waits: a request that does not fit is refused
at once with RESOURCE_EXHAUSTED (and RetryInfo), before it decodes anything, so overload is shed instead of queued
into memory and past every deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

from engines.errors import RateLimitedError, ResourceExhaustedError


class Budget:
    """A non-blocking counting budget, used from the event loop only (so no lock is needed)."""

    def __init__(self, name: str, capacity: int, unit: str) -> None:
        if capacity <= 0:
            raise ValueError(f"{name} budget must be > 0, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.unit = unit
        self.in_use = 0
        self.refused = 0

    # Plain (synchronous) context managers: nothing here awaits, and an async generator per call was a measurable
    # share of the event loop's time per request (~0.1 ms of ~0.9 ms on a batch-1 ModelInfer).
    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        if amount > self.capacity:
            self.refused += 1
            raise ResourceExhaustedError(f"request needs {amount} {self.unit}, over the server's {self.name} "
                                         f"budget of {self.capacity}")
        if self.in_use + amount > self.capacity:
            self.refused += 1
            raise ResourceExhaustedError(f"server busy: {self.name} budget in use ({self.in_use}/{self.capacity} "
                                         f"{self.unit}); retry shortly")
        self.in_use += amount
        try:
            yield
        finally:
            self.in_use -= amount


class CallerAdmission(Protocol):
    """Each caller's own ``max_in_flight`` (``hold``) and ``rate_per_s`` (``take``): ``PerCaller`` in one process,
    ``server.shared_admission.SharedCallerState`` across the workers of one server."""

    def hold(self, caller: str, limit: int) -> AbstractContextManager[None]: ...

    def take(self, caller: str, rate_per_s: float, burst: int, cost: float = 1.0, only_check: bool = False,
             share: float | None = None) -> None: ...


def over_in_flight(caller: str, held: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(f"caller {caller!r} has {held} calls in flight, its max_in_flight; retry when one "
                                  "of them has ended")


def bucket_size(rate_per_s: float, burst: int) -> int:
    """A caller's bucket: ``burst`` calls, or one second's worth (at least one) when burst is 0."""
    return burst or max(1, math.ceil(rate_per_s))


def spend(tokens: float | None, elapsed_s: float, rate_per_s: float, size: int, cost: float,
          only_check: bool = False) -> tuple[float, bool]:
    """A bucket of ``size`` that held ``tokens`` ``elapsed_s`` ago (None: a fresh one, full), refilled at
    ``rate_per_s`` (never above its size; a clock read out of order by another process counts as no time), and a
    call of ``cost`` taken from it: the tokens left, and whether the call was admitted (if not, nothing is taken;
    with ``only_check``, nothing is taken either way)."""
    have = float(size) if tokens is None else min(float(size), tokens + max(0.0, elapsed_s) * rate_per_s)
    return (have - (0.0 if only_check else cost), True) if have >= cost else (have, False)


def over_rate(caller: str, rate_per_s: float, size: int, tokens: float, cost: float = 1.0,
              share: float | None = None) -> RateLimitedError:
    """The refusal of a call of ``cost`` with ``tokens`` (< cost) left: RetryInfo says when enough are back.
    ``share``: the part of the rate this replica holds (server.auth.deployment_rates; None: all of it, alone)."""
    refill = rate_per_s * (1.0 if share is None else share)
    wait = (cost - tokens) / refill
    costs = f"; this call costs {cost:g}" if cost != 1.0 else ""
    rate = (f"rate_per_s = {rate_per_s:g}" if share is None else f"share on this replica ({refill:.3g} a second "
            f"now) of its rate_per_s = {rate_per_s:g} for the deployment")
    return RateLimitedError(f"caller {caller!r} is over its {rate} (burst {size}{costs}); retry in {wait:.2f} s",
                            retry_after_s=wait)


class CallerLimit:
    """Calls in flight per caller, each held to the caller's own ``max_in_flight`` (0: no limit of its own), so
    one caller's burst takes at most its share and the others are still admitted. The limit is read at each call, so
    a credentials reload changes it for the next call; the calls a caller already has in flight stay counted. Used
    from the event loop only."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    @contextmanager
    def hold(self, caller: str, limit: int) -> Iterator[None]:
        if limit <= 0:
            yield
            return
        held = self._held.get(caller, 0)
        if held >= limit:
            raise over_in_flight(caller, held)
        self._held[caller] = held + 1
        try:
            yield
        finally:
            left = self._held[caller] - 1
            if left:
                self._held[caller] = left
            else:
                del self._held[caller]


class CallerRate:
    """Calls started per caller, each held to the caller's own ``rate_per_s`` on average with bursts of up to
    ``burst`` (a token bucket: ``burst`` tokens, refilled at ``rate_per_s``; a call takes one). A call over it is
    refused at once, for that caller alone, with the time until a token is back as RetryInfo. The rate is read at
    each call, so a credentials reload changes it for the next one. Used from the event loop only.

    Not the ``limits`` package: its in-memory storage keeps a timer thread waking every 10 ms and counts on the wall
    clock, where one bucket per configured caller is two floats and the monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float | None, float]] = {}  # caller -> (tokens, when counted)

    def take(self, caller: str, rate_per_s: float, burst: int, cost: float = 1.0, only_check: bool = False,
             share: float | None = None) -> None:
        """One call of ``cost`` tokens (server.auth.costs; 1 unless set) taken, or refused. ``only_check``: refused
        as it would be, but nothing taken (a call whose whole cost is known only from its request, checked for one
        unit's cost before that request is received). ``share``: the bucket (of the same size) refills at that part
        of the rate (server.auth.deployment_rates)."""
        if rate_per_s <= 0 or cost <= 0:
            return
        size = bucket_size(rate_per_s, burst)
        now = self._clock()
        tokens, then = self._buckets.get(caller, (None, now))
        left, admitted = spend(tokens, now - then, rate_per_s * (1.0 if share is None else share), size, cost,
                               only_check)
        self._buckets[caller] = (left, now)
        if not admitted:
            raise over_rate(caller, rate_per_s, size, left, cost, share)


class PerCaller:
    """``CallerLimit`` and ``CallerRate`` together: every caller's own limits, in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = CallerLimit()
        self.rate = CallerRate(clock)

    def hold(self, caller: str, limit: int) -> AbstractContextManager[None]:
        return self.limit.hold(caller, limit)

    def take(self, caller: str, rate_per_s: float, burst: int, cost: float = 1.0, only_check: bool = False,
             share: float | None = None) -> None:
        self.rate.take(caller, rate_per_s, burst, cost, only_check, share)


# Busy time over which one completion-rate sample is taken: long enough to span several batches, short enough
# that the estimate follows a change of load (or of the machine's speed) within a second or two.
_RATE_WINDOW_S = 0.5


class WaitGate:
    """Refuses a call whose expected time in the pipeline is over ``max_wait_s`` or past its deadline.

    Little's law: with ``n`` calls in flight and calls completing at ``r`` per second while the pipeline is busy,
    a new call takes about ``(n + 1) / r``. The rate is measured, not configured, so the same setting holds on a
    2-core CPU and on a GPU, and it follows the machine when other work slows it. Below ``min_in_flight`` every
    call is admitted (a burst on an idle server is never refused before a rate has been measured). Used from the
    event loop only.
    """

    def __init__(self, name: str, max_wait_s: float, min_in_flight: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_wait_s <= 0 or min_in_flight < 1:
            raise ValueError(f"{name}: max_wait_s must be > 0 and min_in_flight >= 1, got {max_wait_s}, "
                             f"{min_in_flight}")
        self.name = name
        self.max_wait_s = max_wait_s
        self.min_in_flight = min_in_flight
        self.in_flight = 0
        self.refused = 0
        self.rate: float | None = None  # completions per busy second
        self._clock = clock
        self._last = clock()
        self._window_done = 0
        self._window_busy = 0.0

    def _advance(self, now: float) -> None:
        if self.in_flight > 0:
            self._window_busy += now - self._last
        self._last = now
        if self._window_busy >= _RATE_WINDOW_S:
            sample = self._window_done / self._window_busy
            self.rate = sample if self.rate is None else 0.5 * self.rate + 0.5 * sample
            self._window_done, self._window_busy = 0, 0.0

    def expected_wait_s(self) -> float | None:
        """How long a call admitted now would take, or None while no rate has been measured."""
        return (self.in_flight + 1) / self.rate if self.rate else None

    def check(self, deadline: float | None = None) -> None:
        """Raise ResourceExhaustedError if a call arriving now would wait too long; admits nothing. Cheap enough
        to run before a request is even parsed (the interceptor does), so shedding costs as little as it can."""
        now = self._clock()
        self._advance(now)
        wait = self.expected_wait_s()
        if self.in_flight < self.min_in_flight or wait is None:
            return
        limit = self.max_wait_s if deadline is None else min(self.max_wait_s, deadline - now)
        if wait > limit:
            self.refused += 1
            raise ResourceExhaustedError(
                f"server busy: {self.name} would take ~{wait * 1e3:.0f} ms ({self.in_flight} calls in flight), "
                f"over the {max(limit, 0.0) * 1e3:.0f} ms it may wait; retry shortly",
                retry_after_s=wait - self.max_wait_s if wait > self.max_wait_s else 0.1)

    @contextmanager
    def enter(self, deadline: float | None = None, check: bool = True) -> Iterator[None]:
        """Admit one call or raise ResourceExhaustedError; ``deadline`` is on this gate's clock. ``check=False``
        counts a call already checked (before work it would otherwise waste) without refusing it now."""
        if check:
            self.check(deadline)
        self.in_flight += 1
        try:
            yield
        finally:
            self._window_done += 1  # counted before the window may close, so a closing window includes it
            self._advance(self._clock())
            self.in_flight -= 1


def admitted(gate: WaitGate | None, deadline: float | None, check: bool = True) -> AbstractContextManager[None]:
    """``gate.enter(deadline, check)``, or nothing to pass where a pipeline runs without a gate (tests, tools)."""
    return gate.enter(deadline, check) if gate is not None else nullcontext()
