"""One place that turns domain errors into gRPC statuses, with google.rpc error details.

Installed as a server interceptor, so servicers just raise. Unexpected exceptions become INTERNAL with a
generic message and the request id; the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engines.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FacegateError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnrecoverableError,
)
from server.servicers.call_context import CURRENT_REQUEST_ID, metadata_request_id
from server.servicers.streams import relay

log = logging.getLogger(__name__)

_CODES: list[tuple[type[FacegateError], int]] = [
    (InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
    (NotFoundError, code_pb2.NOT_FOUND),
    (AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (PermissionDeniedError, code_pb2.PERMISSION_DENIED),
    (FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (UnavailableError, code_pb2.UNAVAILABLE),
    (UnrecoverableError, code_pb2.UNAVAILABLE),
    (InternalError, code_pb2.INTERNAL),
]


def status_for(err: FacegateError, request_id: str | None = None) -> grpc.Status:
    code = next((c for cls, c in _CODES if isinstance(err, cls)), code_pb2.INTERNAL)
    details: list[any_pb2.Any] = []
    if isinstance(err, InvalidArgumentError):
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ])
        details.append(_pack(bad))
    if isinstance(err, ResourceExhaustedError | UnavailableError):
        retry = error_details_pb2.RetryInfo()
        after = err.retry_after_s if isinstance(err, ResourceExhaustedError) else None
        # The server's own estimate of when there will be room, bounded; a rate's time as it is (known, not
        # estimated: a client told to come back sooner would only be refused again); else a short back-off.
        bound = 3600.0 if isinstance(err, RateLimitedError) else 5.0
        retry.retry_delay.FromMilliseconds(int(min(max(after, 0.05), bound) * 1e3) if after is not None else 100)
        details.append(_pack(retry))
    if request_id:
        details.append(_pack(error_details_pb2.RequestInfo(request_id=request_id)))
    message = str(err) if not isinstance(err, InternalError) else f"internal error: {err}"
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def parse_request(parse: Callable[[bytes], Any] | None, raw: bytes) -> Any:
    """The request message from its bytes. Bytes that are not the method's message are the caller's error, so they get
    INVALID_ARGUMENT, as every other bad field does, not UNKNOWN or INTERNAL with a traceback in the log."""
    if parse is None:
        return raw
    try:
        return parse(raw)
    except DecodeError as err:
        raise InvalidArgumentError(FieldViolation("request", f"is not a valid request message ({err})")) from None


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    return CURRENT_REQUEST_ID.get() or metadata_request_id(context)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Every method, unary or streaming, gets its request parsed and its errors mapped here."""

    def __init__(self, on_unrecoverable: Callable[[], None] | None = None) -> None:
        self._on_unrecoverable = on_unrecoverable

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # Requests are parsed here, inside the mapping, not by gRPC before it: every method's undecodable bytes
        # (health checks and watches, reflection streams too) get INVALID_ARGUMENT. The auth interceptor's unary
        # methods arrive as stream-unary, unparsed (no deserializer): it parses them itself, with parse_request,
        # once the call is admitted.
        # Streamed requests are parsed as the handler iterates them (every streaming method here reads its request
        # iterator; one that called context.read() would get raw bytes).
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(parse_request(parse, raw), context)
                except Exception as err:
                    await self._abort(err, context, method)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(raw: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await relay(inner_us(parse_request(parse, raw), context), context)
                except Exception as err:
                    await self._abort(err, context, method)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(raws: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                try:
                    await relay(inner_ss(_parsed(parse, raws), context), context)
                except Exception as err:
                    await self._abort(err, context, method)

            return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(raws: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:  # (the auth interceptor's unary methods: it reads and parses the one request itself)
                    return await inner_su(raws if parse is None else _parsed(parse, raws), context)
                except Exception as err:
                    await self._abort(err, context, method)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
        return handler

    async def _abort(self, err: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
        """Ends the call with the status for ``err``: a domain error's own, else INTERNAL (traceback to the log)."""
        if isinstance(err, grpc.aio.AbortError):  # already aborted (with its status) further in
            release_frames(err)
            raise err
        rid = _request_id(context)
        if isinstance(err, FacegateError):
            if isinstance(err, UnrecoverableError) and self._on_unrecoverable is not None:
                self._on_unrecoverable()
            status = status_for(err, rid)
        else:
            log.error("unhandled error in %s (request id %s)", method, rid, exc_info=err)
            status = status_for(InternalError("unexpected failure"), rid)
        release_frames(err)
        left = context.time_remaining()
        if left is not None and left <= 0:
            # The client's deadline has passed, so it has its DEADLINE_EXCEEDED already and gRPC is ending the call.
            # A status sent now races that ending: when it lost, gRPC logged an ERROR with two tracebacks for an
            # ordinary late call (12 of ~500 calls with a 2 ms deadline under `make bench-soak`). Ended as
            # cancelled instead, which gRPC logs at DEBUG and the metrics count as DEADLINE_EXCEEDED (final_code).
            raise asyncio.CancelledError(f"{method}: the deadline passed before the status could be sent")
        await context.abort_with_status(status)


def release_frames(err: BaseException) -> None:
    """Drop the tracebacks of ``err`` and of the exceptions it chains, once they are logged.

    gRPC's asyncio server keeps the exception a status is sent with in the call's state, and its traceback leads
    back to that state: a reference cycle, freed only when the cyclic garbage collector gets to it. Through the
    frames of the chained tracebacks the cycle held everything the call's code had in hand (the request's bytes,
    the parsed message, the probed clip), so refused calls kept their requests for as long as the collector
    left them: a server refusing big videos reached 5.4 GB (2026-12-07, benchmarks/README.md, *Memory at the
    limits*). The frames are let go, not cleared: clearing a frame of a coroutine still running elsewhere (one
    that raised an exception shared with several calls, as a failed batch's is) would close it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


async def _parsed(parse: Callable[[bytes], Any] | None, raws: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream's messages, each parsed as it is read (parse_request's INVALID_ARGUMENT for bad bytes)."""
    async for raw in raws:
        yield parse_request(parse, raw)
