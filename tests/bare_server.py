"""A bare ``grpc.aio`` server on a thread of the test process, for tests of one interceptor or handler piece on a
real gRPC call (facegate's own servers start through ``FacegateServer``; see conftest)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc


@contextmanager
def bare_server(service: str, methods: dict[str, grpc.RpcMethodHandler],
                interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> Iterator[str]:
    """Serves ``methods`` of ``service`` on 127.0.0.1 (an ephemeral port) while the block runs; yields the
    address. The server stops with no grace when the block ends."""
    ready = threading.Event()
    address: list[str] = []
    stopping: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        server = grpc.aio.server(interceptors=list(interceptors))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, methods)])
        address.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        stop = asyncio.Event()
        stopping.append((asyncio.get_running_loop(), stop))
        ready.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield address[0]
    finally:
        loop, stop = stopping[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
