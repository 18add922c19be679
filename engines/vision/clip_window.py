"""Clip preprocessing shared by training and serving (pure numpy/OpenCV, so both see identical inputs).

A stable face track (one crop box for the whole clip, from detections on a few frames), resampling from the
capture frame rate to the model's, the window of T model frames centred on the apex (padding by repeating the
first/last frame), and an apex spotter from motion magnitude for clips without an apex annotation or hint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def smoothing_frames(capture_fps: float) -> int:
    """The spotter's smoothing window: ~20 ms of frames."""
    return max(1, round(capture_fps * 0.02))


def spot_apex(grey_frames: Sequence[np.ndarray], capture_fps: float) -> int:
    """The frame of peak motion magnitude relative to the first frame, after smoothing over ~20 ms."""
    if len(grey_frames) < 3:
        return len(grey_frames) // 2
    prof = motion_profile(grey_frames)
    k = smoothing_frames(capture_fps)
    smooth = np.convolve(prof, np.ones(k) / k, mode="same")
    return int(np.argmax(smooth))


@dataclass(frozen=True)
class SparseSpotter:
    """``spot_apex`` reading only some of the frames: a coarse pass on every k-th frame (k = the smoothing window,
    so one sample per 20 ms), then every frame within ``reach`` coarse steps (and at least ``min_reach_frames``) of
    the coarse peak, where the smoothed profile is the same window average ``spot_apex`` takes (summed in another
    order, so equal up to float rounding). It answers like ``spot_apex`` whenever the full profile's peak lies in
    that neighbourhood (and is not a tie within rounding). Measured on the 384 synthetic clips
    (80 frames): at 200 fps the same apex as ``spot_apex`` for all 384, reading 42 frames (with 2 steps: 384 of
    384 too, 37 frames; 1 step: 13 differ); read as 90, 100 or 120 fps clips (a 2-frame step), 3 steps alone left
    4 of 384 different and 12 frames either side none.

    Use: decode ``coarse()``, then ``refine(coarse thumbnails)``, then ``apex(all thumbnails)``."""

    n_frames: int
    capture_fps: float
    reach: int = 3
    min_reach_frames: int = 12

    @property
    def step(self) -> int:
        return smoothing_frames(self.capture_fps)

    def coarse(self) -> list[int]:
        if self.n_frames < 3:
            return list(range(self.n_frames))
        return sorted({*range(0, self.n_frames, self.step), self.n_frames - 1})

    def _support(self, i: int) -> range:
        """The frames whose motion ``spot_apex``'s smoothing (np.convolve, mode "same") averages for frame i."""
        k = self.step
        return range(max(0, i - k // 2), min(self.n_frames, i + k - k // 2))

    def _region(self, coarse: Mapping[int, np.ndarray]) -> range:
        idx = self.coarse()
        first = coarse[0].astype(np.float32)
        peak = idx[int(np.argmax([float(np.abs(coarse[i].astype(np.float32) - first).mean()) for i in idx]))]
        r = max(self.reach * self.step, self.min_reach_frames)
        return range(max(0, peak - r), min(self.n_frames, peak + r + 1))

    def refine(self, coarse: Mapping[int, np.ndarray]) -> list[int]:
        """The frames still needed, given the coarse pass's thumbnails."""
        if self.n_frames < 3:
            return []
        region = self._region(coarse)
        need = {m for i in region for m in self._support(i)}
        return sorted(need - set(coarse))

    def apex(self, thumbs: Mapping[int, np.ndarray]) -> int:
        if self.n_frames < 3:
            return self.n_frames // 2
        first = thumbs[0].astype(np.float32)
        region = self._region(thumbs)
        # Each frame's motion once (the supports of neighbouring frames overlap k-fold).
        motion = {m: float(np.abs(thumbs[m].astype(np.float32) - first).mean())
                  for m in sorted({m for i in region for m in self._support(i)})}
        k = self.step
        smooth = [sum(motion[m] for m in self._support(i)) / k for i in region]
        return region[int(np.argmax(smooth))]


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
