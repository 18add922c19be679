"""The three memory budgets (decoded pixels, request bytes, ModelInfer input bytes) lowered at start, once the
models are warm, to fit the memory limit the server runs under, and fitted again whenever that limit changes.

The defaults were sized for the Deployment's 4 GiB: the worst load ``make bench-memory`` makes (clients each
sending the largest requests the limits let through, retrying at once) took one worker to a working set of 2,643
MiB. Under a smaller limit the same budgets let that load reach it, and the kernel killed the server with every call
in it (2,304 MiB: 5 runs of 5, benchmarks/README.md, *Under a smaller limit than the budgets were sized for*); a
memory-share gate at admission came too late (a phase crossed from 90 % to the limit within one 50 ms reading).
What held was budgets sized to the limit. So the server sizes them itself, by a line drawn from runs of that
benchmark on one worker (Zen 5 EPYC, 2026-12-07): its slope from the two held to 4 GiB at the default budgets and
at half, its height from the run that grew most beyond it:

    peak working set = workers x held when warm + GROWTH_BYTES + BUDGET_COST x what the budgets admit (bytes)

``held when warm`` is a worker's resident memory once its models are loaded and warmed (932-949 MiB in those
runs); GROWTH_BYTES what the set grew beyond that and its budgets under the load (runtimes' arenas, the allocator's
free heap, decoders, page cache); BUDGET_COST the bytes the group gained per byte the budgets admit (a decoded
pixel is 3 bytes). Each run's peak is under the line, by 9 to 85 MiB for one worker given 0.5 to 1.0 of the
budgets, by 226-278 MiB under a tight limit, where the kernel reclaims file pages (2,304 MiB, 0.37 of the
budgets: 1,870 MiB), and by 133 MiB for two workers at 4 GiB, each with half the budgets (3,528 MiB; the load is
split between them, not doubled).

The budgets are scaled by one factor to keep HEADROOM of the limit free, never raised above their settings, and
never below one largest request (the settings' own floors), so every request the limits accept can still be
served; where a floor holds a budget above its fitted size, the start-up log warns with the estimate.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from server.admission import Budget
from server.config import ServerConfig
from server.memory_limit import MemoryGroup

log = logging.getLogger(__name__)

MIB = 2**20
GROWTH_BYTES = 740 * MIB
"""The most a run grew beyond what its worker held when warm and BUDGET_COST x its budgets: 2,375 MiB at 2,560 MiB
with 0.69 of the budgets (712 MiB admitted), less 932 MiB held; rounded up. (The default-budget run: 659 MiB.)"""
BUDGET_COST = 1.0
"""Halving the budgets (1,035 -> 518 MiB admitted) took the peak from 2,643 to 2,121 MiB: 522 MiB for 518."""
HEADROOM = 0.10
"""Of the limit, kept free: the page cache, a scrape, and what the runs could not show."""
BYTES_PER_PIXEL = 3


@dataclass(frozen=True)
class Budgets:
    """One worker's three memory budgets."""

    pixels: int
    request_bytes: int
    infer_bytes: int

    def admitted_bytes(self) -> int:
        return self.pixels * BYTES_PER_PIXEL + self.request_bytes + self.infer_bytes


@dataclass(frozen=True)
class Fit:
    budgets: Budgets
    scale: float  # of the settings; 1.0 where they fit as set
    at_floor: bool  # a budget is held at one largest request, above its fitted size: the estimate is over the aim
    peak_bytes: int  # the estimate of the worst load's working set with these budgets


def fit(settings: Budgets, floors: Budgets, limit: int | None, held: int, workers: int = 1) -> Fit:
    """``settings`` (one worker's share) scaled to fit ``limit`` for ``workers`` such workers each holding
    ``held`` bytes when warm; unchanged where there is no limit or they fit."""
    n = max(1, workers)

    def peak(budgets: Budgets) -> int:
        return n * held + GROWTH_BYTES + round(BUDGET_COST * n * budgets.admitted_bytes())

    if limit is None:
        return Fit(settings, 1.0, False, peak(settings))
    room = (limit * (1 - HEADROOM) - n * held - GROWTH_BYTES) / n  # (for one worker's share)
    scale = min(1.0, max(0.0, room / (BUDGET_COST * settings.admitted_bytes())))
    pairs = list(zip(astuple(settings), astuple(floors), strict=True))
    scaled = Budgets(*(max(floor, int(value * scale)) for value, floor in pairs))
    # A floor above a budget's fitted size (also one a worker's share was already held at) keeps the estimate over
    # the aim: the log warns.
    at_floor = any(int(value * scale) < floor for value, floor in pairs)
    return Fit(scaled, scale, at_floor, peak(scaled))


SETTING_NAMES = ("max_inflight_pixels", "max_inflight_request_bytes", "max_inflight_infer_bytes")
"""The settings of the three budgets, in the order of Budgets' fields."""


