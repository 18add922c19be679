"""The identification service: enrolment, identification and gallery management, transport-agnostic.

It owns the gallery store and the single thread its database work runs on, the identification pipeline and the
optional liveness check, and it holds the rules: a collection is bound to the ensemble version whose embeddings
it holds, a clip is enrolled only with enough face-track coverage, top_k and the threshold lie in their ranges,
and nothing is written unless at least one clip is usable. The gRPC servicer only maps protos to these calls.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engines.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError
from engines.identify.ensemble import Ensemble, identify
from engines.identify.matching import MatchDecision
from server.gallery.store import GalleryStore, Person, validate_id
from server.pipelines.identification import ClipDiagnostics, ClipInput, ClipPipeline
from server.pipelines.liveness import LivenessPipeline, LivenessRequest, LivenessResult
from server.pipelines.quality import QualityIssue

T = TypeVar("T")

MAX_TOP_K = 100
DEFAULT_TOP_K = 5
MIN_COVERAGE = 0.5
"""Share of the sampled frames in which a face must be found for a clip to be enrolled."""
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


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


@dataclass(frozen=True)
class Enrolment:
    person_id: str
    model_version: str
    clips: list[ClipVerdict]
    clips_accepted: int
    total_clips: int  # the person's clips in the gallery after this call (0 when nothing was written)


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
                 liveness: LivenessPipeline | None) -> None:
        self.clips = clips
        self.store = store
        self.db = db  # SQLite work runs on this single thread
        self.liveness = liveness

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

    async def create_collection(self, name: str) -> CollectionInfo:
        ens = self.ensemble
        coll, created = await self._db(self.store.create_collection, name, ens.name, ens.version, ens.members,
                                       ens.embedding_dim)
        return CollectionInfo(coll.name, coll.model_version, created)

    async def enroll(self, collection: str, person_id: str, display_name: str, clips: list[ClipInput],
                     deadline: float | None, request_id: str) -> Enrolment:
        validate_id(person_id, "person_id")
        if not clips:
            raise InvalidArgumentError(FieldViolation("clips", "at least one clip is needed"))
        await self._bound_collection(collection)
        results = await asyncio.gather(*[
            self.clips.embed(c, deadline, field=f"clips[{i}]") for i, c in enumerate(clips)
        ])
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
                accepted.append((f"{request_id}:{i}", r.embeddings))
            verdicts.append(ClipVerdict(i, not reason, reason, r.diagnostics))
        total = 0
        if accepted:  # nothing is written unless at least one clip is usable: no empty persons
            total = await self._db(self.store.enroll, collection, person_id, display_name, accepted)
        return Enrolment(person_id, self.ensemble.version, verdicts, len(accepted), total)

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
        result = await self.clips.embed(req.clip, req.deadline)
        ens = self.ensemble
        out = IdentifyResult(ens.version, ens.threshold if req.threshold is None else req.threshold, ens.margin,
                             result.diagnostics)
        t_match = time.perf_counter()
        if result.embeddings is None:
            out.quality_issues.append(QualityIssue.FACE_NOT_FOUND)
        else:
            gallery = await self._db(self.store.matrices, req.collection)
            ident = identify(ens, result.embeddings, {m: (g.embeddings, g.owners) for m, g in gallery.items()},
                             top_k, req.threshold)
            names = await self._db(self.store.display_names, req.collection, [c.person for c in ident.candidates])
            out.decision = ident.decision
            out.candidates = [RankedCandidate(c.person, names.get(c.person, ""), c.score, c.votes)
                              for c in ident.candidates]
            out.votes = [MemberVote(v.member, v.person or "", v.score) for v in ident.votes]
        t_live = time.perf_counter()
        if req.check_liveness and self.liveness is not None:
            # The liveness check runs on the apex frame of the same capture: one capture serves both checks.
            out.liveness = await self.liveness.check(LivenessRequest(result.apex_frame, deadline=req.deadline))
            if QualityIssue.FACE_NOT_FOUND in out.liveness.quality_issues and result.embeddings is not None:
                out.quality_issues.append(QualityIssue.FACE_NOT_FOUND)
        end = time.perf_counter()
        out.timings_ms = {**result.timings_ms, "match": (t_live - t_match) * 1e3, "liveness": (end - t_live) * 1e3,
                          "total": (end - t0) * 1e3}
        return out

    async def delete_person(self, collection: str, person_id: str) -> None:
        validate_id(collection, "collection")
        validate_id(person_id, "person_id")
        await self._db(self.store.delete_person, collection, person_id)

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
