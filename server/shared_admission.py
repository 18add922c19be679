"""Each caller's own limits held across the workers of one server (``--workers N``).

Worker processes each have their own event loop, so counting a caller's calls in flight and its token bucket in
each process would let a caller whose connections the kernel spreads over them have up to N times its
``max_in_flight`` and ``rate_per_s``. The supervisor makes one small table in a file of its own; every worker maps it
and reads and writes a caller's counts under an exclusive ``flock`` on that file, held only for the few
microseconds of one count (never across an await). The monotonic clock is the system's, the same in every process.

A table's slot belongs to a caller's name from the first call it makes (its key is a hash of the name; slots are
never freed, so a reload that drops a caller keeps its slot). The table holds ``SLOTS`` callers; past that, a
caller's limits are held per process, as with one worker, and the server logs it once. A worker that dies stops
the whole set (``server.workers``), so counts it left behind are never read again: the next start makes a new
table.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from server.admission import PerCaller, bucket_size, over_in_flight, over_rate, spend

SLOT = struct.Struct("<Qqdd")  # the caller's key, its calls in flight, its tokens, when they were counted
SLOTS = 4096  # 128 KiB
_KEY, _HELD, _TOKENS, _WHEN = range(4)
log = logging.getLogger("facegate.admission")


def create_table(path: Path) -> None:
    """An empty table (every key 0: free) at ``path``, readable and writable by its owner only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SLOT.size * SLOTS)
    finally:
        os.close(fd)


def caller_key(caller: str) -> int:
    """A caller's key: 64 bits of a hash of its name, never 0 (a free slot)."""
    return int.from_bytes(hashlib.blake2b(caller.encode(), digest_size=8).digest(), "little") | 1


class SharedCallerState:
    """``CallerAdmission`` over a table every worker maps (made by ``create_table``)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SLOT.size * SLOTS)
        self._clock = clock
        self._slots: dict[str, int] = {}  # caller -> its slot's offset (slots never move or change hands)
        self._local = PerCaller(clock)  # for callers past a full table
        self._full_logged = False

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self, offset: int) -> tuple[int, int, float, float]:
        return SLOT.unpack_from(self._map, offset)  # type: ignore[return-value]

    def _offset(self, caller: str) -> int | None:
        """The offset of ``caller``'s slot, claimed if it has none yet; None when the table is full."""
        offset = self._slots.get(caller)
        if offset is not None:
            return offset
        key = caller_key(caller)
        with self._locked():
            for probe in range(SLOTS):  # open addressing, linear probing
                offset = ((key + probe) % SLOTS) * SLOT.size
                found = self._read(offset)[_KEY]
                if found == 0:  # free: the caller's first call on any worker
                    SLOT.pack_into(self._map, offset, key, 0, math.nan, 0.0)
                elif found != key:
                    continue
                self._slots[caller] = offset
                return offset
        if not self._full_logged:
            self._full_logged = True
            log.warning("the workers' table of callers is full (%d): callers past it are limited per worker", SLOTS)
        return None

    def take(self, caller: str, rate_per_s: float, burst: int, cost: float = 1.0, only_check: bool = False,
             share: float | None = None) -> None:
        if rate_per_s <= 0 or cost <= 0:
            return
        offset = self._offset(caller)
        if offset is None:
            self._local.take(caller, rate_per_s, burst, cost, only_check, share)
            return
        size = bucket_size(rate_per_s, burst)
        with self._locked():
            key, held, tokens, then = self._read(offset)
            now = self._clock()  # read under the lock: the workers count in the order they hold it
            fresh = None if math.isnan(tokens) else tokens
            left, admitted = spend(fresh, now - then, rate_per_s * (1.0 if share is None else share), size, cost,
                                   only_check)
            SLOT.pack_into(self._map, offset, key, held, left, now)
        if not admitted:
            raise over_rate(caller, rate_per_s, size, left, cost, share)

    def hold(self, caller: str, limit: int) -> AbstractContextManager[None]:
        offset = self._offset(caller) if limit > 0 else None
        return self._local.hold(caller, limit) if offset is None else self._held(offset, caller, limit)

    @contextmanager
    def _held(self, offset: int, caller: str, limit: int) -> Iterator[None]:
        """One call counted in ``offset``'s slot while it lasts, or refused if the caller's are at ``limit``."""
        with self._locked():
            key, held, tokens, then = self._read(offset)
            if held < limit:
                SLOT.pack_into(self._map, offset, key, held + 1, tokens, then)
        if held >= limit:
            raise over_in_flight(caller, held)
        try:
            yield
        finally:
            with self._locked():
                key, held, tokens, then = self._read(offset)
                SLOT.pack_into(self._map, offset, key, max(0, held - 1), tokens, then)
