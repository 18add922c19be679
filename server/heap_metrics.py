"""The server process's C heap for the metrics endpoint, from glibc's ``mallinfo2``: the bytes in use and the freed
bytes the allocator keeps for reuse.

Resident memory alone cannot tell a leak from an allocator that keeps what was freed: both raise it. The soak
(benchmarks/README.md, *Soak*) needed the two counts apart to see that, once a leak was fixed, what the resident
memory still gained was free heap, not memory in use. Native memory is most of this server's (the engines, gRPC's
buffers, decoded frames), and Python's own allocator does not see it.

Read at scrape time, on the metrics server's thread (ctypes lets go of the GIL for the call). ``mallinfo2`` locks
each arena in turn and walks its free lists: 3-23 ms a read in a server under the soak's load on the 2-core
machine, 1 us in an idle process; once a scrape. Where the C library has no ``mallinfo2`` (musl, glibc before
2.33, not Linux), the collector yields nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (malloc.h), every field a size_t, in this order.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo2() -> Any | None:
    """glibc's ``mallinfo2`` as a callable returning the struct, or None where the C library has none."""
    try:
        # (the symbols already loaded into this process, libc's among them: no search for the library, which
        # ctypes.util.find_library does by running ldconfig)
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


class HeapCollector(Collector):
    def __init__(self) -> None:
        self._read = mallinfo2()

    @property
    def active(self) -> bool:
        return self._read is not None

    def heap(self) -> tuple[int, int]:
        """Bytes in use (in the arenas and in chunks mapped on their own) and bytes free in the arenas."""
        assert self._read is not None
        info = self._read()
        return int(info.uordblks + info.hblkhd), int(info.fordblks)

    def collect(self) -> Iterable[Any]:
        if self._read is None:
            return
        in_use, free = self.heap()
        yield GaugeMetricFamily("facegate_heap_in_use_bytes", "The server process's C heap in use (glibc "
                                "mallinfo2: allocated in its arenas and mapped on its own); a leak raises it",
                                value=in_use)
        yield GaugeMetricFamily("facegate_heap_free_bytes", "Freed C heap glibc keeps in the server process's "
                                "arenas for reuse: not in use, and resident until returned to the system", value=free)
