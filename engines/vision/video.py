"""Decode an untrusted video container in a worker process, with a wall-clock limit and allow lists.

FFmpeg (inside OpenCV) parses the container; a hostile or endless stream must not take the server with it, so
the decode runs in a separate process that is killed when it overruns. Only known containers (AVI, MP4/MOV,
Matroska/WebM, sniffed from magic bytes) and codecs are read; the frame size is checked from the stream header
before the first frame and every frame as it is read, and reading stops at the frame-count and pixel budgets.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
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


def _worker(data: bytes, limits: VideoLimits, out: Connection) -> None:
    # OpenCV reads containers from files: a private temporary file, deleted when done.
    fd, path = tempfile.mkstemp(suffix=".video")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        out.send(_read(path, limits))
    except Exception as exc:  # the worker reports, never raises into nothing
        out.send(("error", f"could not be decoded ({type(exc).__name__})"))
    finally:
        os.unlink(path)
        out.close()


def _context() -> mp.context.BaseContext:
    # forkserver: workers fork from a small clean process (never from the threaded server), fast after the first.
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def decode_video(data: bytes, limits: VideoLimits, field: str) -> list[np.ndarray]:
    """Frames of an encoded video (blocking: call it from a worker thread). Every refusal is an
    InvalidArgumentError naming ``<field>.video``."""
    where = f"{field}.video"
    if sniff_container(data) is None:
        raise InvalidArgumentError(FieldViolation(where, "is not an AVI, MP4/MOV or Matroska/WebM container"))
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(data, limits, send), daemon=True)  # type: ignore[attr-defined]
    proc.start()
    send.close()
    try:
        if not receive.poll(limits.timeout_s):
            raise InvalidArgumentError(FieldViolation(where, f"did not decode within {limits.timeout_s:g} s"))
        try:
            status, payload = receive.recv()
        except EOFError as exc:  # the worker died (a crash inside the decoder)
            raise InvalidArgumentError(FieldViolation(where, "could not be decoded")) from exc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        receive.close()
    if status != "ok":
        raise InvalidArgumentError(FieldViolation(where, str(payload)))
    frames = np.asarray(payload)
    return list(frames)
