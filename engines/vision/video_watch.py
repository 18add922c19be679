"""The two time limits of a video worker, and which one stopped it.

A video's decode is bounded by the CPU it costs, which the video decides, and by the wall-clock time it takes,
which the server's load decides as well. Until 2026-12-07 there was only the wall-clock limit (10 s), and its
refusal said the video was at fault (INVALID_ARGUMENT). Under load that was wrong: in ``make bench-memory``, 16
clients sending 110.6 MP videos kept both cores busy, and 1-4 videos a run that decode in about 0.3 s of CPU "did
not decode within 10 s". A caller that is told its input is bad does not send it again.

Now the parent reads the worker's CPU time (all its threads) every 50 ms and stops it at ``cpu_s``: the video cost
too much, INVALID_ARGUMENT. Each 50 ms it also notes whether the worker stalled: none of its threads ran, waited for
a CPU or was runnable (the kernel's scheduler statistics and thread states), and nothing it sent lay unread in the
pipe. At the wall-clock limit, a worker that stalled for most of the time is answered for (a decoder stalls only on
input that breaks it, or when an exploit took it over): INVALID_ARGUMENT, as before. Otherwise the server kept it
from a CPU, or was too slow to read what it sent: RESOURCE_EXHAUSTED, and the caller may send it again. (A first
version asked whether the reader was waiting on the worker instead. Under the same flood with a 3 s limit it called
3 of 10 late videos stalled: the reader, short of the GIL between the pipe's 64 KiB reads, was "waiting" while the
worker slept on a full pipe.)

A worker that died of a SIGKILL the watch did not send, under its CPU limit, was killed by the kernel for want of
memory (it offers itself first, ``oom_score_adj``): RESOURCE_EXHAUSTED as well. Until 2026-12-07 it was "could not
be decoded", INVALID_ARGUMENT, as for a video that crashed its decoder.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.errors import FacegateError, FieldViolation, InvalidArgumentError, ResourceExhaustedError

WATCH_S = 0.05  # how often the worker's CPU time is read: its overrun of the CPU limit is at most about this
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc/self/stat").exists()  # elsewhere only the wall-clock limit holds, and a late decode is a stall


_ACTIVE_S = 0.001  # less run or run-queue time than this in a 50 ms tick: the worker's threads all slept


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    """Time it ran on a CPU, all its threads, ended ones included."""
    active_s: float
    """Time its live threads ran or waited runnable for a CPU (0 where the kernel keeps no scheduler statistics).
    A thread's wait is added only when it next runs, so a starved one shows as ``runnable`` meanwhile."""
    runnable: bool = False
    """A thread of it is running or waiting for a CPU (or in an uninterruptible wait, as on a page fault)."""
    exited: bool = False
    """It has ended (a zombie until its parent reaps it)."""


def _stat(path: Path) -> list[str]:
    """The fields of a /proc ``stat`` file after the name (in parentheses, it may hold spaces): the state first."""
    return path.read_text().rsplit(")", 1)[1].split()


