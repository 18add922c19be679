"""The identification service: enrolment, identification and gallery management, transport-agnostic.

It owns the gallery store and the single thread its database work runs on, the identification pipeline and the
optional liveness check, and it holds the rules: a collection is bound to the ensemble version whose embeddings
it holds, a clip is enrolled only with enough face-track coverage, top_k and the threshold lie in their ranges,
and nothing is written unless at least one clip is usable. The gRPC servicer only maps protos to these calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engines.errors import FacegateError, FailedPreconditionError, FieldViolation, InvalidArgumentError
from engines.identify.ensemble import Ensemble, combine
from engines.identify.matching import MatchDecision
from server.audit import AuditLog
from server.gallery.search import Gallery
from server.gallery.store import CollectionSummary, EnrollMode, EnrollOutcome, GalleryStore, Person, validate_id
from server.pipelines.clip_input import ClipInput, video_share
from server.pipelines.identification import ClipDiagnostics, ClipPipeline
from server.pipelines.liveness import LivenessPipeline, LivenessRequest, LivenessResult
from server.pipelines.quality import QualityIssue
from server.stages import Stages, as_part
from server.tasks import gather_or_cancel

T = TypeVar("T")

MAX_TOP_K = 100
DEFAULT_TOP_K = 5
MIN_COVERAGE = 0.5
"""Share of the sampled frames in which a face must be found for a clip to be enrolled."""
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_DISPLAY_NAME = 256
SEARCH_CANDIDATES = 10
"""Persons each member contributes to the candidate set (at least top_k); all are scored by every member."""
MAX_REQUEST_KEY = 128


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model_version: str
    created: bool


@dataclass(frozen=True)
class ClipVerdict:
    index: int
    accepted: bool
    reason: str
    diagnostics: ClipDiagnostics
    decode_ms: float = 0.0  # for the decode metric: each clip of an enrolment is decoded on its own


@dataclass(frozen=True)
class Enrolment:
    person_id: str
    model_version: str
    clips: list[ClipVerdict]
    clips_accepted: int
    total_clips: int  # the person's clips in the gallery after this call (0 when nothing was written)
    replayed: bool = False  # a retry of an enrolment already stored: nothing was written


@dataclass(frozen=True)
class EnrollRequest:
    collection: str
    person_id: str
    display_name: str
    clips: list[ClipInput]
    mode: EnrollMode = EnrollMode.CREATE
    request_key: str = ""  # "": derived from the request's content
    deadline: float | None = None
    request_id: str = ""
    caller: str = ""


def validate_display_name(name: str) -> None:
    if len(name) > MAX_DISPLAY_NAME or not name.isprintable():
        raise InvalidArgumentError(FieldViolation(
            "display_name", f"must be at most {MAX_DISPLAY_NAME} printable characters (got {len(name)})"))


def derive_request_key(req: EnrollRequest) -> str:
    """A retry of the same call (same caller, target, mode and clips) gets the same key. Blocking (hashes up to
    the message size): run it on the thread pool."""
    h = hashlib.sha256()
    for part in (req.caller, req.collection, req.person_id, req.mode.value):
        h.update(part.encode() + b"\0")
    for clip in req.clips:
        h.update(f"{clip.fps!r}:{clip.apex_hint}:{len(clip.frames)}".encode())
        h.update(hashlib.sha256(clip.video).digest())
        for f in clip.frames:
            h.update(hashlib.sha256(f).digest())
    return "derived:" + h.hexdigest()


@dataclass(frozen=True)
class IdentifyRequest:
    collection: str
    clip: ClipInput | None
    top_k: int = 0  # 0: the default
    threshold: float | None = None
    check_liveness: bool = False
    deadline: float | None = None


@dataclass(frozen=True)
class RankedCandidate:
    person_id: str
    display_name: str
    score: float
    votes: int


@dataclass(frozen=True)
class MemberVote:
    model: str
    person_id: str
    score: float


@dataclass
class IdentifyResult:
    model_version: str
    threshold: float
    margin: float
    diagnostics: ClipDiagnostics
    decision: MatchDecision = MatchDecision.UNSPECIFIED
    candidates: list[RankedCandidate] = field(default_factory=list)
    votes: list[MemberVote] = field(default_factory=list)
    quality_issues: list[QualityIssue] = field(default_factory=list)
    liveness: LivenessResult | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class IdentificationService:
    def __init__(self, clips: ClipPipeline, store: GalleryStore, db: ThreadPoolExecutor,
                 liveness: LivenessPipeline | None, audit: AuditLog | None = None) -> None:
        self.clips = clips
        self.store = store
        self.gallery = Gallery(store)  # the in-memory search index, kept in step with the change log
        self.db = db  # gallery writes and reads run on these threads
        self.liveness = liveness
        self.audit = audit

    @property
    def ensemble(self) -> Ensemble:
        return self.clips.ensemble

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.db, fn, *args)

    async def _bound_collection(self, name: str) -> None:
        validate_id(name, "collection")
        coll = await self._db(self.store.collection, name)
        ens = self.ensemble
        if coll.model_version != ens.version:
            raise FailedPreconditionError(
                f"collection {name!r} holds embeddings of model version {coll.model_version}; this server runs "
                f"{ens.name} version {ens.version}: re-enrol into a new collection")

    async def create_collection(self, name: str, caller: str = "", request_id: str = "") -> CollectionInfo:
        ens = self.ensemble
        coll, created = await self._db(self.store.create_collection, name, ens.name, ens.version, ens.members,
                                       ens.embedding_dim)
        if created and self.audit is not None:
            self.audit.record(rpc="CreateCollection", caller=caller, outcome="created", collection=name,
                              request_id=request_id)
        return CollectionInfo(coll.name, coll.model_version, created)

    async def enroll(self, req: EnrollRequest) -> Enrolment:
        validate_id(req.person_id, "person_id")
        validate_display_name(req.display_name)
        if not req.clips:
            raise InvalidArgumentError(FieldViolation("clips", "at least one clip is needed"))
        limits = self.clips.limits
        if len(req.clips) > limits.max_clips:
            raise InvalidArgumentError(FieldViolation(
                "clips", f"has {len(req.clips)} clips, over the limit of {limits.max_clips} per request"))
        if len(req.request_key) > MAX_REQUEST_KEY or not req.request_key.isprintable():
            raise InvalidArgumentError(FieldViolation(
                "request_key", f"must be at most {MAX_REQUEST_KEY} printable characters"))
        await self._bound_collection(req.collection)
        # Every clip's headers are checked, and the request's total pixels bounded, before any frame is decoded;
        # the videos then share what the frames leave, each held to its share as it decodes.
        framed = {i: await self.clips.probe(c, f"clips[{i}]") for i, c in enumerate(req.clips) if not c.video}
        pixels = sum(p.pixels for p in framed.values())
        if pixels > limits.max_request_pixels:
            raise InvalidArgumentError(FieldViolation(
                "clips", f"decode to {pixels} pixels, over the request budget of {limits.max_request_pixels}"))
        share = video_share(req.clips, pixels, limits)
        probed = [framed[i] if i in framed else await self.clips.probe(c, f"clips[{i}]", share)
                  for i, c in enumerate(req.clips)]
        loop = asyncio.get_running_loop()
        key = req.request_key or await loop.run_in_executor(self.clips.executor, derive_request_key, req)
        results = await gather_or_cancel(*[as_part(f"clip {i}", i, self.clips.embed(p, req.deadline))
                                           for i, p in enumerate(probed)])
        verdicts: list[ClipVerdict] = []
        accepted = []
        for i, r in enumerate(results):
            reason = ""
            if r.embeddings is None:
                reason = "no face found in the sampled frames"
            elif r.diagnostics.track_coverage < MIN_COVERAGE:
                reason = (f"face found in only {r.diagnostics.track_coverage:.0%} of the sampled frames "
                          f"(need {MIN_COVERAGE:.0%})")
            else:
                accepted.append((f"{req.request_id}:{i}", r.embeddings))
            verdicts.append(ClipVerdict(i, not reason, reason, r.diagnostics, r.timings_ms.get("decode", 0.0)))
        outcome = EnrollOutcome(0, False)
        if accepted:  # nothing is written unless at least one clip is usable: no empty persons
            try:
                outcome = await self._db(self.store.enroll, req.collection, req.person_id, req.display_name,
                                         accepted, req.mode, req.caller, key)
            except FacegateError as err:
                self._audit(req, type(err).__name__)
                raise
            self._audit(req, "replayed" if outcome.replayed else f"enrolled {len(accepted)} clip(s)")
        else:
            self._audit(req, "no clip accepted")
        return Enrolment(req.person_id, self.ensemble.version, verdicts, len(accepted), outcome.total_clips,
                         outcome.replayed)

    def _audit(self, req: EnrollRequest, outcome: str) -> None:
        if self.audit is not None:
            self.audit.record(rpc=f"EnrollFromClip/{req.mode.value}", caller=req.caller, outcome=outcome,
                              collection=req.collection, person_id=req.person_id, request_id=req.request_id)

    async def identify(self, req: IdentifyRequest) -> IdentifyResult:
        t0 = time.perf_counter()
        top_k = req.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgumentError(FieldViolation("top_k", f"must lie in [1, {MAX_TOP_K}]"))
        if req.threshold is not None and not (math.isfinite(req.threshold) and -1.0 <= req.threshold <= 1.0):
            raise InvalidArgumentError(FieldViolation("threshold", "must lie in [-1, 1] (cosine similarity)"))
        if req.clip is None:
            raise InvalidArgumentError(FieldViolation("clip", "is required"))
        await self._bound_collection(req.collection)
        liveness = self.liveness if req.check_liveness else None
        if liveness is not None:
            # Shed now, not after the clip's work: a liveness check refused at the end threw that work away.
            liveness.admissible(req.deadline)
        result = await self.clips.embed(req.clip, req.deadline)
        ens = self.ensemble
        out = IdentifyResult(ens.version, ens.threshold if req.threshold is None else req.threshold, ens.margin,
                             result.diagnostics)
        t_match = time.perf_counter()
        if result.embeddings is None:
            out.quality_issues.append(QualityIssue.FACE_NOT_FOUND)
        else:
            # The sequence check, any catch-up and the search are CPU and database work proportional to the
            # gallery: on the pool, never on the event loop. Every member's top m persons, scored exactly by all.
            embeddings = result.embeddings
            ident = await asyncio.get_running_loop().run_in_executor(self.clips.executor, lambda: combine(
                ens, self.gallery.search(req.collection, embeddings, max(top_k, SEARCH_CANDIDATES)), top_k,
                req.threshold))
            names = await self._db(self.store.display_names, req.collection, [c.person for c in ident.candidates])
            out.decision = ident.decision
            out.candidates = [RankedCandidate(c.person, names.get(c.person, ""), c.score, c.votes)
                              for c in ident.candidates]
            out.votes = [MemberVote(v.member, v.person or "", v.score) for v in ident.votes]
        t_live = time.perf_counter()
        if liveness is not None:
            # The liveness check runs on the apex frame of the same capture: one capture serves both checks.
            out.liveness = await liveness.check(LivenessRequest(result.apex_frame, deadline=req.deadline),
                                                checked=True)
            if QualityIssue.FACE_NOT_FOUND in out.liveness.quality_issues and result.embeddings is not None:
                out.quality_issues.append(QualityIssue.FACE_NOT_FOUND)
        end = time.perf_counter()
        stages = Stages()
        stages.ms.update(result.timings_ms)
        stages.add("match", t_match, t_live)
        if liveness is not None:
            stages.add("liveness", t_live, end)
        stages.ms["total"] = (end - t0) * 1e3
        out.timings_ms = stages.ms
        return out

    async def delete_person(self, collection: str, person_id: str, caller: str = "", request_id: str = "") -> None:
        validate_id(collection, "collection")
        validate_id(person_id, "person_id")
        outcome = "deleted"
        try:
            await self._db(self.store.delete_person, collection, person_id)
        except FacegateError as err:
            outcome = type(err).__name__
            raise
        finally:
            if self.audit is not None:
                self.audit.record(rpc="DeletePerson", caller=caller, collection=collection, person_id=person_id,
                                  request_id=request_id, outcome=outcome)

    async def delete_collection(self, collection: str, caller: str = "", request_id: str = "") -> None:
        outcome = "deleted"
        try:
            await self._db(self.store.delete_collection, collection)
        except FacegateError as err:
            outcome = type(err).__name__
            raise
        finally:
            if self.audit is not None:
                self.audit.record(rpc="DeleteCollection", caller=caller, collection=collection,
                                  request_id=request_id, outcome=outcome)

    async def list_collections(self) -> list[CollectionSummary]:
        return await self._db(self.store.collections)

    async def list_persons(self, collection: str, page_size: int, page_token: str) -> tuple[list[Person], str]:
        """One page of persons and the token of the next page ("" on the last)."""
        validate_id(collection, "collection")
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgumentError(FieldViolation("page_size", f"must lie in [1, {MAX_PAGE_SIZE}]"))
        persons = await self._db(self.store.persons, collection, size + 1, page_token)
        return persons[:size], persons[size - 1].person_id if len(persons) > size else ""

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.db, self.store.close)
