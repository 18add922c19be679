"""Decode an untrusted video container in a worker process, with CPU and wall-clock limits and allow lists.

FFmpeg (inside OpenCV) parses the container; a hostile or endless stream must not take the server with it, so
the decode runs in a separate process that is killed when it overruns. Only known containers (AVI, MP4/MOV,
Matroska/WebM, sniffed from magic bytes) and codecs are read; the frame size is checked from the stream header
before the first frame and every frame as it is read, a Motion JPEG's frames are held to the scan limit of a
clip's JPEG frames before any is decoded, and reading stops at the frame-count and pixel budgets.

The worker writes the frames one at a time into a shared memory file the parent sized to the video's pixel budget
(``frame_buffer``), and the parent unpickles nothing from it: its messages are small JSON objects (the frame size,
then how many frames), and the parent checks every limit again before it reads a frame. The worker parses hostile
input; one an exploit took over gets no further than a refusal. (Until 2026-12-04 it sent all frames as one
pickled array: 3.4x their size in the worker, and a pickle the server loaded. Until 2026-12-07 it sent each frame
through the pipe, which a server short of the GIL read in 10-30 s instead of 1 s.)

Two time limits hold the worker (``video_watch``): the CPU it costs, which the video answers for, and the
wall-clock time, which the server's load shares.

The client's video never lies on disk where it could outlive the request: the worker hands it to FFmpeg as an
anonymous memory file (``memfd_create``), freed by the kernel when the worker exits, killed or not. Where there is
no memfd, it goes into a private directory that the parent removes once the worker is gone. (Until 2026-12-04 the
worker wrote a temporary file and removed it itself, and the parent's kill, timed out or merely prompt, beat the
removal: 13 of 30 decodes left the video in the temporary directory.)
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from engines.errors import FieldViolation, InvalidArgumentError
from engines.vision.frame_buffer import FrameBuffer, FrameWriter, SharedFd, received, send_back
from engines.vision.jpeg_header import jpeg_frame, too_many_scans
from engines.vision.oom_score import volunteer
from engines.vision.video_watch import Watch

_CONTROL_BYTES = 4096  # the longest control message the parent reads from a worker
ALLOWED_CODECS = frozenset({"MJPG", "H264", "AVC1", "X264", "VP80", "VP90", "MP4V", "FMP4", "XVID", "DIVX"})


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int = 400
    max_frame_pixels: int = 4_000_000
    min_side: int = 32
    max_total_pixels: int = 400 * 640 * 480
    timeout_s: float = 30.0
    """Wall-clock limit of one decode (the worker is killed after it; ``video_watch`` says whose fault it was)."""
    max_scans: int = 100
    """Most scans a progressive frame of a Motion JPEG video may have, as for a JPEG frame of a clip."""
    cpu_s: float = 10.0
    """CPU time one decode may cost, all the decoder's threads (the worker is killed after it)."""


def sniff_container(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    return None


def _send(out: Connection, **message: object) -> None:
    out.send_bytes(json.dumps(message).encode())


def _stream(path: str, limits: VideoLimits, out: Connection, target: FrameWriter) -> None:
    """In the worker: {"size": [w, h]}, each frame's BGR pixels written into ``target`` (``frame_buffer``) as it is
    decoded, then {"end": n}; or {"error": description} at any point. It holds one frame at a time: collecting the
    frames and sending them as one array took 3.4x their size (1,213 MiB for 400 frames of 640x480)."""
    import cv2

    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            return _send(out, error="is not a decodable video container")
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).upper()
        if codec not in ALLOWED_CODECS:
            return _send(out, error=f"uses codec {codec!r}; allowed: {', '.join(sorted(ALLOWED_CODECS))}")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if error := _size_error(w, h, limits):
            return _send(out, error=error)
        if codec == "MJPG" and (error := _scans_error(path, limits)):
            return _send(out, error=error)
        _send(out, size=[w, h])
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape != (h, w, 3):
                return _send(out, error=f"frame {n} is {frame.shape[1]}x{frame.shape[0]}, not {w}x{h}")
            if error := _count_error(n + 1, w, h, limits):
                return _send(out, error=error)
            if not target.write(n, frame):
                return _send(out, error=f"decodes to more than {target.size // 3} pixels")
            n += 1
        if not n:
            return _send(out, error="holds no decodable frame")
        _send(out, end=n)
        send_back(out.fileno(), target.shared)  # (the server held no reference to it while it was written)
    finally:
        cap.release()


