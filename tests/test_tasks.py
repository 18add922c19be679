"""gather_or_cancel: the parts of one call, where the first failure stops the rest before it is raised."""

from __future__ import annotations

import asyncio
import gc

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


def test_a_part_that_failed_as_the_caller_was_cancelled_is_retrieved() -> None:
    """The last part still running fails, and the caller is cancelled before it resumes (a classifier refused at
    its deadline just as gRPC cancelled the call): the failure is retrieved, not logged at garbage collection as
    "exception was never retrieved" (seen in the server's log under `make bench-soak`). asyncio.wait reads a
    failure itself only while other parts are running."""
    reported: list[str] = []

    async def call() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: reported.append(ctx["message"]))
        done: asyncio.Future[None] = loop.create_future()
        failing: asyncio.Future[None] = loop.create_future()
        task = asyncio.ensure_future(gather_or_cancel(done, failing))
        await asyncio.sleep(0.01)
        done.set_result(None)
        await asyncio.sleep(0.01)
        failing.set_exception(ValueError("deadline passed before the request was queued"))
        task.cancel()  # in the same turn: the caller resumes cancelled, its last part failed
        with pytest.raises(asyncio.CancelledError):
            await task
        del done, failing, task
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(call())
    assert reported == []
