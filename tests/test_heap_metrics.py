"""The C heap gauges (glibc's mallinfo2) follow what the process allocates and frees natively."""

from __future__ import annotations

import ctypes
import ctypes.util

from prometheus_client import CollectorRegistry, generate_latest

from server.heap_metrics import HeapCollector

MIB = 2**20


def test_in_use_follows_a_native_allocation_and_its_free() -> None:
    heap = HeapCollector()
    assert heap.active  # CI runs on glibc
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before, _ = heap.heap()
    blocks = [libc.malloc(256 * 1024) for _ in range(256)]  # 64 MiB, in chunks glibc may place either way
    try:
        assert all(blocks)
        held, _ = heap.heap()
        assert held - before >= 64 * MIB
    finally:
        for block in blocks:
            libc.free(block)
    after, _ = heap.heap()
    assert held - after >= 63 * MIB


def test_the_gauges_are_exposed() -> None:
    registry = CollectorRegistry()
    registry.register(HeapCollector())
    text = generate_latest(registry).decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["facegate_heap_in_use_bytes"] > 0
    assert values["facegate_heap_free_bytes"] >= 0
