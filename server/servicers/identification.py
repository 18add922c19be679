"""IdentificationService over gRPC: protos to ``server.services.identification`` calls and back, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from engines.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError, UnavailableError
from engines.identify.matching import MatchDecision
from facegate.v1 import common_pb2, identification_pb2, identification_pb2_grpc
from server.gallery.store import EnrollMode
from server.metrics import Metrics
from server.pipelines.clip_input import ClipInput
from server.pipelines.identification import ClipDiagnostics
from server.servicers.call_context import caller_name, deadline_from, request_id_from
from server.servicers.liveness import ISSUES, to_proto
from server.services.identification import EnrollRequest, IdentificationService, IdentifyRequest, IdentifyResult

_MODES = {
    identification_pb2.ENROLL_MODE_UNSPECIFIED: EnrollMode.CREATE,
    identification_pb2.ENROLL_MODE_CREATE: EnrollMode.CREATE,
    identification_pb2.ENROLL_MODE_APPEND: EnrollMode.APPEND,
}
_DECISIONS = {
    MatchDecision.UNSPECIFIED: identification_pb2.MATCH_DECISION_UNSPECIFIED,
    MatchDecision.MATCH: identification_pb2.MATCH_DECISION_MATCH,
    MatchDecision.NO_MATCH: identification_pb2.MATCH_DECISION_NO_MATCH,
    MatchDecision.UNCERTAIN: identification_pb2.MATCH_DECISION_UNCERTAIN,
}


def clip_from_proto(clip: identification_pb2.Clip) -> ClipInput:
    return ClipInput(frames=[f.data for f in clip.frames], fps=clip.fps,
                     apex_hint=clip.apex_frame if clip.HasField("apex_frame") else None, video=clip.video)


def diagnostics_to_proto(d: ClipDiagnostics) -> identification_pb2.ClipDiagnostics:
    msg = identification_pb2.ClipDiagnostics(
        frames_received=d.frames_received, frames_used=d.frames_used, padded_frames=d.padded_frames,
        track_coverage=d.track_coverage, apex_index=d.apex_index, apex_from_hint=d.apex_from_hint,
        capture_fps=d.capture_fps, model_fps=d.model_fps, resample_step=d.resample_step)
    if d.face_box is not None:
        x, y, w, h = d.face_box
        msg.face_box.CopyFrom(common_pb2.PixelBox(x=x, y=y, width=w, height=h))
    return msg


def identify_to_proto(r: IdentifyResult, request_id: str) -> identification_pb2.IdentifyFromClipResponse:
    resp = identification_pb2.IdentifyFromClipResponse(
        request_id=request_id, model_version=r.model_version, margin=r.margin, threshold=r.threshold,
        diagnostics=diagnostics_to_proto(r.diagnostics), decision=_DECISIONS[r.decision],
        quality_issues=[ISSUES[i] for i in r.quality_issues])
    for c in r.candidates:
        resp.candidates.add(person_id=c.person_id, display_name=c.display_name, score=c.score, votes=c.votes)
    for v in r.votes:
        resp.votes.add(model=v.model, person_id=v.person_id, score=v.score)
    if r.liveness is not None:
        resp.liveness.CopyFrom(to_proto(r.liveness, request_id))
    t = r.timings_ms
    resp.timings.CopyFrom(identification_pb2.IdentifyTimings(
        decode_ms=t.get("decode", 0.0), detect_ms=t.get("detect", 0.0), window_ms=t.get("window", 0.0),
        embed_ms=t.get("embed", 0.0), match_ms=t.get("match", 0.0), liveness_ms=t.get("liveness", 0.0),
        total_ms=t.get("total", 0.0)))
    return resp


class IdentificationServicer(identification_pb2_grpc.IdentificationServiceServicer):
    def __init__(self, service: Callable[[], IdentificationService | None], loading: Callable[[], bool],
                 versions: Callable[[], list[common_pb2.ModelVersion]], metrics: Metrics | None = None) -> None:
        # Callables, because the service appears only once the models are loaded and warm.
        self._service = service
        self._loading = loading
        self._versions = versions
        self._metrics = metrics

    def _svc(self) -> IdentificationService:
        svc = self._service()
        if svc is None:
            if self._loading():
                raise UnavailableError("models are still loading; retry shortly")
            raise FailedPreconditionError(
                "no identification models are installed on this server (run `make identify-models`)")
        return svc

    def _observe_decode(self, clip: identification_pb2.Clip, decode_ms: float) -> None:
        if self._metrics is not None:  # a video decodes in a worker process, frames on the pool: seconds apart
            self._metrics.decode.labels("video" if clip.video else "clip").observe(decode_ms / 1e3)

    async def CreateCollection(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.CreateCollectionResponse:
        rid = request_id_from("", context)
        info = await self._svc().create_collection(request.collection, caller_name(), rid)
        return identification_pb2.CreateCollectionResponse(collection=info.name, model_version=info.model_version,
                                                          created=info.created)

    async def EnrollFromClip(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.EnrollFromClipRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.EnrollFromClipResponse:
        rid = request_id_from("", context)
        svc = self._svc()
        if request.mode not in _MODES:
            raise InvalidArgumentError(FieldViolation("mode", f"unknown enrolment mode {request.mode}"))
        result = await svc.enroll(EnrollRequest(
            collection=request.collection, person_id=request.person_id, display_name=request.display_name,
            clips=[clip_from_proto(c) for c in request.clips], mode=_MODES[request.mode],
            request_key=request.request_key, deadline=deadline_from(context), request_id=rid, caller=caller_name()))
        resp = identification_pb2.EnrollFromClipResponse(
            person_id=result.person_id, model_version=result.model_version, clips_accepted=result.clips_accepted,
            total_clips=result.total_clips, replayed=result.replayed)
        for v in result.clips:
            self._observe_decode(request.clips[v.index], v.decode_ms)
            resp.clips.add(index=v.index, accepted=v.accepted, reason=v.reason,
                           diagnostics=diagnostics_to_proto(v.diagnostics))
        return resp

    async def IdentifyFromClip(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.IdentifyFromClipRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.IdentifyFromClipResponse:
        rid = request_id_from(request.request_id, context)
        svc = self._svc()
        result = await svc.identify(IdentifyRequest(
            collection=request.collection,
            clip=clip_from_proto(request.clip) if request.HasField("clip") else None,
            top_k=request.top_k, threshold=request.threshold if request.HasField("threshold") else None,
            check_liveness=request.check_liveness, deadline=deadline_from(context)))
        self._observe_decode(request.clip, result.timings_ms.get("decode", 0.0))
        resp = identify_to_proto(result, rid)
        resp.models.extend(self._versions())
        return resp

    async def DeletePerson(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.DeletePersonRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.DeletePersonResponse:
        rid = request_id_from("", context)
        await self._svc().delete_person(request.collection, request.person_id, caller_name(), rid)
        return identification_pb2.DeletePersonResponse()

    async def ListPersons(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.ListPersonsRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.ListPersonsResponse:
        persons, token = await self._svc().list_persons(request.collection, request.page_size, request.page_token)
        resp = identification_pb2.ListPersonsResponse(next_page_token=token)
        for p in persons:
            resp.persons.add(person_id=p.person_id, display_name=p.display_name, clips=p.templates)
        return resp

    async def DeleteCollection(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.DeleteCollectionResponse:
        rid = request_id_from("", context)
        await self._svc().delete_collection(request.collection, caller_name(), rid)
        return identification_pb2.DeleteCollectionResponse()

    async def ListCollections(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.ListCollectionsResponse:
        resp = identification_pb2.ListCollectionsResponse()
        for c in await self._svc().list_collections():
            resp.collections.add(collection=c.name, model_version=c.model_version, persons=c.persons)
        return resp
