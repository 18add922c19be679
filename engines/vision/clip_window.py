"""Clip preprocessing shared by training and serving (pure numpy/OpenCV, so both see identical inputs).

A stable face track (one crop box for the whole clip, from detections on a few frames), resampling from the
capture frame rate to the model's, the window of T model frames centred on the apex (padding by repeating the
first/last frame), and an apex spotter from motion magnitude for clips without an apex annotation or hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """How clips become model inputs; stored in the ensemble manifest so training and serving agree."""

    clip_len: int
    fps: float
    size: int
    crop_scale: float = 1.3
    detect_frames: int = 5
    face_score: float = 0.6
    # Extra context around the model window: training draws random temporal and spatial offsets from it,
    # evaluation and serving take the centre.
    margin_frames: int = 2
    margin_px: int = 6


@dataclass(frozen=True)
class Window:
    indices: tuple[int, ...]  # source frame index of each model frame
    padded: int  # model frames that repeat the first or last frame because the clip is too short
    apex_index: int


def detection_frames(n_frames: int, k: int) -> list[int]:
    """k frame indices spread evenly over the clip (first and last included)."""
    if n_frames <= k:
        return list(range(n_frames))
    return [round(i * (n_frames - 1) / (k - 1)) for i in range(k)]


def stable_box(boxes: Sequence[tuple[int, int, int, int] | None]) -> tuple[tuple[int, int, int, int] | None, float]:
    """One box for the whole clip: the per-coordinate median of the frames where a face was found.

    A fixed box is deliberate: re-centring per frame would add jitter larger than the micro-movements. Returns
    the box and the coverage (fraction of sampled frames with a face)."""
    found = [b for b in boxes if b is not None]
    if not found:
        return None, 0.0
    med = np.median(np.asarray(found, np.float64), axis=0)
    return (int(med[0]), int(med[1]), int(med[2]), int(med[3])), len(found) / len(boxes)


def square_crop_box(box: tuple[int, int, int, int], width: int, height: int, scale: float
                    ) -> tuple[int, int, int, int]:
    """A square of side scale * max(w, h) around the face centre, shifted inside the image: (x0, y0, x1, y1)."""
    x, y, w, h = box
    side = min(scale * max(w, h), width, height)
    cx, cy = x + w / 2, y + h / 2
    x0 = min(max(cx - side / 2, 0.0), width - side)
    y0 = min(max(cy - side / 2, 0.0), height - side)
    return int(x0), int(y0), int(x0 + side), int(y0 + side)


def model_window(n_frames: int, capture_fps: float, model_fps: float, clip_len: int, apex_index: int) -> Window:
    """Source frames for ``clip_len`` model frames at ``model_fps`` centred on the apex (nearest frame)."""
    step = capture_fps / model_fps
    half = clip_len // 2
    raw = [round(apex_index + (i - half) * step) for i in range(clip_len)]
    clamped = tuple(min(max(r, 0), n_frames - 1) for r in raw)
    padded = sum(1 for r, c in zip(raw, clamped, strict=True) if r != c)
    return Window(clamped, padded, apex_index)


def motion_profile(grey_frames: Sequence[np.ndarray]) -> np.ndarray:
    """Mean absolute difference of each frame from the first (small greyscale face crops)."""
    first = grey_frames[0].astype(np.float32)
    return np.asarray([float(np.abs(g.astype(np.float32) - first).mean()) for g in grey_frames])


def spot_apex(grey_frames: Sequence[np.ndarray], capture_fps: float) -> int:
    """The frame of peak motion magnitude relative to the first frame, after smoothing over ~20 ms."""
    if len(grey_frames) < 3:
        return len(grey_frames) // 2
    prof = motion_profile(grey_frames)
    k = max(1, round(capture_fps * 0.02))
    smooth = np.convolve(prof, np.ones(k) / k, mode="same")
    return int(np.argmax(smooth))


THUMBNAIL_SIDE = 32  # the apex spotter's greyscale thumbnails


def grey_thumbnail(bgr: np.ndarray, crop: tuple[int, int, int, int], size: int = THUMBNAIL_SIDE) -> np.ndarray:
    x0, y0, x1, y1 = crop
    patch = cv2.cvtColor(bgr[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)


def crop_frames(frames: Sequence[np.ndarray], indices: Sequence[int], crop: tuple[int, int, int, int],
                size: int) -> np.ndarray:
    """Frames of one clip cut to the crop box: [3, T, size, size] float32, BGR 0..255."""
    x0, y0, x1, y1 = crop
    out = np.empty((3, len(indices), size, size), np.float32)
    for t, i in enumerate(indices):
        patch = cv2.resize(frames[i][y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
        out[:, t] = patch.transpose(2, 0, 1)
    return out


def model_input(frames: Sequence[np.ndarray], crop: tuple[int, int, int, int], apex: int, capture_fps: float,
                spec: ClipSpec) -> tuple[np.ndarray, Window]:
    """What the served model sees: the T-frame window at the apex, the crop resized with its margin, centred.

    Equal to the centre of what training draws its random offsets from."""
    win = model_window(len(frames), capture_fps, spec.fps, spec.clip_len, apex)
    full = crop_frames(frames, win.indices, crop, spec.size + spec.margin_px)
    m = spec.margin_px // 2
    return np.ascontiguousarray(full[:, :, m:m + spec.size, m:m + spec.size]), win
