"""Streaming handlers behind an interceptor: gRPC's asyncio server runs a streaming method in one of two ways, as an
async generator (reflection) or as a coroutine that writes with ``context.write`` (health watches). An interceptor's
own wrapper cannot be both, so it is always a coroutine and hands the inner handler's responses on with ``relay``."""

from __future__ import annotations

import inspect
from typing import Any

import grpc


async def relay(responses: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs what an inner streaming handler returned: a coroutine is awaited (it writes its own responses); an
    async or plain iterator's responses are written to the call in order."""
    if inspect.isawaitable(responses):
        await responses
    elif inspect.isasyncgen(responses) or hasattr(responses, "__aiter__"):
        async for item in responses:
            await context.write(item)
    else:
        for item in responses:
            await context.write(item)