def budget_settings(config: ServerConfig) -> Budgets:
    """The three budgets as ``config`` sets them."""
    return Budgets(*(getattr(config, name) for name in SETTING_NAMES))


def budget_floors(config: ServerConfig) -> Budgets:
    """The least each budget may be: what one largest request the limits accept needs."""
    return Budgets(config.clip_limits.max_request_pixels, config.max_message_bytes, config.max_message_bytes)


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc cannot say)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def describe(result: Fit, limit: int | None, held: int, workers: int, off: bool = False) -> str:
    """The start-up log's line on the budgets: what they are, and why."""
    sizes = (f"decoded pixels {result.budgets.pixels:,}, request bytes {result.budgets.request_bytes:,}, "
             f"ModelInfer input bytes {result.budgets.infer_bytes:,}")
    if limit is None:
        return f"memory budgets as set ({sizes}): {'fit_memory_budgets is off' if off else 'no memory limit to fit'}"
    workers_text = f" x {workers} workers" if workers > 1 else ""
    estimate = (f"the worst load measured would reach about {result.peak_bytes / MIB:,.0f} MiB "
                f"({result.peak_bytes / limit:.0%}) of the {limit / MIB:,.0f} MiB limit (held when warm: "
                f"{held / MIB:,.0f} MiB{workers_text})")
    if result.scale >= 1.0:
        return f"memory budgets as set ({sizes}): {estimate}"
    lowered = f"memory budgets lowered to {result.scale:.2f} of their settings ({sizes}) to fit the limit: {estimate}"
    if result.at_floor:
        return (f"{lowered}, over the {1 - HEADROOM:.0%} aimed for: a budget is held at one largest request. Give "
                f"the server more memory, or lower identification.max_request_pixels and max_message_bytes")
    return lowered


class BudgetFit:
    """The server's three memory budgets, fitted to its group's limit once the models are warm, and fitted again
    whenever that limit changes while it serves (a Kubernetes in-place resize rewrites the group's limit under a
    running container: budgets fitted to the old limit would let the worst load past a lowered one, or leave a
    raised one unused). A refit starts from the settings and the resident memory measured when warm (what the
    process holds later includes the growth the estimate adds), so a limit put back gives back the same budgets.
    Lowering a budget below what calls in flight hold refuses new calls until they finish; none is cut short. A
    limit that can no longer be read keeps the budgets fitted to the last one read."""

    def __init__(self, budgets: Sequence[Budget], floors: Budgets, group: MemoryGroup | None, enabled: bool,
                 workers: int) -> None:
        self._budgets = budgets  # (in the order of Budgets' fields)
        self.settings = Budgets(*(b.capacity for b in budgets))
        self._floors, self._group, self._enabled, self._workers = floors, group, enabled, max(1, workers)
        self.held = 0
        self.limit: int | None = None
        self.refits = 0  # limit changes followed
        self._unread = False  # the limit was known, and the last reading found none

    def _read_limit(self) -> int | None:
        return self._group.limit() if self._group is not None and self._enabled else None

    def _fit(self, limit: int | None, change: str = "") -> None:
        """The budgets fitted to ``limit`` from the settings, and logged (after ``change``, what prompted it)."""
        fitted = fit(self.settings, self._floors, limit, self.held, self._workers)
        for budget, size in zip(self._budgets, astuple(fitted.budgets), strict=True):
            budget.capacity = size
        self.limit = limit
        line = describe(fitted, limit, self.held, self._workers, off=not self._enabled)
        (log.warning if fitted.at_floor else log.info)("%s%s", f"{change}; " if change else "", line)

    def start(self, held: int | None = None) -> None:
        """Once warm: what this process holds (``held``, where given), and the budgets fitted to the limit."""
        self.held = resident_bytes() if held is None else held
        self._fit(self._read_limit())

    def resettle(self, settings: Budgets) -> bool:
        """New settings (a reload's), fitted to the limit; False where they are the same."""
        if settings == self.settings:
            return False
        self.settings = settings
        self._fit(self._read_limit())
        return True

    def follow(self) -> bool:
        """Fits the budgets again if the limit is not the one they were fitted to; True if it changed."""
        limit = self._read_limit()
        if limit is None and self.limit is not None:
            # Not read, or taken away: the budgets stay fitted to the last limit read (the safe side of the two).
            # Raising them on a file that could not be read would be the mistake that costs the server.
            if not self._unread:
                log.warning("memory limit not read (was %s MiB): the memory budgets stay fitted to it",
                            f"{self.limit / MIB:,.0f}")
            self._unread = True
            return False
        self._unread = False
        if limit is None or limit == self.limit:
            return False
        was = f"{self.limit / MIB:,.0f} MiB" if self.limit is not None else "none"
        self._fit(limit, f"memory limit now {limit / MIB:,.0f} MiB (was {was})")
        self.refits += 1
        return True

    async def watch(self, every_s: float) -> None:
        """Reads the limit every ``every_s`` seconds (one small file) until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            self.follow()