def _scans_error(path: str, limits: VideoLimits) -> str:
    """Each Motion JPEG frame is a JPEG file, and a progressive one of many tiny scans costs a pass over the whole
    frame per scan (``engines/vision/jpeg_header.py``): one 2000x2000 frame of 40,000 scans took FFmpeg seconds,
    bounded only by the time limit. Its packets are read undecoded first and held to the scan limit of a clip's
    frames (80 frames of 480x360: 2-7 ms, against 118-142 ms to decode them). FFmpeg still decodes them, so the
    pixels are those of every other video: libjpeg-turbo's differ from FFmpeg's by up to 28 levels."""
    import cv2

    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)  # the caller's capture opened the same file: this one will too
    try:
        if not cap.set(cv2.CAP_PROP_FORMAT, -1):  # -1: packets as read, not decoded (an OpenCV without it refuses)
            return "could not be checked: its Motion JPEG packets could not be read"
        for n in range(limits.max_frames + 1):  # one more than the limit: the decode then refuses the count
            ok, packet = cap.read()
            if not ok:
                break
            data = packet.tobytes()
            if reason := too_many_scans(data, jpeg_frame(data), limits.max_scans):
                return f"frame {n} {reason}"
        return ""
    finally:
        cap.release()


def _size_error(w: int, h: int, limits: VideoLimits) -> str:
    if w * h > limits.max_frame_pixels or min(w, h) < limits.min_side:
        return f"frames are {w}x{h}, outside the size limits"
    return ""


def _count_error(frames: int, w: int, h: int, limits: VideoLimits) -> str:
    if frames > limits.max_frames:
        return f"has more than {limits.max_frames} frames"
    if frames * w * h > limits.max_total_pixels:
        return f"decodes to more than {limits.max_total_pixels} pixels"
    return ""


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


def _confine(limits: VideoLimits) -> None:
    """In the worker, before it reads the video: limits the kernel holds it to whatever the decoder does."""
    with contextlib.suppress(OSError, ValueError):
        # A decoder that crashed would dump the worker's memory, and the client's video in it, to a core file.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, ValueError):
        # The parent stops the worker at its CPU limit; this holds if the parent cannot (soft = hard: SIGKILL, where
        # SIGXCPU would dump a core).
        cap = math.ceil(limits.cpu_s) + 1
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard == resource.RLIM_INFINITY or hard > cap:
            resource.setrlimit(resource.RLIMIT_CPU, (cap, cap))


def _worker(data: bytes, limits: VideoLimits, spool_dir: str, placement: _Placement, out: Connection,
            frames: SharedFd) -> None:
    placement.apply()
    _confine(limits)
    # FFmpeg's own complaints about a broken stream ("[mjpeg @ 0x...] overread 8") went to the server's stderr,
    # one line per bad packet: a hostile video chose how much the server's log got. What was wrong reaches the
    # caller as one status instead. (Read by OpenCV when it first opens a capture, so before any is opened.)
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "-8"  # AV_LOG_QUIET
    volunteer()  # under memory pressure the kernel kills a decoder before the server (oom_score)
    try:
        with _spooled(data, spool_dir) as path:  # OpenCV reads containers only from a path
            _stream(path, limits, out, FrameWriter(frames))
    except Exception as exc:  # the worker reports, never raises into nothing
        with contextlib.suppress(OSError):
            _send(out, error=f"could not be decoded ({type(exc).__name__})")
    finally:
        out.close()


def _context() -> mp.context.BaseContext:
    # forkserver: workers fork from a small clean process (never from the threaded server), fast after the first.
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


class DecodeAbandonedError(Exception):
    """The caller no longer wants the frames (its call was cancelled or has failed): the worker was stopped."""


# How often a wait on the worker looks whether its caller has gone: a worker left decoding for a cancelled call
# held a video slot and a core for up to the time limit.
_ABANDON_POLL_S = 0.05


