"""The detector as both pipelines call it: prepared inputs through the detector's dynamic batcher, decoded by the
shared ``FaceDetector`` (the same code training uses)."""

from __future__ import annotations

from engines.vision.detection import Detection, DetectorInput, FaceDetector
from server.batching.scheduler import DynamicBatcher


class BatchedFaceDetector:
    def __init__(self, batcher: DynamicBatcher, detector: FaceDetector) -> None:
        self.batcher = batcher
        self.detector = detector

    async def faces(self, inp: DetectorInput, deadline: float | None) -> list[Detection]:
        # Decoding and NMS run on the engine thread (finish), off the event loop.
        faces: list[Detection] = await self.batcher.infer(self.detector.feed(inp), deadline,
                                                          finish=lambda out: self.detector.faces(out, inp))
        return faces
