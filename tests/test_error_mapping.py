"""The error-mapping interceptor on a real grpc.aio server: a call whose deadline passed while the server was
still working ends without an error in the server's log, and a refused call lets go of what its handler held."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from engines.errors import DeadlineExceededError, FieldViolation, InvalidArgumentError, UnrecoverableError
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


class _Payload:
    """Stands for a request's bytes or a decoded clip in a handler's hands (weakly referable)."""


def test_a_refused_call_lets_go_of_what_its_handler_held() -> None:
    """gRPC keeps the exception a status is sent with, and its traceback leads back to the call: a cycle that held
    every refused request until the garbage collector ran (5.4 GB in a server refusing big videos). With the
    collector off, what the refusing handler held must be freed as the call ends."""
    held: list[weakref.ref[_Payload]] = []

    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async for _ in requests:
            break
        payload = _Payload()
        held.append(weakref.ref(payload))
        raise InvalidArgumentError(FieldViolation("clip", f"refused ({type(payload).__name__})"))

    gc.collect()
    gc.disable()
    try:
        with bare_server("t.Refuse", {"Call": grpc.stream_unary_rpc_method_handler(refuse)},
                         [ErrorMappingInterceptor()]) as address, grpc.insecure_channel(address) as channel:
            call = channel.stream_unary("/t.Refuse/Call")
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    call(iter([b""]), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            end = time.monotonic() + 2  # (the handler's task ends just after the status is sent)
            while any(r() is not None for r in held) and time.monotonic() < end:
                time.sleep(0.02)
            assert len(held) == 3
            assert [r() for r in held] == [None, None, None]
    finally:
        gc.enable()
