"""The error-mapping interceptor on a real grpc.aio server: a call whose deadline passed while the server was
still working ends without an error in the server's log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from engines.errors import DeadlineExceededError, UnrecoverableError
from server.servicers.error_interceptor import ErrorMappingInterceptor
from tests.bare_server import bare_server


@pytest.fixture
def late_server() -> Iterator[str]:
    """A server whose one method holds its event loop past the call's deadline, then refuses it as late (as a
    pipeline's own deadline check does), before gRPC's cancellation of the call has reached Python."""

    async def late(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async for _ in requests:  # read as the auth interceptor reads a unary method's one request
            break
        left = context.time_remaining() or 0.0
        time.sleep(left + 0.05)  # noqa: ASYNC251 - blocking on purpose: the loop cannot see the cancellation
        raise DeadlineExceededError("deadline passed before the request was queued")

    with bare_server("t.Late", {"Call": grpc.stream_unary_rpc_method_handler(late)},
                     [ErrorMappingInterceptor()]) as address:
        yield address


def test_a_late_refusal_after_the_deadline_logs_no_error(late_server: str, caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(late_server) as channel:
        call = channel.stream_unary("/t.Late/Call")
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                call(iter([b""]), timeout=0.05)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    time.sleep(0.3)  # the server's handlers end after the client's deadline
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


class _LateContext:
    """The two things ``_abort`` reads of a call whose deadline has passed; records any status sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def time_remaining(self) -> float:
        return -0.01

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort_with_status(self, status: object) -> None:
        self.sent.append(status)


def test_no_status_is_sent_once_the_deadline_has_passed() -> None:
    """Sending one raced gRPC's own end of the call (an ERROR with tracebacks in the log when it lost): the call
    ends as cancelled instead, and an unrecoverable error still turns the server unhealthy first."""
    unhealthy: list[bool] = []
    interceptor = ErrorMappingInterceptor(on_unrecoverable=lambda: unhealthy.append(True))
    context = _LateContext()

    async def abort(err: Exception) -> None:
        await interceptor._abort(err, context, "/t.Late/Call")  # type: ignore[arg-type]

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort(DeadlineExceededError("deadline passed before the request was queued")))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort(UnrecoverableError("engine lost")))
    assert context.sent == [] and unhealthy == [True]
