"""The identification pipeline: frames -> face track -> crops -> fps resampling -> apex window -> SlowFast
ensemble (batched across requests) -> one embedding per member. Gallery search and the rules of enrolment and
identification live in ``server.services.identification``.

Transport-agnostic, like the liveness pipeline; CPU-heavy steps run on the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from engines.errors import FieldViolation, InvalidArgumentError
from engines.identify.ensemble import Ensemble
from engines.vision.clip_window import (
    THUMBNAIL_SIDE,
    SparseSpotter,
    Window,
    detection_frames,
    grey_thumbnail,
    model_input,
    model_window,
    spot_apex,
    square_crop_box,
    stable_box,
)
from engines.vision.detection import Box, DetectorInput, FaceDetector
from engines.vision.imaging import decode_image
from engines.vision.video import decode_video
from server.admission import Budget, WaitGate, admitted
from server.batching.scheduler import DynamicBatcher
from server.pipelines.clip_input import (
    ClipInput,
    ClipLimits,
    ProbedClip,
    check_headers,
    frame_count_violation,
    probe_headers,
    validate_clip,
)
from server.pipelines.decode_plan import pool_chunk, reduction, scaled_box
from server.pipelines.face_detection import BatchedFaceDetector
from server.stages import Stages
from server.tasks import gather_or_cancel


@dataclass(frozen=True)
class ClipDiagnostics:
    frames_received: int
    frames_used: int
    padded_frames: int
    track_coverage: float
    apex_index: int
    apex_from_hint: bool
    capture_fps: float
    model_fps: float
    face_box: tuple[int, int, int, int] | None

    @property
    def resample_step(self) -> float:
        return self.capture_fps / self.model_fps


@dataclass(frozen=True)
class ClipEmbedding:
    embeddings: dict[str, np.ndarray] | None  # member model -> embedding; None when no face was found
    diagnostics: ClipDiagnostics
    apex_frame: bytes  # the encoded apex frame, for the liveness check on the same capture
    timings_ms: dict[str, float] = field(default_factory=dict)


class ClipPipeline:
    def __init__(self, detector: DynamicBatcher, members: Sequence[DynamicBatcher], ensemble: Ensemble,
                 executor: Executor, limits: ClipLimits | None = None, pixels: Budget | None = None,
                 gate: WaitGate | None = None, reduced_decode: bool = True,
                 video_executor: Executor | None = None) -> None:
        self.gate = gate
        # Decode frames only as large as their use needs (JPEG scaled in libjpeg): full size only for the few
        # detection frames and, if the face crop is small, the model window. False decodes every frame whole.
        self.reduced_decode = reduced_decode
        self.detector = BatchedFaceDetector(detector, FaceDetector(ensemble.spec.face_score))
        self.members = list(members)
        self.ensemble = ensemble
        self.executor = executor
        self.limits = limits or ClipLimits()
        # Decoded pixels all requests in flight may hold (shared with the liveness pipeline).
        self.pixels = pixels or Budget("decoded pixels", max(self.limits.max_request_pixels, 1), "pixels")
        # Threads that wait on video decodes (worker processes, up to video_timeout_s): never the CPU pool's, where
        # two slow videos held both threads and stalled every other call's decoding for 10 s.
        self.video_waits = video_executor or ThreadPoolExecutor(self.limits.videos_at_once(self.pixels.capacity),
                                                                thread_name_prefix="video-wait")
        self._in_flight = 0  # clips being embedded (read on the event loop only, for pool_chunk)

    def _decode_chunk(self, probed: ProbedClip, indices: Sequence[int], reduce: int = 1) -> list[np.ndarray]:
        clip, field = probed.clip, probed.field
        return [decode_image(clip.frames[i], self.limits.frame, f"{field}.frames[{i}].data", probed.headers[i],
                             reduce).bgr for i in indices]

    def _detection_chunk(self, probed: ProbedClip, indices: Sequence[int]
                         ) -> list[tuple[np.ndarray, DetectorInput]]:
        """Frames decoded whole with the detector's input made from each, in the same pool job."""
        return [(f, self.detector.detector.prepare(f)) for f in self._decode_chunk(probed, indices)]

    async def _decode_frames(self, probed: ProbedClip, indices: Sequence[int], reduce: int) -> list[np.ndarray]:
        """The frames at ``indices``, decoded at 1/``reduce`` scale, in parallel chunks on the pool."""
        loop = asyncio.get_running_loop()
        chunk = pool_chunk(len(indices), self._in_flight)
        parts = await gather_or_cancel(*[
            loop.run_in_executor(self.executor, self._decode_chunk, probed, indices[j:j + chunk], reduce)
            for j in range(0, len(indices), chunk)
        ])
        return [f for part in parts for f in part]

    async def _decode_and_detect(self, probed: ProbedClip, indices: Sequence[int], deadline: float | None
                                 ) -> tuple[list[np.ndarray], list[Box | None], float]:
        """The detection frames decoded whole, and the best face box in each. The detector's inputs are made in
        the decoding jobs and all submitted together, so the batcher sees them at once and spreads them over its
        instances. Also returns when decoding ended (perf_counter)."""
        loop = asyncio.get_running_loop()
        chunk = pool_chunk(len(indices), self._in_flight)
        parts = await gather_or_cancel(*[
            loop.run_in_executor(self.executor, self._detection_chunk, probed, indices[j:j + chunk])
            for j in range(0, len(indices), chunk)])
        decoded = [pair for part in parts for pair in part]
        t = time.perf_counter()
        return [f for f, _ in decoded], await self._boxes(decoded, deadline), t

    async def _boxes(self, prepared: Sequence[tuple[np.ndarray, DetectorInput]], deadline: float | None
                     ) -> list[Box | None]:
        """The best face box in each frame; all inputs are submitted together, so the batcher sees them at once
        and spreads them over its instances."""
        found = await gather_or_cancel(*[self.detector.faces(inp, deadline) for _, inp in prepared])
        return [faces[0].pixel_box(f.shape[1], f.shape[0]) if faces else None
                for (f, _), faces in zip(prepared, found, strict=True)]

    async def _decode_all(self, probed: ProbedClip) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        clip, field = probed.clip, probed.field
        if clip.video:
            abandon = threading.Event()  # set when this call ends: a cancelled call's worker stops decoding
            try:
                frames = await loop.run_in_executor(self.video_waits, decode_video, clip.video,
                                                    self.limits.video(probed.pixels), field, abandon)
            finally:
                abandon.set()
            bad = frame_count_violation(len(frames), self.limits, f"{field}.video")
            if bad:
                raise InvalidArgumentError(bad)
            if clip.apex_hint is not None and clip.apex_hint >= len(frames):
                raise InvalidArgumentError(FieldViolation(f"{field}.apex_frame",
                                                          f"must index a frame (0..{len(frames) - 1})"))
            return frames
        return await self._decode_frames(probed, range(len(clip.frames)), 1)

    async def _detect(self, frames: Sequence[np.ndarray], deadline: float | None) -> list[Box | None]:
        """Frames already decoded: their detector inputs made on the pool, then submitted together."""
        loop = asyncio.get_running_loop()
        prep = self.detector.detector.prepare
        inputs = await loop.run_in_executor(self.executor, lambda: [prep(f) for f in frames])
        return await self._boxes(list(zip(frames, inputs, strict=True)), deadline)

    async def probe(self, clip: ClipInput, field: str = "clip", video_pixels: int | None = None) -> ProbedClip:
        """Every check that needs no pixels (counts, fps, sizes from the frame headers, the pixel budget). A video's
        pixels are known only as it decodes: it may use ``video_pixels`` (default: the request's budget)."""
        validate_clip(clip, self.limits, field)
        if clip.video:
            return ProbedClip(clip, field, (), self.limits.max_request_pixels if video_pixels is None else video_pixels)
        # One pool job: a plain JPEG header is read in ~5 us (engines.vision.jpeg_header), so splitting a clip's
        # headers over several jobs cost more in thread hand-offs than it saved. Frames are read in order, so the
        # first bad one is the one reported.
        headers = await asyncio.get_running_loop().run_in_executor(
            self.executor, probe_headers, clip.frames, self.limits, field)
        return check_headers(clip, self.limits, field, headers)

    async def embed(self, clip: ClipInput | ProbedClip, deadline: float | None, field: str = "clip"
                    ) -> ClipEmbedding:
        with admitted(self.gate, deadline):  # refused here, before any work, if it would wait too long
            probed = clip if isinstance(clip, ProbedClip) else await self.probe(clip, field)
            with self.pixels.hold(probed.pixels):
                self._in_flight += 1
                try:
                    return await self._embed(probed, deadline)
                finally:
                    self._in_flight -= 1

    async def _embed(self, probed: ProbedClip, deadline: float | None) -> ClipEmbedding:
        if self.reduced_decode and probed.clip.frames and probed.clip.apex_hint is not None:
            return await self._embed_hinted(probed, deadline)
        if self.reduced_decode and probed.clip.frames:
            return await self._embed_reduced(probed, deadline)
        clip = probed.clip
        spec = self.ensemble.spec
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        frames = await self._decode_all(probed)
        t1 = time.perf_counter()
        sampled = detection_frames(len(frames), spec.detect_frames)
        boxes = await self._detect([frames[i] for i in sampled], deadline)
        box, coverage = stable_box(list(boxes))
        t2 = time.perf_counter()
        stages = Stages()
        stages.add("decode", t0, t1)
        stages.add("detect", t1, t2)
        apex = clip.apex_hint if clip.apex_hint is not None else len(frames) // 2
        if box is None:
            return self._no_face(clip, len(frames), apex, self._encoded(clip, frames, apex), stages)
        h, w = frames[0].shape[:2]
        crop = square_crop_box(box, w, h, spec.crop_scale)
        if clip.apex_hint is None:
            # Thumbnails and the motion spotting both run on the pool: neither may hold the event loop.
            apex = await loop.run_in_executor(
                self.executor, lambda: spot_apex([grey_thumbnail(f, crop) for f in frames], float(clip.fps)))
        tensor, win = await loop.run_in_executor(self.executor, model_input, frames, crop, apex, float(clip.fps),
                                                 spec)
        stages.add("window", t2, time.perf_counter())
        return await self._run_members(clip, len(frames), tensor, win, coverage, box,
                                       self._encoded(clip, frames, apex), stages, deadline)

    def _thumbnail_chunk(self, probed: ProbedClip, indices: Sequence[int], reduce: int,
                         crop: tuple[int, int, int, int]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Decode at 1/``reduce`` and cut each frame's spotter thumbnail in the same pool job (so thumbnailing is
        spread over the pool too); whole frames are returned as well, for the model window to reuse."""
        decoded = self._decode_chunk(probed, indices, reduce)
        thumbs = [grey_thumbnail(f, scaled_box(crop, reduce, f.shape)) for f in decoded]
        return thumbs, decoded if reduce == 1 else None

    async def _thumbnails(self, probed: ProbedClip, indices: Sequence[int], reduce: int,
                          crop: tuple[int, int, int, int], whole: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Spotter thumbnails of the frames at ``indices``; frames decoded whole are added to ``whole``."""
        loop = asyncio.get_running_loop()
        out: dict[int, np.ndarray] = {}
        if reduce == 1:  # frames already decoded whole are not decoded again; their thumbnails are cut on the pool
            have = [i for i in indices if i in whole]
            if have:
                out.update(zip(have, await loop.run_in_executor(
                    self.executor, lambda: [grey_thumbnail(whole[i], crop) for i in have]), strict=True))
            indices = [i for i in indices if i not in whole]
        chunk = pool_chunk(len(indices), self._in_flight)
        starts = range(0, len(indices), chunk)
        parts = await gather_or_cancel(*[
            loop.run_in_executor(self.executor, self._thumbnail_chunk, probed, indices[j:j + chunk], reduce, crop)
            for j in starts])
        for j, (thumbs, frames) in zip(starts, parts, strict=True):
            part = indices[j:j + chunk]
            out.update(zip(part, thumbs, strict=True))
            if frames is not None:
                whole.update(zip(part, frames, strict=True))
        return out

    async def _embed_reduced(self, probed: ProbedClip, deadline: float | None) -> ClipEmbedding:
        """Frames decoded only where and as large as needed: the detection frames and the model window whole; for
        the apex spotter, the frames ``SparseSpotter`` reads (a coarse pass on one frame per 20 ms, then the
        neighbourhood of its peak), where the face is large enough at the largest JPEG reduction (1/4 or 1/8)
        that still gives a 64 px crop. Frames no step reads are not decoded: their headers were checked when the
        clip was probed (format, size, truncation, the pixel budget)."""
        clip, spec = probed.clip, self.ensemble.spec
        n, fps = len(clip.frames), float(clip.fps)
        spotter = SparseSpotter(n, fps)
        t0 = time.perf_counter()
        sampled = detection_frames(n, spec.detect_frames)
        detecting = asyncio.ensure_future(self._decode_and_detect(probed, sampled, deadline))
        # Frames too small for a 1/4 spotter pass are read whole whatever the face's size: their coarse pass is
        # decoded while the detector runs (it needs no crop), filling the cores the detector leaves idle.
        early: asyncio.Future[list[np.ndarray]] | None = None
        small = min(probed.headers[0].width, probed.headers[0].height) < 4 * 2 * THUMBNAIL_SIDE
        coarse_rest = [i for i in spotter.coarse() if i not in sampled]
        if small:
            early = asyncio.ensure_future(self._decode_frames(probed, coarse_rest, 1))
        try:
            detect, boxes, t1 = await detecting
            whole = dict(zip(sampled, detect, strict=True))
            t2 = time.perf_counter()
            if early is not None:
                whole.update(zip(coarse_rest, await early, strict=True))
        finally:  # neither task outlives the call, and a failure of one is retrieved even when the other failed
            for task in (detecting, early):
                if task is not None:
                    task.cancel()  # (no effect on a finished task)
                    with contextlib.suppress(BaseException):
                        await task
        box, coverage = stable_box(list(boxes))
        if box is None:  # (a named apex never comes here: _embed_hinted takes those clips)
            # No face: a corrupt frame is reported as such rather than hidden behind "no face", so every frame
            # is decoded, at 1/8 (the cheapest proof it decodes).
            await self._decode_frames(probed, range(n), 8)
            stages = Stages()
            stages.add("decode", t0, t1)
            stages.add("detect", t1, t2)
            stages.add("decode", t2, time.perf_counter())
            return self._no_face(clip, n, n // 2, clip.frames[n // 2], stages)
        h, w = detect[0].shape[:2]
        crop = square_crop_box(box, w, h, spec.crop_scale)
        # The model window is always decoded whole: the members read micro-movements, and a window decoded at 1/2
        # (DCT-scaled, then resized) changed 4 of 70 decisions on 360x480 clips. The spotter's frames are decoded at
        # 1/4 or 1/8 where the crop allows it; below that, whole (they then double as window frames).
        spot = reduction(crop[2] - crop[0], 2 * THUMBNAIL_SIDE)
        spot = spot if spot >= 4 else 1
        loop = asyncio.get_running_loop()
        thumbs = await self._thumbnails(probed, spotter.coarse(), spot, crop, whole)
        refine = await loop.run_in_executor(self.executor, spotter.refine, thumbs)  # (numpy: off the event loop)
        thumbs.update(await self._thumbnails(probed, refine, spot, crop, whole))
        t3 = time.perf_counter()
        apex = await loop.run_in_executor(self.executor, spotter.apex, thumbs)
        t4 = time.perf_counter()
        needed = self._window_indices(n, fps, apex)
        missing = [i for i in needed if i not in whole]
        whole.update(zip(missing, await self._decode_frames(probed, missing, 1), strict=True))
        t5 = time.perf_counter()
        tensor, win = await self._window_tensor(whole, needed, n, crop, apex, fps)
        # decode: every decoding step (the spotter's include cutting its thumbnails); window: spotting and the
        # model input
        stages = Stages()
        stages.add("decode", t0, t1)
        stages.add("detect", t1, t2)
        stages.add("decode", t2, t3)
        stages.add("window", t3, t4)
        stages.add("decode", t4, t5)
        stages.add("window", t5, time.perf_counter())
        return await self._run_members(clip, n, tensor, win, coverage, box, clip.frames[apex], stages, deadline)

    async def _embed_hinted(self, probed: ProbedClip, deadline: float | None) -> ClipEmbedding:
        """The client named the apex, so nothing needs the spotter: only the detection frames and the model window
        are decoded (whole, so the model sees exactly what full decoding gives it). No other frame's pixels are
        read; their headers were checked when the clip was probed (format, size, truncation, the pixel budget)."""
        clip, spec = probed.clip, self.ensemble.spec
        assert clip.apex_hint is not None
        n, apex = len(clip.frames), clip.apex_hint
        t0 = time.perf_counter()
        sampled = detection_frames(n, spec.detect_frames)
        needed = self._window_indices(n, float(clip.fps), apex)
        wanted = sorted(set(sampled) | set(needed))
        decoded = dict(zip(wanted, await self._decode_frames(probed, wanted, 1), strict=True))
        t1 = time.perf_counter()
        boxes = await self._detect([decoded[i] for i in sampled], deadline)
        box, coverage = stable_box(list(boxes))
        t2 = time.perf_counter()
        stages = Stages()
        stages.add("decode", t0, t1)
        stages.add("detect", t1, t2)
        if box is None:
            return self._no_face(clip, n, apex, clip.frames[apex], stages)
        h, w = decoded[needed[0]].shape[:2]
        crop = square_crop_box(box, w, h, spec.crop_scale)
        tensor, win = await self._window_tensor(decoded, needed, n, crop, apex, float(clip.fps))
        stages.add("window", t2, time.perf_counter())
        return await self._run_members(clip, n, tensor, win, coverage, box, clip.frames[apex], stages, deadline)

    def _window_indices(self, n: int, fps: float, apex: int) -> list[int]:
        """The source frames the model window reads (each once, in order)."""
        spec = self.ensemble.spec
        return sorted(set(model_window(n, fps, spec.fps, spec.clip_len, apex).indices))

    async def _window_tensor(self, decoded: dict[int, np.ndarray], needed: list[int], n: int,
                             crop: tuple[int, int, int, int], apex: int, fps: float) -> tuple[np.ndarray, Window]:
        """The members' input from the decoded window frames (any other index holds a placeholder: never read)."""
        first = decoded[needed[0]]
        frames = [decoded.get(i, first) for i in range(n)]
        return await asyncio.get_running_loop().run_in_executor(self.executor, model_input, frames, crop, apex, fps,
                                                                self.ensemble.spec)

    def _no_face(self, clip: ClipInput, n: int, apex: int, apex_frame: bytes, stages: Stages) -> ClipEmbedding:
        diag = ClipDiagnostics(n, 0, 0, 0.0, apex, clip.apex_hint is not None, float(clip.fps),
                               self.ensemble.spec.fps, None)
        return ClipEmbedding(None, diag, apex_frame, stages.ms)

    async def _run_members(self, clip: ClipInput, n: int, tensor: np.ndarray, win: Window, coverage: float,
                           box: Box, apex_frame: bytes, stages: Stages, deadline: float | None) -> ClipEmbedding:
        """Every member on the window (batched across requests), and the clip's diagnostics."""
        t0 = time.perf_counter()
        outs = await gather_or_cancel(*[m.infer({"clip": tensor}, deadline) for m in self.members])
        stages.add("embed", t0, time.perf_counter())
        diag = ClipDiagnostics(n, len(set(win.indices)), win.padded, coverage, win.apex_index,
                               clip.apex_hint is not None, float(clip.fps), self.ensemble.spec.fps, box)
        embeddings = {m.name: o["embedding"].astype(np.float32) for m, o in zip(self.members, outs, strict=True)}
        return ClipEmbedding(embeddings, diag, apex_frame, stages.ms)

    @staticmethod
    def _encoded(clip: ClipInput, frames: Sequence[np.ndarray], index: int) -> bytes:
        """The encoded frame for the liveness check: the client's own bytes, or a lossless PNG of a video frame."""
        if clip.frames:
            return clip.frames[index]
        import cv2

        ok, buf = cv2.imencode(".png", frames[index])
        return buf.tobytes() if ok else b""
