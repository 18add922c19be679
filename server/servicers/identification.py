"""IdentificationService: clips in, gallery operations and identification out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from facegate.v1 import common_pb2, identification_pb2, identification_pb2_grpc, liveness_pb2
from server.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError, UnavailableError
from server.gallery.matching import MatchDecision
from server.gallery.store import GalleryStore, validate_id
from server.pipelines.clip import ClipDiagnostics, ClipInput, ClipPipeline
from server.pipelines.liveness import LivenessPipeline, LivenessRequest
from server.pipelines.quality import QualityIssue
from server.servicers.liveness import deadline_from, request_id_from, to_proto
from server.servicers.status import CURRENT_REQUEST_ID

T = TypeVar("T")

_DECISIONS = {
    MatchDecision.UNSPECIFIED: identification_pb2.MATCH_DECISION_UNSPECIFIED,
    MatchDecision.MATCH: identification_pb2.MATCH_DECISION_MATCH,
    MatchDecision.NO_MATCH: identification_pb2.MATCH_DECISION_NO_MATCH,
    MatchDecision.UNCERTAIN: identification_pb2.MATCH_DECISION_UNCERTAIN,
}
_MAX_TOP_K = 100
_MIN_COVERAGE = 0.5


@dataclass
class IdentificationRuntime:
    """What the servicer needs once models are loaded."""

    clips: ClipPipeline
    store: GalleryStore
    db: ThreadPoolExecutor  # SQLite work runs on this single thread
    liveness: LivenessPipeline | None
    versions: list[common_pb2.ModelVersion]


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


class IdentificationServicer(identification_pb2_grpc.IdentificationServiceServicer):
    def __init__(self, runtime: Callable[[], IdentificationRuntime | None], loading: Callable[[], bool]) -> None:
        self._runtime = runtime
        self._loading = loading

    def _rt(self) -> IdentificationRuntime:
        rt = self._runtime()
        if rt is None:
            if self._loading():
                raise UnavailableError("models are still loading; retry shortly")
            raise FailedPreconditionError(
                "no identification models are installed on this server (run `make identify-models`)")
        return rt

    async def _db(self, rt: IdentificationRuntime, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(rt.db, fn, *args)

    async def _bound_collection(self, rt: IdentificationRuntime, name: str) -> None:
        validate_id(name, "collection")
        coll = await self._db(rt, rt.store.collection, name)
        ens = rt.clips.ensemble
        if coll.model_version != ens.version:
            raise FailedPreconditionError(
                f"collection {name!r} holds embeddings of model version {coll.model_version}; this server runs "
                f"{ens.name} version {ens.version}: re-enrol into a new collection")

    async def CreateCollection(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.CreateCollectionResponse:
        rt = self._rt()
        ens = rt.clips.ensemble
        coll, created = await self._db(rt, rt.store.create_collection, request.collection, ens.name, ens.version,
                                       ens.members, ens.embedding_dim)
        return identification_pb2.CreateCollectionResponse(collection=coll.name, model_version=coll.model_version,
                                                          created=created)

    async def EnrollFromClip(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.EnrollFromClipRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.EnrollFromClipResponse:
        rid = request_id_from("", context)
        CURRENT_REQUEST_ID.set(rid)
        rt = self._rt()
        validate_id(request.person_id, "person_id")
        if not request.clips:
            raise InvalidArgumentError(FieldViolation("clips", "at least one clip is needed"))
        await self._bound_collection(rt, request.collection)
        deadline = deadline_from(context)
        results = await asyncio.gather(*[
            rt.clips.embed(clip_from_proto(c), deadline, field=f"clips[{i}]") for i, c in enumerate(request.clips)
        ])
        resp = identification_pb2.EnrollFromClipResponse(person_id=request.person_id,
                                                         model_version=rt.clips.ensemble.version)
        accepted = []
        for i, r in enumerate(results):
            reason = ""
            if r.embeddings is None:
                reason = "no face found in the sampled frames"
            elif r.diagnostics.track_coverage < _MIN_COVERAGE:
                reason = (f"face found in only {r.diagnostics.track_coverage:.0%} of the sampled frames "
                          f"(need {_MIN_COVERAGE:.0%})")
            else:
                accepted.append((f"{rid}:{i}", r.embeddings))
            resp.clips.add(index=i, accepted=not reason, reason=reason,
                           diagnostics=diagnostics_to_proto(r.diagnostics))
        resp.clips_accepted = len(accepted)
        if accepted:  # nothing is written unless at least one clip is usable: no empty persons
            resp.total_clips = await self._db(rt, rt.store.enroll, request.collection, request.person_id,
                                              request.display_name, accepted)
        return resp

    async def IdentifyFromClip(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.IdentifyFromClipRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.IdentifyFromClipResponse:
        t0 = time.perf_counter()
        rid = request_id_from(request.request_id, context)
        CURRENT_REQUEST_ID.set(rid)
        rt = self._rt()
        top_k = request.top_k or 5
        if not 1 <= top_k <= _MAX_TOP_K:
            raise InvalidArgumentError(FieldViolation("top_k", f"must lie in [1, {_MAX_TOP_K}]"))
        threshold = request.threshold if request.HasField("threshold") else None
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise InvalidArgumentError(FieldViolation("threshold", "must lie in [-1, 1] (cosine similarity)"))
        if not request.HasField("clip"):
            raise InvalidArgumentError(FieldViolation("clip", "is required"))
        await self._bound_collection(rt, request.collection)
        deadline = deadline_from(context)
        result = await rt.clips.embed(clip_from_proto(request.clip), deadline)
        ens = rt.clips.ensemble
        resp = identification_pb2.IdentifyFromClipResponse(
            request_id=rid, model_version=ens.version, margin=ens.margin,
            threshold=ens.threshold if threshold is None else threshold,
            diagnostics=diagnostics_to_proto(result.diagnostics))
        resp.models.extend(rt.versions)
        t_match = time.perf_counter()
        if result.embeddings is None:
            resp.decision = identification_pb2.MATCH_DECISION_UNSPECIFIED
            resp.quality_issues.append(liveness_pb2.QUALITY_ISSUE_FACE_NOT_FOUND)
        else:
            gallery = await self._db(rt, rt.store.matrices, request.collection)
            ident = rt.clips.identify(result.embeddings,
                                      {m: (g.embeddings, g.owners) for m, g in gallery.items()}, top_k, threshold)
            names = await self._db(rt, rt.store.display_names, request.collection,
                                   [c.person for c in ident.candidates])
            resp.decision = _DECISIONS[ident.decision]
            for c in ident.candidates:
                resp.candidates.add(person_id=c.person, display_name=names.get(c.person, ""), score=c.score,
                                    votes=c.votes)
            for v in ident.votes:
                resp.votes.add(model=v.member, person_id=v.person or "", score=v.score)
        t_live = time.perf_counter()
        if request.check_liveness and rt.liveness is not None:
            live = await rt.liveness.check(LivenessRequest(result.apex_frame, deadline=deadline))
            resp.liveness.CopyFrom(to_proto(live, rid))
            if QualityIssue.FACE_NOT_FOUND in live.quality_issues and result.embeddings is not None:
                resp.quality_issues.append(liveness_pb2.QUALITY_ISSUE_FACE_NOT_FOUND)
        end = time.perf_counter()
        t = result.timings_ms
        resp.timings.CopyFrom(identification_pb2.IdentifyTimings(
            decode_ms=t.get("decode", 0.0), detect_ms=t.get("detect", 0.0), window_ms=t.get("window", 0.0),
            embed_ms=t.get("embed", 0.0), match_ms=(t_live - t_match) * 1e3, liveness_ms=(end - t_live) * 1e3,
            total_ms=(end - t0) * 1e3))
        return resp

    async def DeletePerson(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.DeletePersonRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.DeletePersonResponse:
        rt = self._rt()
        validate_id(request.collection, "collection")
        validate_id(request.person_id, "person_id")
        await self._db(rt, rt.store.delete_person, request.collection, request.person_id)
        return identification_pb2.DeletePersonResponse()

    async def ListPersons(  # noqa: N802 - gRPC method name
        self, request: identification_pb2.ListPersonsRequest, context: grpc.aio.ServicerContext
    ) -> identification_pb2.ListPersonsResponse:
        rt = self._rt()
        validate_id(request.collection, "collection")
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise InvalidArgumentError(FieldViolation("page_size", "must lie in [1, 1000]"))
        persons = await self._db(rt, rt.store.persons, request.collection, size + 1, request.page_token)
        resp = identification_pb2.ListPersonsResponse()
        for p in persons[:size]:
            resp.persons.add(person_id=p.person_id, display_name=p.display_name, clips=p.templates)
        if len(persons) > size:
            resp.next_page_token = persons[size - 1].person_id
        return resp