def _receive(receive: Connection, buffer: FrameBuffer, limits: VideoLimits, where: str,
             abandon: threading.Event | None = None) -> list[np.ndarray]:
    """The frames the worker wrote into ``buffer``, within the time limit, until ``abandon`` is set. Nothing it
    sends is unpickled, and every limit is checked again here: the worker parses hostile input, and one an exploit
    took over must not reach further into the server than its own answer."""
    # The watch kills the worker at the limit, which ends any read; this is for a read the kill did not end.
    deadline = time.monotonic() + limits.timeout_s + 1.0

    def garbled() -> InvalidArgumentError:  # whatever the worker got wrong, the caller learns only this
        return InvalidArgumentError(FieldViolation(where, "could not be decoded"))

    def wait() -> None:
        while not receive.poll(min(_ABANDON_POLL_S, max(0.0, deadline - time.monotonic()))):
            if abandon is not None and abandon.is_set():
                raise DecodeAbandonedError(where)
            if time.monotonic() >= deadline:
                raise InvalidArgumentError(FieldViolation(where, f"did not decode within {limits.timeout_s:g} s"))
        if abandon is not None and abandon.is_set():  # (a worker streaming steadily never makes poll wait)
            raise DecodeAbandonedError(where)

    def message(max_bytes: int) -> bytes:
        wait()
        try:
            return receive.recv_bytes(max_bytes)
        except (EOFError, OSError) as exc:  # the worker died (a crash inside the decoder), or sent nonsense
            raise garbled() from exc

    def control() -> dict[str, object]:
        try:
            got = json.loads(message(_CONTROL_BYTES))
        except ValueError:
            got = None
        if not isinstance(got, dict) or len(got) != 1:
            raise garbled()
        if "error" in got:
            raise InvalidArgumentError(FieldViolation(where, str(got["error"])[:_CONTROL_BYTES]))
        return got

    size = control().get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)) \
            or _size_error(size[0], size[1], limits):
        raise garbled()
    w, h = size
    n = control().get("end")
    if type(n) is not int or n < 1 or _count_error(n, w, h, limits) or n * w * h * 3 > buffer.size:
        raise garbled()
    wait()
    fd = received(receive.fileno())  # the frames' file, back from the worker
    if fd is None or not buffer.adopt(fd):
        raise garbled()
    return buffer.frames(n, w, h)  # (the worker is killed before the caller gets them: it cannot change them)


def _run_worker(ctx: mp.context.BaseContext, data: bytes, limits: VideoLimits, spool_dir: str,
                where: str, abandon: threading.Event | None = None) -> list[np.ndarray]:
    """The decoded frames; the worker is dead when this returns or raises."""
    receive, send = ctx.Pipe(duplex=True)  # (a Unix socket pair: the frames' file comes back over it)
    buffer = FrameBuffer(limits.max_total_pixels * 3, spool_dir)
    args = (data, limits, spool_dir, _Placement.of_this_thread(), send, buffer.shared())
    proc = ctx.Process(target=_worker, args=args, daemon=True)  # type: ignore[attr-defined]
    try:
        proc.start()
    except BaseException:
        buffer.close()
        raise
    send.close()
    buffer.release()  # the worker has its copy: killed, it takes the frames it wrote with it
    # poll() says only that some bytes wait: a worker that sent half a message and stalled would hold recv_bytes
    # past the limit. Killed at a limit, it closes its end and the read ends.
    try:
        with Watch(proc.pid, proc.kill, limits.cpu_s, limits.timeout_s, receive.fileno()) as watch:
            try:
                return _receive(receive, buffer, limits, where, abandon)
            except InvalidArgumentError:
                if (error := watch.error(where)) is not None:  # the read ended because the watch killed the worker
                    raise error from None
                proc.join(timeout=0.2)  # (a worker whose end of the socket closed has ended, or is ending)
                if proc.exitcode == -signal.SIGKILL:  # killed, and not by this process: by the kernel
                    raise watch.killed(where) from None
                raise
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        receive.close()
        buffer.close()


def decode_video(data: bytes, limits: VideoLimits, field: str,
                 abandon: threading.Event | None = None) -> list[np.ndarray]:
    """Frames of an encoded video (blocking: call it from a worker thread). Every refusal is an
    InvalidArgumentError naming ``<field>.video``. Setting ``abandon`` from another thread stops the worker within
    ~50 ms (DecodeAbandonedError), as when the call that wanted the frames was cancelled."""
    where = f"{field}.video"
    if sniff_container(data) is None:
        raise InvalidArgumentError(FieldViolation(where, "is not an AVI, MP4/MOV or Matroska/WebM container"))
    if abandon is not None and abandon.is_set():
        raise DecodeAbandonedError(where)
    ctx = _context()
    spool_dir = tempfile.mkdtemp(prefix="facegate-video-")  # 0700; used only where there is no memfd
    try:
        return _run_worker(ctx, data, limits, spool_dir, where, abandon)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)  # after the worker is gone, so nothing writes there again
