"""A clip as a request brings it, and every check it passes before a pixel is decoded: counts, frame rate, sizes
from the frame headers, the request's pixel budget. Used by the identification pipeline and the services."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from engines.errors import FieldViolation, InvalidArgumentError
from engines.vision.imaging import ImageHeader, ImageLimits, probe_image
from engines.vision.video import VideoLimits


@dataclass(frozen=True)
class ClipLimits:
    min_frames: int = 2
    max_frames: int = 400
    """More frames than this are refused (2 s at 200 fps)."""
    max_total_bytes: int = 64 * 1024 * 1024
    max_fps: float = 1000.0
    """Capture rates above this are refused (fps drives the apex-spotting kernel and the resampling)."""
    max_request_pixels: int = 400 * 640 * 480
    """Decoded pixels one request may need, over all its frames (and clips): 400 frames of 640x480."""
    max_clips: int = 16
    """Clips one enrolment request may carry."""
    video_cpu_s: float = 10.0
    """CPU time decoding one video container may cost (in a worker process, killed after it): INVALID_ARGUMENT."""
    video_timeout_s: float = 30.0
    """Wall-clock limit of decoding one video container (killed after it): RESOURCE_EXHAUSTED if the server was too
    busy to give the decode its CPU (until 2026-12-07 this was 10 s, the only limit, and always INVALID_ARGUMENT)."""
    frame: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=4 * 1024 * 1024,
                                                                   max_pixels=4_000_000))
    """Each frame's limits ([identification.frame]); ``max_scans`` also holds each frame of a Motion JPEG video."""

    def __post_init__(self) -> None:
        # Set from a configuration file: a zero or negative limit would refuse every clip, or none.
        f = self.frame
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must be at least 2 and at most max_frames "
                             f"({self.max_frames})")
        positive = {"max_total_bytes": self.max_total_bytes, "max_fps": self.max_fps,
                    "max_request_pixels": self.max_request_pixels, "max_clips": self.max_clips,
                    "video_cpu_s": self.video_cpu_s, "video_timeout_s": self.video_timeout_s,
                    "frame.max_bytes": f.max_bytes, "frame.max_pixels": f.max_pixels, "frame.min_side": f.min_side,
                    "frame.max_scans": f.max_scans}
        if bad := [f"{name} = {value}" for name, value in positive.items() if not value > 0]:
            raise ValueError(f"clip limits must be positive: {', '.join(bad)}")

    def video(self, max_pixels: int | None = None) -> VideoLimits:
        """A video's limits; it decodes at most ``max_pixels`` (default: the request's budget)."""
        return VideoLimits(self.max_frames, self.frame.max_pixels, self.frame.min_side,
                           self.max_request_pixels if max_pixels is None else max_pixels, self.video_timeout_s,
                           self.frame.max_scans, self.video_cpu_s)

    def videos_at_once(self, pixel_budget: int) -> int:
        """How many video containers decode at once: as many as the server's pixel budget holds of the largest (a
        whole request's budget each); an enrolment's smaller videos wait for one of these turns."""
        return max(1, pixel_budget // max(self.max_request_pixels, 1))


@dataclass(frozen=True)
class ClipInput:
    frames: Sequence[bytes]
    fps: float
    apex_hint: int | None = None
    video: bytes = b""  # an encoded container instead of frames


@dataclass(frozen=True)
class ProbedClip:
    """A clip whose frame headers passed every limit: what decoding it will cost, known before it starts."""

    clip: ClipInput
    field: str
    headers: tuple[ImageHeader, ...]  # empty for a video
    pixels: int  # decoded pixels it may need (a video: its share of the request budget, enforced as it decodes)


def frame_count_violation(n: int, limits: ClipLimits, where: str) -> FieldViolation | None:
    if n < limits.min_frames:
        return FieldViolation(where, f"has {n} frame(s); at least {limits.min_frames} needed")
    if n > limits.max_frames:
        return FieldViolation(where, f"has {n} frames, over the limit of {limits.max_frames}")
    return None


def validate_clip(clip: ClipInput, limits: ClipLimits, field: str = "clip") -> None:
    violations = []
    if not (isinstance(clip.fps, float | int) and math.isfinite(clip.fps) and 0 < clip.fps <= limits.max_fps):
        violations.append(FieldViolation(
            f"{field}.fps", f"must be the capture frame rate in (0, {limits.max_fps:g}], got {clip.fps}"))
    if clip.video and clip.frames:
        violations.append(FieldViolation(f"{field}.video", "send either frames or a video, not both"))
    n = len(clip.frames)
    if not clip.video:
        bad_count = frame_count_violation(n, limits, f"{field}.frames")
        if bad_count:
            violations.append(bad_count)
    total = len(clip.video) + sum(len(f) for f in clip.frames)
    if total > limits.max_total_bytes:
        violations.append(FieldViolation(f"{field}.frames", f"total {total} bytes, over {limits.max_total_bytes}"))
    if clip.apex_hint is not None and (clip.apex_hint < 0 or (not clip.video and clip.apex_hint >= n)):
        violations.append(FieldViolation(f"{field}.apex_frame", f"must index a frame (0..{max(n, 1) - 1})"))
    if violations:
        raise InvalidArgumentError(violations)


def probe_headers(frames: Sequence[bytes], limits: ClipLimits, field: str) -> list[ImageHeader]:
    """The headers of a clip's ``frames``, in order, each within the frame limits; no pixels. Blocking."""
    return [probe_image(data, limits.frame, f"{field}.frames[{i}].data") for i, data in enumerate(frames)]


def check_headers(clip: ClipInput, limits: ClipLimits, field: str, headers: Sequence[ImageHeader]) -> ProbedClip:
    """All frames of one upright size, and the whole clip within the request's pixel budget."""
    w, h = headers[0].width, headers[0].height
    for i, hd in enumerate(headers):
        if (hd.width, hd.height) != (w, h):
            raise InvalidArgumentError(FieldViolation(
                f"{field}.frames[{i}]", f"is {hd.width}x{hd.height}; frame 0 is {w}x{h} (all must match)"))
    pixels = sum(hd.pixels for hd in headers)
    if pixels > limits.max_request_pixels:
        raise InvalidArgumentError(FieldViolation(
            f"{field}.frames", f"decode to {pixels} pixels, over the request budget of {limits.max_request_pixels}"))
    return ProbedClip(clip, field, tuple(headers), pixels)


def video_share(clips: Sequence[ClipInput], frame_pixels: int, limits: ClipLimits, field: str = "clips") -> int:
    """Decoded pixels each video of a request may use: an equal share of what its frame clips (``frame_pixels``,
    from their headers) leave of the request's budget. Charging each video the whole budget, as before 2026-12-04,
    refused every enrolment with two videos, or with a video and frames."""
    videos = sum(1 for c in clips if c.video)
    if not videos:
        return 0
    share = (limits.max_request_pixels - frame_pixels) // videos
    if share < limits.min_frames * limits.frame.min_side ** 2:
        raise InvalidArgumentError(FieldViolation(
            field, f"leave {max(share, 0)} decoded pixels for each of {videos} videos after the frames' "
                   f"{frame_pixels}, under the least a video needs (request budget {limits.max_request_pixels})"))
    return share