def usage(pid: int) -> Usage | None:
    """What the process ``pid`` has run and waited; None where /proc cannot say (not Linux, or it is gone)."""
    proc = Path("/proc", str(pid))
    try:
        fields = _stat(proc / "stat")
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime and stime: the 14th and 15th fields
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return Usage(cpu, 0.0, exited=True)
    active, runnable = 0, False
    for task in proc.glob("task/*"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended meanwhile
            runnable = runnable or _stat(task / "stat")[0] in ("R", "D")
            ran, waited = (task / "schedstat").read_text().split()[:2]  # ns on a CPU, ns runnable waiting for one
            active += int(ran) + int(waited)
    return Usage(cpu, active / 1e9, runnable)


def unread_bytes(fd: int) -> int:
    """Bytes waiting in a pipe for its reader (0 where the platform cannot say)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except OSError:
        return 0


def stalled(before: Usage | None, after: Usage | None, unread: int) -> bool:
    """Whether a tick between two readings of a worker saw it stall: no thread ran or waited for a CPU, and
    nothing it sent lay unread (a worker asleep on a full pipe waits on its reader, not on its input)."""
    if before is None or after is None:
        return False
    return not after.runnable and after.active_s - before.active_s < _ACTIVE_S and unread == 0


class Stop(enum.Enum):
    CPU = "cpu"
    BUSY = "busy"
    STALLED = "stalled"
    MEMORY = "memory"
    """Not the watch's stop: the worker was killed (SIGKILL) under its CPU limit, as the kernel kills the process
    it picks when the server's memory control group reaches its limit (the worker offers itself first)."""


def late(seen: Usage | None, stalled_s: float, elapsed_s: float) -> Stop:
    """Why a worker was still decoding at the wall-clock limit."""
    if seen is None:  # nothing to tell load from a stall by: the video is answered for, as before
        return Stop.STALLED
    return Stop.STALLED if stalled_s >= elapsed_s / 2 else Stop.BUSY


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
    """Stops a worker past its CPU limit or its wall-clock limit, and remembers which. ``pipe`` is the file
    descriptor the parent reads the worker's output from."""

    def __init__(self, pid: int, kill: Callable[[], None], cpu_s: float, wall_s: float, pipe: int) -> None:
        self.pid, self._kill, self.cpu_s, self.wall_s, self._pipe = pid, kill, cpu_s, wall_s, pipe
        self.stopped: Stop | None = None
        self.seen: Usage | None = None  # the last reading of the worker before it ended
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="video-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        started = last_t = time.monotonic()
        last, stalled_s = usage(self.pid), 0.0
        while not self._done.wait(WATCH_S):
            seen, now = usage(self.pid), time.monotonic()
            if _PROC and (seen is None or seen.exited):
                return  # it has ended: what it sent, or its end of the pipe closing, answers the reader
            self.seen = seen
            if seen is not None and seen.cpu_s >= self.cpu_s:
                return self._stop(Stop.CPU)
            if stalled(last, seen, unread_bytes(self._pipe)):
                stalled_s += now - last_t
            last, last_t = seen, now
            if now - started >= self.wall_s:
                return self._stop(late(seen, stalled_s, now - started))

    def _stop(self, why: Stop) -> None:
        self.stopped = why
        self._kill()

    def error(self, where: str) -> FacegateError | None:
        """What the caller is told, if this watch stopped the worker or ``killed`` said why it died (counted in
        ``STOPS``: call it once, when the stop ended the read)."""
        if self.stopped is not None:
            STOPS.add(self.stopped)
        if self.stopped is Stop.CPU:
            return InvalidArgumentError(FieldViolation(where, f"took more than {self.cpu_s:g} s of CPU to decode"))
        if self.stopped is Stop.STALLED:
            return InvalidArgumentError(FieldViolation(where, f"did not decode within {self.wall_s:g} s"))
        if self.stopped is Stop.BUSY:  # (a second, not the default 100 ms: the decode waited the whole limit)
            return ResourceExhaustedError(f"{where}: the server was too busy to decode it within {self.wall_s:g} s",
                                          retry_after_s=1.0)
        if self.stopped is Stop.MEMORY:
            return ResourceExhaustedError(f"{where}: the server ran short of memory to decode it", retry_after_s=1.0)
        return None

    def killed(self, where: str) -> FacegateError:
        """What the caller is told when the worker died of a SIGKILL this watch did not send (counted in
        ``STOPS``). Under its CPU limit, that is the kernel's out-of-memory killer, and the video may decode once
        memory is free again: RESOURCE_EXHAUSTED, not the INVALID_ARGUMENT of a video that broke its decoder.
        (The kernel's own CPU limit, a second over the watch's, kills with SIGKILL too, in case the watch lagged.)"""
        self.stopped = Stop.CPU if self.seen is not None and self.seen.cpu_s >= self.cpu_s else Stop.MEMORY
        error = self.error(where)
        assert error is not None  # (every stop has its answer)
        return error
