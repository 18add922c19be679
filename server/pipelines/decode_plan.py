"""How a clip's frames are decoded: in how many pool jobs, and at which JPEG scale-down."""

from __future__ import annotations

import math


def pool_chunk(n: int, in_flight: int = 1) -> int:
    """Frames per pool job when ``n`` frames are decoded with ``in_flight`` clips in the pipeline. A lone clip
    splits each step over up to 4 jobs of at least 3 frames: every step of a clip waits for its slowest job, so one
    job per step left a core idle (measured at 360x480: ~1.3 ms a frame, 6.5 ms for the 5 detection frames in one
    job). With other clips in flight their jobs fill the cores, and every extra job is one more hand-off to and
    from the event loop (a wake-up and a GIL round trip each): 4 // in_flight jobs, at least one."""
    return max(3, math.ceil(n / max(1, 4 // max(1, in_flight))))


def reduction(crop_side: int, need: int) -> int:
    """The largest JPEG scale-down (8, 4, 2, else 1) that keeps a ``crop_side`` crop at least ``need`` pixels."""
    return next((k for k in (8, 4, 2) if crop_side // k >= need), 1)


def scaled_box(crop: tuple[int, int, int, int], k: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A full-size crop box on a frame decoded at 1/k: the same square, inside the smaller frame."""
    if k == 1:
        return crop
    h, w = shape[:2]
    side = min((crop[2] - crop[0]) // k, w, h)
    x0, y0 = min(crop[0] // k, w - side), min(crop[1] // k, h - side)
    return x0, y0, x0 + side, y0 + side
