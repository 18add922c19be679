"""gather_or_cancel: the parts of one call, where the first failure stops the rest before it is raised."""

from __future__ import annotations

import asyncio

import pytest

from server.tasks import gather_or_cancel


def test_results_come_in_the_order_of_the_parts() -> None:
    async def part(x: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return x

    async def nothing() -> list[int]:
        return await gather_or_cancel()

    assert asyncio.run(gather_or_cancel(part(1, 0.03), part(2, 0.0), part(3, 0.01))) == [1, 2, 3]
    assert asyncio.run(nothing()) == []  # a step with nothing to do


def test_the_first_failure_stops_the_others_before_it_is_raised() -> None:
    """The slow part is cancelled and has unwound (its ``finally`` ran) by the time the caller sees the error;
    with asyncio.gather it was still sleeping, and would have finished its work later."""
    log: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
            log.append("slow finished")
        finally:
            log.append("slow unwound")

    async def bad() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("bad clip")

    async def call() -> None:
        with pytest.raises(ValueError, match="bad clip"):
            await gather_or_cancel(slow(), bad())
        log.append("caller saw the error")
        await asyncio.sleep(0.05)  # time for a part left running to go on

    asyncio.run(call())
    assert log == ["slow unwound", "caller saw the error"]


def test_of_several_failures_the_part_listed_first_is_raised() -> None:
    async def call() -> None:
        second_failed = asyncio.Event()

        async def first() -> None:
            await second_failed.wait()
            raise ValueError("first")

        async def second() -> None:
            await asyncio.sleep(0.01)
            second_failed.set()  # the first part fails in the next turn of the loop, before the caller resumes
            raise ValueError("second")

        with pytest.raises(ValueError, match="first"):  # though "second" failed first
            await gather_or_cancel(first(), second(), asyncio.sleep(5))

    asyncio.run(call())


def test_a_cancelled_caller_cancels_every_part() -> None:
    unwound: list[int] = []

    async def part(i: int) -> None:
        try:
            await asyncio.sleep(5)
        finally:
            unwound.append(i)

    async def call() -> None:
        task = asyncio.ensure_future(gather_or_cancel(part(0), part(1)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(call())
    assert sorted(unwound) == [0, 1]
