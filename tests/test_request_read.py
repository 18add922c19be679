"""The read of a unary call's one request (the auth interceptor's ``_read_one``) on a real grpc.aio server. Whatever
stops the call waiting for its request (the server's own deadline, or gRPC cancelling the handler at the caller's
deadline), the receive itself is never cancelled and finishes once the call ends. gRPC's asyncio layer frees a
receive's native buffers only in the coroutine that awaited it (grpc/grpc#43360): a receive cancelled in flight
left ~16 KB a late CheckLiveness behind for good (1.0 -> 2.4 GiB in 120 s of late calls, benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import pytest

from server.auth.interceptor import _READS, _read_one
from server.servicers.call_context import deadline_from
from server.servicers.error_interceptor import ErrorMappingInterceptor
from tests.bare_server import bare_server

SERVER_WAIT_S = 0.2  # the server's own deadline for the request, when the caller set none
READ_TASKS: list[asyncio.Task[Any]] = []  # the tasks the reads ran in


class _Watched:
    """The call's context, but its ``read`` records how the receive ended: finished (with a message or at the
    call's end) or cancelled while in flight."""

    def __init__(self, context: grpc.aio.ServicerContext, ends: list[str]) -> None:
        self._context = context
        self._ends = ends

    async def read(self) -> Any:
        READ_TASKS.append(cast(asyncio.Task[Any], asyncio.current_task()))
        end = "finished"  # also when gRPC raises as the receive ends (the call was aborted meanwhile)
        try:
            return await self._context.read()
        except asyncio.CancelledError:
            end = "cancelled"
            raise
        finally:
            self._ends.append(end)


@pytest.fixture
def reading_server() -> Iterator[tuple[str, list[str]]]:
    ends: list[str] = []
    READ_TASKS.clear()

    async def one(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e9:
            deadline = asyncio.get_running_loop().time() + SERVER_WAIT_S
        else:
            deadline = deadline_from(context)
        await _read_one(cast(grpc.aio.ServicerContext, _Watched(context, ends)), deadline)
        return b"read"

    with bare_server("t.Read", {"One": grpc.stream_unary_rpc_method_handler(one)},
                     [ErrorMappingInterceptor()]) as address:
        yield address, ends


def _silent(seconds: float) -> Iterator[bytes]:
    """A request stream that sends nothing for ``seconds``, then closes: the request never arrives in time."""
    time.sleep(seconds)
    yield from ()


def _ends_after(ends: list[str], count: int, within_s: float) -> list[str]:
    stop = time.monotonic() + within_s
    while len(ends) < count and time.monotonic() < stop:
        time.sleep(0.02)
    return list(ends)


def _reads_let_go_within(within_s: float) -> bool:
    stop = time.monotonic() + within_s
    while _READS and time.monotonic() < stop:
        time.sleep(0.02)
    return not _READS


def test_the_servers_own_deadline_leaves_the_receive_to_finish(reading_server: tuple[str, list[str]]) -> None:
    address, ends = reading_server
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary("/t.Read/One")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(_silent(3.0), timeout=None)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert time.monotonic() - started < 2.0  # refused at the server's deadline, not when the client closed
        # The status ended the call, and with it the receive (well before the client's stream closes at 3 s).
        assert _ends_after(ends, 1, 1.5) == ["finished"]
    assert _ends_after(ends, 1, 0.0) == ["finished"]
    # The receive raised as it ended (its call had been aborted); that failure was retrieved, so asyncio will not
    # log "Task exception was never retrieved" whenever the task goes.
    assert _reads_let_go_within(2.0)
    (task,) = READ_TASKS
    assert task.done()
    assert not task._log_traceback  # type: ignore[attr-defined]  # (read first: exception() clears it)
    assert isinstance(task.exception(), Exception)


def test_the_callers_deadline_leaves_the_receive_to_finish(reading_server: tuple[str, list[str]]) -> None:
    address, ends = reading_server
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary("/t.Read/One")
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                call(_silent(0.5), timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert _ends_after(ends, 5, 3.0) == ["finished"] * 5
    # Every receive that outlived its call is let go. Not at once: the read's done callback runs on the server's
    # loop an iteration after the read ended, so it can still be pending when its end is seen here.
    assert _reads_let_go_within(2.0)


def test_a_request_that_arrives_is_read(reading_server: tuple[str, list[str]]) -> None:
    address, ends = reading_server
    with grpc.insecure_channel(address) as channel:
        assert channel.stream_unary("/t.Read/One")(iter([b"x" * 65_000]), timeout=5) == b"read"
    assert ends == ["finished"]
