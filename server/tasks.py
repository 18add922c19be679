"""Awaiting several parts of one call, where the call fails if any part fails."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(*parts: Awaitable[T]) -> list[T]:
    """Every part's result, in order, like ``asyncio.gather``; but the first failure cancels the parts still
    running, and waits for them to unwind, before it is raised. ``asyncio.gather`` raised at once and left them
    running: an enrolment refused for its first clip went on decoding and embedding the other fifteen after the
    client had its answer, holding their pixels and the pool (0.9 s of CPU after the reply, measured with 12
    clips). Of several parts failed by then, the one listed first is raised, so the first bad clip is the one
    reported. A cancelled caller cancels every part, as gather does."""
    tasks = [asyncio.ensure_future(p) for p in parts]
    if not tasks:  # (asyncio.wait refuses an empty set; a call often has nothing left to do in a step)
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # On a failure, or when the caller is cancelled: no part outlives the call. (A part's thread-pool job
        # that has started runs to its end; what it would have started next never does.)
        running = [t for t in tasks if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running)
        # Every outcome retrieved here, also when the caller was cancelled (its cancellation then goes on): a
        # part that failed last, as the caller was cancelled, was otherwise logged as "never retrieved".
        failures = [err for t in tasks if not t.cancelled() and (err := t.exception()) is not None]
    if failures:
        raise failures[0]
    return [t.result() for t in tasks]
