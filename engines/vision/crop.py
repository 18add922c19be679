"""The upstream Silent-Face crop rule: a window of scale x the face box, shifted to stay inside the image."""

from __future__ import annotations

import cv2
import numpy as np


def crop_window(box: tuple[int, int, int, int], width: int, height: int, scale: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), inclusive, of the crop for a face box (x, y, w, h) in an image of width x height."""
    x, y, w, h = box
    w, h = max(w, 1), max(h, 1)
    s = min(scale, (height - 1) / h, (width - 1) / w)
    new_w, new_h = w * s, h * s
    cx, cy = x + w / 2, y + h / 2
    left, top = cx - new_w / 2, cy - new_h / 2
    right, bottom = cx + new_w / 2, cy + new_h / 2
    if left < 0:
        right -= left
        left = 0
    if top < 0:
        bottom -= top
        top = 0
    if right > width - 1:
        left -= right - width + 1
        right = width - 1
    if bottom > height - 1:
        top -= bottom - height + 1
        bottom = height - 1
    return int(left), int(top), int(right), int(bottom)


def crop_for_model(bgr: np.ndarray, box: tuple[int, int, int, int], scale: float, out_w: int,
                   out_h: int) -> np.ndarray:
    """The model input: 3 x out_h x out_w float32, BGR, raw 0..255 values (no normalisation)."""
    height, width = bgr.shape[:2]
    x0, y0, x1, y1 = crop_window(box, width, height, scale)
    patch = bgr[y0:y1 + 1, x0:x1 + 1]
    resized = cv2.resize(patch, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)
