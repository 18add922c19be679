"""Decoded video frames handed from the worker process to the server through shared memory.

Until 2026-12-07 the worker sent each frame through a pipe: 921,600 bytes a 640x480 frame, read 64 KiB at a time,
each read taking the GIL again. A server whose event loop held the GIL (the load of ``make bench-memory``) read a
video slowly: with two threads spinning in Python beside the reader, 360 frames of 640x480 took over 30 s (0.6-0.8
s idle; a 1 MiB pipe: 9.4-12.9 s), while the worker, mostly asleep on a full pipe, decoded them in 0.25 s of CPU.

Now the server makes an anonymous memory file as large as the video's pixel budget allows (its pages are given only
as the worker writes them), the worker writes each frame into it, and the server reads the frames in place once the
worker says how many there are: 0.82-1.19 s with the two spinning threads, 0.46-0.51 s idle (Zen 5). A worker an
exploit took over can write only within that file (sealed: it cannot grow it), and whatever it writes is pixels, as
it could send before. It is killed before the server uses the frames, so it cannot change them after.

While the worker decodes, the server holds neither the file nor a mapping of it: the worker sends the file back with
its last message (``SCM_RIGHTS``), and the server checks that it is the file it made before it maps it. Until
2026-12-07 the server held the file from the start, so a worker the kernel killed for want of memory freed only its
own 34 MiB, not the frames it had written: the kernel, still at the limit, killed the server 24 ms later
(``make bench-memory --limit 2048Mi --only big_video``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
import tempfile
from multiprocessing import reduction

import numpy as np


class SharedFd:
    """A file descriptor a worker process gets a copy of, however it is started (fork, forkserver or spawn)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[object, tuple[object]]:
        return (_rebuilt, (reduction.DupFd(self.fd),))  # type: ignore[attr-defined]


def _rebuilt(dup: object) -> SharedFd:
    return SharedFd(dup.detach())  # type: ignore[attr-defined]


class FrameBuffer:
    """The server's side: a memory file of ``size`` bytes that the worker gets (``shared()``) and sends back when it
    is done (``adopt``), mapped read-only only then."""

    def __init__(self, size: int, spool_dir: str) -> None:
        size = max(size, mmap.PAGESIZE)  # (an empty file cannot be mapped; a budget that small holds no frame)
        try:
            fd = os.memfd_create("facegate-frames", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):  # not Linux: an unlinked file in the parent's private directory
            with tempfile.TemporaryFile(dir=spool_dir) as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, size)  # sparse: no page is given until written
            with contextlib.suppress(AttributeError, OSError):  # its size is final: the worker cannot grow it
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            stat = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._identity = (stat.st_dev, stat.st_ino)
        self._map: mmap.mmap | None = None
        self.size = size

    def shared(self) -> SharedFd:
        if self._fd is None:
            raise ValueError("the frame buffer was released")
        return SharedFd(self._fd)

    def release(self) -> None:
        """The server's descriptor closed: call it once the worker has its copy (its start has returned). The file
        then lives only as long as the worker, or until it is sent back."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def adopt(self, fd: int) -> bool:
        """The descriptor the worker sent back, mapped if it is the file this buffer made (always closed here):
        False for any other file, which a worker an exploit took over might send instead."""
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != self._identity or stat.st_size != self.size or self._map is not None:
                return False
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            return True
        finally:
            os.close(fd)

    def frames(self, n: int, width: int, height: int) -> list[np.ndarray]:
        """The first ``n`` frames, read-only views of the mapping (which lives as long as any of them)."""
        if self._map is None:
            raise ValueError("the frame buffer has not been sent back")
        whole = np.frombuffer(self._map, np.uint8, count=n * height * width * 3)
        return list(whole.reshape(n, height, width, 3))

    def close(self) -> None:
        """The descriptor closed, if still held; the mapping too unless frames were taken from it."""
        self.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # frames hold it: freed with the last of them
                self._map.close()


def send_back(connection_fd: int, shared: SharedFd) -> None:
    """In the worker: the file sent back over its connection (a Unix socket) to the server, as one marker byte with
    the descriptor attached."""
    with socket.socket(fileno=os.dup(connection_fd)) as sock:
        socket.send_fds(sock, [b"F"], [shared.fd])


def received(connection_fd: int) -> int | None:
    """In the server: the one descriptor the worker sent back, or None if it sent anything else (every descriptor
    that came with it closed, so that a worker cannot fill the server's table)."""
    with socket.socket(fileno=os.dup(connection_fd)) as sock:
        try:
            marker, fds, flags, _ = socket.recv_fds(sock, 1, 1)
        except OSError:
            return None
    if marker == b"F" and len(fds) == 1 and not flags & socket.MSG_CTRUNC:
        return fds[0]
    for fd in fds:
        os.close(fd)
    return None


class FrameWriter:
    """The worker's side: each frame written at its place in the shared file. Written, not stored through a mapping:
    the kernel then gives the file its pages in bulk instead of one page fault per 4 KiB (360 frames of 640x480 in
    0.62-0.70 s against 0.74-0.82 s, side by side on a machine with another process spinning on one core)."""

    def __init__(self, shared: SharedFd) -> None:
        self.shared = shared
        self.size = os.fstat(shared.fd).st_size

    def write(self, index: int, frame: np.ndarray) -> bool:
        """``frame`` written as the ``index``-th of its size, or False if it does not fit."""
        pixels = memoryview(np.ascontiguousarray(frame).reshape(-1).data).cast("B")
        at = index * len(pixels)
        if at + len(pixels) > self.size:
            return False
        while pixels:
            done = os.pwrite(self.shared.fd, pixels, at)
            pixels, at = pixels[done:], at + done
        return True
