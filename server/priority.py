"""Serving before computing: the event loop (admission, shedding, network I/O) outranks the compute threads.

On a machine whose cores are all busy with inference, the OS shares them out fairly between some ten compute
threads and the one event-loop thread, so the loop gets a tenth of the machine. It then accepts calls more slowly
than they arrive, and under overload calls wait in gRPC's transport for seconds before the server can even refuse
them (measured: at 3x the capacity, refusals took ~1 s to come back; with compute threads at nice 19, 84 ms).
Raising the compute threads' nice value only decides who runs first when no core is free, provided they are
spread over the cores: Linux balances runqueues by weight, and left to it, nice-19 threads pile up on one core
while the loop's core idles (``server.placement`` places each on a CPU). Linux only (elsewhere a no-op); raising a
nice value needs no privilege.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable

# gRPC core's own I/O threads read and write the sockets: they stay with the loop.
_IO_THREAD_PREFIXES = ("event_engine", "grpc")
# grpc.aio's poller: a Python thread (so its OS name is just "python") that takes every completion from gRPC core
# and hands it to the event loop. Lowered, it delays every call's progress when the cores are busy.
_IO_PYTHON_THREADS = ("_poll_wrapper",)


def _supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_this_thread(nice: int) -> None:
    """Thread-pool initializer: this (compute) thread runs at ``nice``, as will every thread it starts."""
    if nice > 0 and _supported():
        _renice(threading.get_native_id(), nice)


def compute_thread(nice: int, place: Callable[[], None]) -> Callable[[], None]:
    """The initializer of a compute pool's threads (decoding, an engine's instances): lowered to ``nice``, then
    placed on its CPU (``place``, from ``server.placement.CpuPlacement.pool``)."""

    def init() -> None:
        lower_this_thread(nice)
        place()

    return init


def lower_compute_threads(nice: int, keep: set[int]) -> int:
    """Raise every thread of this process but ``keep`` (native ids) and gRPC's I/O threads to ``nice``; threads
    started later by a lowered thread inherit its value. Returns how many threads were lowered."""
    if nice <= 0 or not _supported():
        return 0
    keep = keep | io_threads()
    lowered = 0
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid in keep:
            continue
        try:
            with open(f"/proc/self/task/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if comm.startswith(_IO_THREAD_PREFIXES):
            continue
        lowered += _renice(tid, nice)
    return lowered


def io_threads() -> set[int]:
    """Native ids of the Python threads that do gRPC I/O (they keep the event loop's priority)."""
    return {t.native_id for t in threading.enumerate()
            if t.native_id is not None and any(name in t.name for name in _IO_PYTHON_THREADS)}


def _renice(tid: int, nice: int) -> int:
    with contextlib.suppress(OSError):  # ended meanwhile, or not ours to change
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            return 1
    return 0
