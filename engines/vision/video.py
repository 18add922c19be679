"""Decode an untrusted video container in a worker process, with a wall-clock limit and allow lists.

FFmpeg (inside OpenCV) parses the container; a hostile or endless stream must not take the server with it, so
the decode runs in a separate process that is killed when it overruns. Only known containers (AVI, MP4/MOV,
Matroska/WebM, sniffed from magic bytes) and codecs are read; the frame size is checked from the stream header
before the first frame and every frame as it is read, and reading stops at the frame-count and pixel budgets.

The client's video never lies on disk where it could outlive the request: the worker hands it to FFmpeg as an
anonymous memory file (``memfd_create``), freed by the kernel when the worker exits, killed or not. Where there is
no memfd, it goes into a private directory that the parent removes once the worker is gone. (Until 2026-12-04 the
worker wrote a temporary file and removed it itself, and the parent's kill, timed out or merely prompt, beat the
removal: 13 of 30 decodes left the video in the temporary directory.)
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from engines.errors import FieldViolation, InvalidArgumentError

ALLOWED_CODECS = frozenset({"MJPG", "H264", "AVC1", "X264", "VP80", "VP90", "MP4V", "FMP4", "XVID", "DIVX"})


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int = 400
    max_frame_pixels: int = 4_000_000
    min_side: int = 32
    max_total_pixels: int = 400 * 640 * 480
    timeout_s: float = 10.0
    """Wall-clock limit of one decode (the worker is killed after it)."""


def sniff_container(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    return None


def _read(path: str, limits: VideoLimits) -> tuple[str, object]:
    """In the worker: ("ok", uint8 [N, H, W, 3]) or ("error", description)."""
    import cv2

    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            return "error", "is not a decodable video container"
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).upper()
        if codec not in ALLOWED_CODECS:
            return "error", f"uses codec {codec!r}; allowed: {', '.join(sorted(ALLOWED_CODECS))}"
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w * h > limits.max_frame_pixels or min(w, h) < limits.min_side:
            return "error", f"frames are {w}x{h}, outside the size limits"
        frames: list[np.ndarray] = []
        total = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape[:2] != (h, w):
                return "error", f"frame {len(frames)} is {frame.shape[1]}x{frame.shape[0]}, not {w}x{h}"
            if len(frames) >= limits.max_frames:
                return "error", f"has more than {limits.max_frames} frames"
            total += w * h
            if total > limits.max_total_pixels:
                return "error", f"decodes to more than {limits.max_total_pixels} pixels"
            frames.append(frame)
        if not frames:
            return "error", "holds no decodable frame"
        return "ok", np.stack(frames)
    finally:
        cap.release()


@contextmanager
def _spooled(data: bytes, spool_dir: str) -> Iterator[str]:
    """A path FFmpeg can open (and seek, as MP4 needs) holding ``data``: a memory file where the kernel offers one,
    else a file in ``spool_dir``, which the parent owns and removes."""
    try:
        fd = os.memfd_create("facegate-video", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, or a sandbox without the call
        fd, path = tempfile.mkstemp(dir=spool_dir, suffix=".video")
    else:
        path = f"/proc/self/fd/{fd}"
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield path
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Placement:
    """Where and how urgently the calling thread runs; its worker runs the same."""

    cpus: frozenset[int] | None
    nice: int | None

    @classmethod
    def of_this_thread(cls) -> _Placement:
        cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        nice = None
        if sys.platform.startswith("linux"):  # per thread on Linux: the thread's own nice value, by its id
            with contextlib.suppress(OSError):
                nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return cls(cpus, nice)

    def apply(self) -> None:
        # Forked from the forkserver, a worker has the affinity and nice value of whichever thread first started
        # that server: once a compute thread pinned to one CPU, so every video decoded on that one core.
        if self.cpus:
            with contextlib.suppress(OSError):  # a CPU left the cpuset meanwhile: it stays where it may run
                os.sched_setaffinity(0, self.cpus)
        if self.nice is not None:
            with contextlib.suppress(OSError):
                if self.nice > os.getpriority(os.PRIO_PROCESS, 0):  # only upwards: downwards needs privilege
                    os.setpriority(os.PRIO_PROCESS, 0, self.nice)


def _worker(data: bytes, limits: VideoLimits, spool_dir: str, placement: _Placement, out: Connection) -> None:
    placement.apply()
    try:
        with _spooled(data, spool_dir) as path:  # OpenCV reads containers only from a path
            out.send(_read(path, limits))
    except Exception as exc:  # the worker reports, never raises into nothing
        out.send(("error", f"could not be decoded ({type(exc).__name__})"))
    finally:
        out.close()


def _context() -> mp.context.BaseContext:
    # forkserver: workers fork from a small clean process (never from the threaded server), fast after the first.
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _run_worker(ctx: mp.context.BaseContext, data: bytes, limits: VideoLimits, spool_dir: str,
                where: str) -> tuple[str, object]:
    """The worker's (status, payload); it is dead when this returns or raises."""
    receive, send = ctx.Pipe(duplex=False)
    args = (data, limits, spool_dir, _Placement.of_this_thread(), send)
    proc = ctx.Process(target=_worker, args=args, daemon=True)  # type: ignore[attr-defined]
    proc.start()
    send.close()
    try:
        if not receive.poll(limits.timeout_s):
            raise InvalidArgumentError(FieldViolation(where, f"did not decode within {limits.timeout_s:g} s"))
        try:
            return receive.recv()  # type: ignore[no-any-return]
        except EOFError as exc:  # the worker died (a crash inside the decoder)
            raise InvalidArgumentError(FieldViolation(where, "could not be decoded")) from exc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        receive.close()


def decode_video(data: bytes, limits: VideoLimits, field: str) -> list[np.ndarray]:
    """Frames of an encoded video (blocking: call it from a worker thread). Every refusal is an
    InvalidArgumentError naming ``<field>.video``."""
    where = f"{field}.video"
    if sniff_container(data) is None:
        raise InvalidArgumentError(FieldViolation(where, "is not an AVI, MP4/MOV or Matroska/WebM container"))
    ctx = _context()
    spool_dir = tempfile.mkdtemp(prefix="facegate-video-")  # 0700; used only where there is no memfd
    try:
        status, payload = _run_worker(ctx, data, limits, spool_dir, where)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)  # after the worker is gone, so nothing writes there again
    if status != "ok":
        raise InvalidArgumentError(FieldViolation(where, str(payload)))
    frames = np.asarray(payload)
    return list(frames)
