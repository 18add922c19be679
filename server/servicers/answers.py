"""What the interceptors that see every call's final status share (metrics, traces): the one-response handlers of a
method (unary-unary, and stream-unary, as the auth interceptor serves the unary methods) with a coroutine around their
answer, and the status of a call that ended without one set."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Around = Callable[[Awaitable[Any], grpc.aio.ServicerContext], Awaitable[Any]]


def around_answer(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """``handler`` with its answer awaited inside ``around``; a handler with a streaming response as it is."""
    for inner, make in ((handler.unary_unary, grpc.unary_unary_rpc_method_handler),
                        (handler.stream_unary, grpc.stream_unary_rpc_method_handler)):
        if inner is not None:
            async def answered(request: Any, context: grpc.aio.ServicerContext, inner: Any = inner) -> Any:
                return await around(inner(request, context), context)

            return make(answered, handler.request_deserializer, handler.response_serializer)
    return handler


def final_code(err: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call that ended with ``err``: the one set on its context (an abort carries the mapped status),
    else, with none set, cancelled by gRPC when its deadline passed or its client went away (the client sees
    DEADLINE_EXCEEDED or CANCELLED), else an error nothing mapped."""
    code = context.code()
    if code:
        return code  # type: ignore[no-any-return]
    if isinstance(err, asyncio.CancelledError):
        left = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
