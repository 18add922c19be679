"""LivenessService: CheckLivenessRequest -> LivenessRequest -> pipeline -> CheckLivenessResponse."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from engines.errors import UnavailableError
from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc
from server.metrics import Metrics
from server.pipelines.liveness import Decision, LivenessPipeline, LivenessRequest, LivenessResult
from server.pipelines.quality import QualityIssue
from server.servicers.call_context import deadline_from, request_id_from

_DECISIONS = {
    Decision.UNSPECIFIED: liveness_pb2.DECISION_UNSPECIFIED,
    Decision.LIVE: liveness_pb2.DECISION_LIVE,
    Decision.SPOOF: liveness_pb2.DECISION_SPOOF,
    Decision.UNCERTAIN: liveness_pb2.DECISION_UNCERTAIN,
}
ISSUES = {issue: liveness_pb2.QualityIssue.Value(f"QUALITY_ISSUE_{issue.name}") for issue in QualityIssue}


def to_proto(result: LivenessResult, request_id: str) -> liveness_pb2.CheckLivenessResponse:
    resp = liveness_pb2.CheckLivenessResponse(
        request_id=request_id,
        decision=_DECISIONS[result.decision],
        live_score=result.live_score,
        threshold=result.threshold,
        uncertainty_margin=result.uncertainty_margin,
        quality_issues=[ISSUES[i] for i in result.quality_issues],
        image=common_pb2.ImageInfo(width=result.image.width, height=result.image.height,
                                   format=result.image.format, exif_orientation=result.image.exif_orientation),
    )
    if result.face is not None:
        x, y, w, h = result.face.box
        nx, ny, nw, nh = result.face.normalized
        resp.face.box.CopyFrom(common_pb2.PixelBox(x=x, y=y, width=w, height=h))
        resp.face.normalized_box.CopyFrom(common_pb2.NormalizedBox(x=nx, y=ny, width=nw, height=nh))
        resp.face.detection_score = result.face.score
    for s in result.model_scores:
        resp.model_scores.add(model=s.model, probabilities=s.probabilities, live_probability=s.live_probability)
    t = result.timings_ms
    resp.timings.CopyFrom(liveness_pb2.StageTimings(
        decode_ms=t.get("decode", 0.0), detect_ms=t.get("detect", 0.0), crop_ms=t.get("crop", 0.0),
        classify_ms=t.get("classify", 0.0), total_ms=t.get("total", 0.0)))
    return resp


class LivenessServicer(liveness_pb2_grpc.LivenessServiceServicer):
    def __init__(self, pipeline: Callable[[], LivenessPipeline | None],
                 versions: Callable[[], list[common_pb2.ModelVersion]], metrics: Metrics | None = None) -> None:
        # Callables, because the pipeline appears only once the models are loaded and warm.
        self._pipeline = pipeline
        self._versions = versions
        self._metrics = metrics

    async def CheckLiveness(  # noqa: N802 - gRPC method name
        self, request: liveness_pb2.CheckLivenessRequest, context: grpc.aio.ServicerContext
    ) -> liveness_pb2.CheckLivenessResponse:
        rid = request_id_from(request.request_id, context)
        pipeline = self._pipeline()
        if pipeline is None:
            raise UnavailableError("models are still loading; retry shortly")
        req = LivenessRequest(
            image=request.image.data,
            threshold=request.threshold if request.HasField("threshold") else None,
            deadline=deadline_from(context),
        )
        result = await pipeline.check(req)
        if self._metrics is not None:
            self._metrics.decode.labels("image").observe(result.timings_ms.get("decode", 0.0) / 1e3)
        resp = to_proto(result, rid)
        resp.models.extend(self._versions())
        await context.send_initial_metadata((("x-request-id", rid),))
        return resp
