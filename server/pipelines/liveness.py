"""The liveness pipeline: decode -> detect -> two crops -> two classifiers (batched across requests) -> decide.

Transport-agnostic: takes a ``LivenessRequest`` and returns a ``LivenessResult``; CPU-heavy steps (decoding,
resizing) run on a thread pool so the event loop only schedules.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from engines.errors import FieldViolation, InvalidArgumentError
from engines.specs import DETECTOR_SPEC, DetectorSpec, LivenessSpec
from engines.vision.crop import crop_for_model
from engines.vision.detection import DetectorInput, FaceDetector
from engines.vision.imaging import DecodedImage, ImageHeader, ImageLimits, decode_image, probe_image
from engines.vision.liveness_decision import DEFAULT_MARGIN, DEFAULT_THRESHOLD, Decision, decide, softmax
from server.admission import Budget, WaitGate, admitted
from server.batching.scheduler import DynamicBatcher
from server.pipelines.face_detection import BatchedFaceDetector
from server.pipelines.quality import QualityConfig, QualityIssue, assess_face
from server.stages import Stages
from server.tasks import gather_or_cancel


@dataclass(frozen=True)
class LivenessConfig:
    threshold: float = DEFAULT_THRESHOLD
    """Default decision threshold on live_score (mean live-class probability)."""
    uncertainty_margin: float = DEFAULT_MARGIN
    """live_score within +- this of the threshold is UNCERTAIN."""
    face_score_threshold: float = 0.6
    """Detections below this score do not count as faces."""
    image: ImageLimits = field(default_factory=ImageLimits)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"liveness threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 <= self.uncertainty_margin < 0.5:
            raise ValueError(f"uncertainty_margin must lie in [0, 0.5), got {self.uncertainty_margin}")
        if not 0.0 < self.face_score_threshold < 1.0:
            raise ValueError(f"face_score_threshold must lie in (0, 1), got {self.face_score_threshold}")


@dataclass(frozen=True)
class LivenessRequest:
    image: bytes
    threshold: float | None = None
    deadline: float | None = None  # event-loop clock seconds


@dataclass(frozen=True)
class FaceResult:
    box: tuple[int, int, int, int]  # x, y, w, h in upright-image pixels
    normalized: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class ModelScore:
    model: str
    probabilities: tuple[float, ...]
    live_probability: float


@dataclass
class LivenessResult:
    decision: Decision
    live_score: float
    threshold: float
    uncertainty_margin: float
    face: FaceResult | None
    quality_issues: list[QualityIssue]
    model_scores: list[ModelScore]
    image: DecodedImage
    timings_ms: dict[str, float]


def validate_threshold(threshold: float | None) -> None:
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise InvalidArgumentError(FieldViolation("threshold", f"must lie in [0, 1], got {threshold}"))


class LivenessPipeline:
    def __init__(self, detector: DynamicBatcher, classifiers: list[tuple[LivenessSpec, DynamicBatcher]],
                 config: LivenessConfig, executor: Executor, detector_spec: DetectorSpec = DETECTOR_SPEC,
                 pixels: Budget | None = None, gate: WaitGate | None = None) -> None:
        self.detector = BatchedFaceDetector(detector, FaceDetector(config.face_score_threshold, detector_spec))
        self.gate = gate
        self.classifiers = classifiers
        self.config = config
        self.executor = executor
        # Decoded pixels all requests in flight may hold (shared with the identification pipeline).
        self.pixels = pixels or Budget("decoded pixels", config.image.max_pixels, "pixels")

    def _decode_and_prepare(self, data: bytes, header: ImageHeader) -> tuple[DecodedImage, DetectorInput]:
        image = decode_image(data, self.config.image, header=header)
        return image, self.detector.detector.prepare(image.bgr)

    def _crops_and_quality(self, image: DecodedImage, box: tuple[int, int, int, int]
                           ) -> tuple[list[np.ndarray], list[QualityIssue]]:
        crops = [crop_for_model(image.bgr, box, spec.scale, spec.width, spec.height)
                 for spec, _ in self.classifiers]
        return crops, assess_face(image.bgr, box, self.config.quality)

    def admissible(self, deadline: float | None) -> None:
        """Raise ResourceExhaustedError now if a check would be shed: a call that needs one after its own work
        (IdentifyFromClip's check_liveness) is refused before that work, then checks with ``checked=True``."""
        if self.gate is not None:
            self.gate.check(deadline)

    async def check(self, req: LivenessRequest, checked: bool = False) -> LivenessResult:
        validate_threshold(req.threshold)
        # refused here, before any work, if it would wait too long (unless admissible() said so already)
        with admitted(self.gate, req.deadline, check=not checked):
            loop = asyncio.get_running_loop()
            # The header first (no pixels): the decoded size is then held from the server's pixel budget.
            header = await loop.run_in_executor(self.executor, probe_image, req.image, self.config.image)
            with self.pixels.hold(header.pixels):
                return await self._check(req, header)

    async def _check(self, req: LivenessRequest, header: ImageHeader) -> LivenessResult:
        threshold = self.config.threshold if req.threshold is None else float(req.threshold)
        margin = self.config.uncertainty_margin
        loop = asyncio.get_running_loop()
        stages = Stages()
        t0 = time.perf_counter()
        image, det_input = await loop.run_in_executor(self.executor, self._decode_and_prepare, req.image, header)
        t1 = time.perf_counter()
        stages.add("decode", t0, t1)
        faces = await self.detector.faces(det_input, req.deadline)
        t2 = time.perf_counter()
        stages.add("detect", t1, t2)
        if not faces:
            stages.ms["total"] = (t2 - t0) * 1e3
            return LivenessResult(Decision.UNSPECIFIED, 0.0, threshold, margin, None,
                                  [QualityIssue.FACE_NOT_FOUND], [], image, stages.ms)
        best = faces[0]
        box = best.pixel_box(image.width, image.height)
        crops, issues = await loop.run_in_executor(self.executor, self._crops_and_quality, image, box)
        if len(faces) > 1:
            issues.insert(0, QualityIssue.MULTIPLE_FACES)
        t3 = time.perf_counter()
        stages.add("crop", t2, t3)
        outputs = await gather_or_cancel(*[
            batcher.infer({"input": crop}, req.deadline)
            for (_, batcher), crop in zip(self.classifiers, crops, strict=True)
        ])
        t4 = time.perf_counter()
        stages.add("classify", t3, t4)
        scores = []
        for (spec, batcher), out in zip(self.classifiers, outputs, strict=True):
            probs = softmax(out["logits"].astype(np.float64))
            scores.append(ModelScore(batcher.name, tuple(float(p) for p in probs), float(probs[spec.live_class])))
        live_score = float(np.mean([s.live_probability for s in scores]))
        stages.ms["total"] = (t4 - t0) * 1e3
        x, y, w, h = box
        face = FaceResult(box, (x / image.width, y / image.height, w / image.width, h / image.height), best.score)
        return LivenessResult(decide(live_score, threshold, margin), live_score, threshold, margin, face, issues,
                              scores, image, stages.ms)
