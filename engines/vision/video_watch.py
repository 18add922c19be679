"""The two time limits of a video worker, and which one stopped it.

A video's decode is bounded by the CPU it costs, which the video decides, and by the wall-clock time it takes,
which the server's load decides as well. Until 2026-12-07 there was only the wall-clock limit (10 s), and its
refusal said the video was at fault (INVALID_ARGUMENT). Under load that was wrong: in ``make bench-memory``, 16
clients sending 110.6 MP videos kept both cores busy, and 4 videos that decode in about 0.3 s of CPU "did not decode
within 10 s". A caller that is told its input is bad does not send it again.

Now the parent reads the worker's CPU time (all its threads) every 50 ms and stops it at ``cpu_s``: the video cost
too much, INVALID_ARGUMENT. At the wall-clock limit it looks at why the video was late:
- the worker ran, or waited runnable for a CPU (the kernel's run-queue delay), most of that time: the server was
  too busy, RESOURCE_EXHAUSTED, and the caller may send it again;
- the reader was not waiting on the worker most of that time (it was slow to read what the worker sent): busy too;
- otherwise the worker neither ran nor wanted to while the reader waited on it: it stalled, which a decoder does
  only on input that breaks it (or one an exploit took over), INVALID_ARGUMENT as before.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engines.errors import FacegateError, FieldViolation, InvalidArgumentError, ResourceExhaustedError

WATCH_S = 0.05  # how often the worker's CPU time is read: its overrun of the CPU limit is at most about this
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    """Time it ran on a CPU, all its threads."""
    waited_s: float
    """Time its threads waited runnable for a CPU (0 where the kernel keeps no scheduler statistics)."""


def usage(pid: int) -> Usage | None:
    """What the process ``pid`` has run and waited; None where /proc cannot say (not Linux, or it is gone)."""
    proc = Path("/proc", str(pid))
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime and stime: the 14th and 15th fields
    except (OSError, ValueError, IndexError):
        return None
    waited = 0
    for task in proc.glob("task/*"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended meanwhile
            waited += int((task / "schedstat").read_text().split()[1])  # run-queue delay, ns
    return Usage(cpu, waited / 1e9)


class Stop(enum.Enum):
    CPU = "cpu"
    BUSY = "busy"
    STALLED = "stalled"


class StopCounts:
    """How many decodes in this process each limit stopped (read by the server's metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # watches stop workers from their own threads
        self._counts = dict.fromkeys(Stop, 0)

    def add(self, why: Stop) -> None:
        with self._lock:
            self._counts[why] += 1

    def snapshot(self) -> dict[Stop, int]:
        with self._lock:
            return dict(self._counts)


STOPS = StopCounts()


class Watch:
    """Stops a worker past its CPU limit or its wall-clock limit, and remembers which. The reader waits for the
    worker's bytes (in poll, or in a read that has only part of a message) inside ``waiting()``."""

    def __init__(self, pid: int, kill: Callable[[], None], cpu_s: float, wall_s: float) -> None:
        self.pid, self._kill, self.cpu_s, self.wall_s = pid, kill, cpu_s, wall_s
        self._idle_s = 0.0
        self._since: float | None = None  # when the wait now in progress began
        self.stopped: Stop | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="video-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._idle_s += time.monotonic() - self._since
            self._since = None

    def idle_s(self) -> float:
        """Time the reader has waited for the worker, the wait in progress included."""
        since = self._since  # read once: the reader sets it from its own thread
        return self._idle_s + (time.monotonic() - since if since is not None else 0.0)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._done.wait(WATCH_S):
            seen = usage(self.pid)
            elapsed = time.monotonic() - started
            if seen is not None and seen.cpu_s >= self.cpu_s:
                return self._stop(Stop.CPU)
            if elapsed >= self.wall_s:
                return self._stop(self._why_late(seen, elapsed))

    def _why_late(self, seen: Usage | None, elapsed: float) -> Stop:
        if seen is None:  # nothing to tell load from a stall by: the video is answered for, as before
            return Stop.STALLED
        if seen.cpu_s + seen.waited_s >= elapsed / 2 or self.idle_s() < elapsed / 2:
            return Stop.BUSY
        return Stop.STALLED

    def _stop(self, why: Stop) -> None:
        self.stopped = why
        self._kill()
        STOPS.add(why)

    def error(self, where: str) -> FacegateError | None:
        """What the caller is told, if this watch stopped the worker."""
        if self.stopped is Stop.CPU:
            return InvalidArgumentError(FieldViolation(where, f"took more than {self.cpu_s:g} s of CPU to decode"))
        if self.stopped is Stop.STALLED:
            return InvalidArgumentError(FieldViolation(where, f"did not decode within {self.wall_s:g} s"))
        if self.stopped is Stop.BUSY:  # (a second, not the default 100 ms: the decode waited the whole limit)
            return ResourceExhaustedError(f"{where}: the server was too busy to decode it within {self.wall_s:g} s",
                                          retry_after_s=1.0)
        return None
