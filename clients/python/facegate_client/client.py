"""A small, typed, synchronous client.

Deadlines are on by default (a call never hangs), and only UNAVAILABLE is retried (with jittered exponential
backoff): it is the one status that means the request did no work. RESOURCE_EXHAUSTED is surfaced, not
retried, so load shedding reaches the caller's own back-off logic (``retry_after(err)``: the wait the server asks
for).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

T = TypeVar("T")

DECISION_NAMES = {
    liveness_pb2.DECISION_UNSPECIFIED: "UNSPECIFIED",
    liveness_pb2.DECISION_LIVE: "LIVE",
    liveness_pb2.DECISION_SPOOF: "SPOOF",
    liveness_pb2.DECISION_UNCERTAIN: "UNCERTAIN",
}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0


@dataclass(frozen=True)
class LivenessAnswer:
    decision: str  # LIVE | SPOOF | UNCERTAIN | UNSPECIFIED
    live_score: float
    threshold: float
    quality_issues: tuple[str, ...]
    response: liveness_pb2.CheckLivenessResponse

    @classmethod
    def from_proto(cls, r: liveness_pb2.CheckLivenessResponse) -> LivenessAnswer:
        issues = tuple(liveness_pb2.QualityIssue.Name(i).removeprefix("QUALITY_ISSUE_") for i in r.quality_issues)
        return cls(DECISION_NAMES.get(r.decision, str(r.decision)), r.live_score, r.threshold, issues, r)


MATCH_NAMES = {
    identification_pb2.MATCH_DECISION_UNSPECIFIED: "UNSPECIFIED",
    identification_pb2.MATCH_DECISION_MATCH: "MATCH",
    identification_pb2.MATCH_DECISION_NO_MATCH: "NO_MATCH",
    identification_pb2.MATCH_DECISION_UNCERTAIN: "UNCERTAIN",
}
_FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def clip_from_folder(folder: Path, fps: float, apex_frame: int | None = None) -> identification_pb2.Clip:
    """A clip from a folder of frame images, ordered by the last number in each file name."""
    import re

    files = [p for p in folder.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES]

    def number(p: Path) -> tuple[int, str]:
        nums = re.findall(r"\d+", p.stem)
        return (int(nums[-1]) if nums else -1, p.name)

    clip = identification_pb2.Clip(fps=fps,
                                   frames=[common_pb2.Image(data=p.read_bytes()) for p in sorted(files, key=number)])
    if apex_frame is not None:
        clip.apex_frame = apex_frame
    return clip


D = TypeVar("D", error_details_pb2.BadRequest, error_details_pb2.RetryInfo)


def _details(err: grpc.RpcError, kind: type[D]) -> list[D]:
    """The google.rpc details of type ``kind`` that an error's status carries."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out = []
    for detail in status.details if status is not None else ():
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            out.append(message)
    return out


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations carried by an INVALID_ARGUMENT error, if any."""
    return [(v.field, v.description) for bad in _details(err, error_details_pb2.BadRequest)
            for v in bad.field_violations]


def retry_after(err: grpc.RpcError) -> float | None:
    """Seconds the server asks to wait before calling again (google.rpc.RetryInfo on RESOURCE_EXHAUSTED and
    UNAVAILABLE): over a caller's own rate, the exact time until a call is allowed; under load, the server's
    estimate. None when the error carries none. RESOURCE_EXHAUSTED is not retried by this client: this is for the
    caller's own back-off."""
    infos = _details(err, error_details_pb2.RetryInfo)
    return float(infos[0].retry_delay.ToTimedelta().total_seconds()) if infos else None


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (plaintext channels included: the server accepts
    those only on loopback or behind TLS termination the operator trusts)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        metadata = [*(client_call_details.metadata or ()), self._header]
        return continuation(client_call_details._replace(metadata=metadata), request)


def tls_credentials(ca: Path | None = None, cert: Path | None = None,
                    key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS to the server (``ca``: its CA, else the system roots); with ``cert`` and ``key``, a client certificate
    for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes() if ca else None,
                                        private_key=key.read_bytes() if key else None,
                                        certificate_chain=cert.read_bytes() if cert else None)


class FacegateClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float = 10.0,
                 retry: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, max_message_bytes: int = 16 * 1024 * 1024,
                 options: Sequence[tuple[str, object]] = ()) -> None:
        """``credentials`` (see ``tls_credentials``) for TLS / mutual TLS; ``token`` for bearer authentication."""
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes), *options]
        channel = (grpc.secure_channel(target, credentials, opts) if credentials
                   else grpc.insecure_channel(target, opts))
        self._channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
        self._liveness = liveness_pb2_grpc.LivenessServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._ident = identification_pb2_grpc.IdentificationServiceStub(self._channel)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FacegateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T]) -> T:
        backoff = self.retry.initial_backoff_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts:  # type: ignore[attr-defined]
                    raise
                time.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * self.retry.multiplier, self.retry.max_backoff_s)
        raise AssertionError("unreachable")

    def check_liveness(self, image: bytes | Path, *, threshold: float | None = None, request_id: str = "",
                       timeout_s: float | None = None) -> LivenessAnswer:
        data = image.read_bytes() if isinstance(image, Path) else image
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=data), request_id=request_id)
        if threshold is not None:
            req.threshold = threshold
        timeout = self.timeout_s if timeout_s is None else timeout_s
        resp = self._call(lambda: self._liveness.CheckLiveness(req, timeout=timeout))
        return LivenessAnswer.from_proto(resp)

    def create_collection(self, collection: str) -> identification_pb2.CreateCollectionResponse:
        req = identification_pb2.CreateCollectionRequest(collection=collection)
        return self._call(lambda: self._ident.CreateCollection(req, timeout=self.timeout_s))

    def enroll(self, collection: str, person_id: str, clips: Sequence[identification_pb2.Clip],
               display_name: str = "", timeout_s: float | None = None, append: bool = False,
               request_key: str | None = None) -> identification_pb2.EnrollFromClipResponse:
        """Create a person (``append=True``: add clips to an existing one). One request key for the call and its
        retries, so a retry after a lost reply stores nothing twice."""
        mode = identification_pb2.ENROLL_MODE_APPEND if append else identification_pb2.ENROLL_MODE_CREATE
        req = identification_pb2.EnrollFromClipRequest(collection=collection, person_id=person_id,
                                                       display_name=display_name, clips=clips, mode=mode,
                                                       request_key=request_key or uuid.uuid4().hex)
        timeout = self.timeout_s * 3 if timeout_s is None else timeout_s
        return self._call(lambda: self._ident.EnrollFromClip(req, timeout=timeout))

    def identify(self, collection: str, clip: identification_pb2.Clip, top_k: int = 5,
                 threshold: float | None = None, check_liveness: bool = False,
                 timeout_s: float | None = None) -> identification_pb2.IdentifyFromClipResponse:
        req = identification_pb2.IdentifyFromClipRequest(collection=collection, clip=clip, top_k=top_k,
                                                         check_liveness=check_liveness)
        if threshold is not None:
            req.threshold = threshold
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return self._call(lambda: self._ident.IdentifyFromClip(req, timeout=timeout))

    def delete_person(self, collection: str, person_id: str) -> None:
        req = identification_pb2.DeletePersonRequest(collection=collection, person_id=person_id)
        self._call(lambda: self._ident.DeletePerson(req, timeout=self.timeout_s))

    def list_persons(self, collection: str, page_size: int = 100) -> list[identification_pb2.PersonInfo]:
        """Every person of a collection (follows the pages)."""
        out: list[identification_pb2.PersonInfo] = []
        token = ""
        while True:
            req = identification_pb2.ListPersonsRequest(collection=collection, page_size=page_size,
                                                        page_token=token)
            resp = self._call(lambda: self._ident.ListPersons(req, timeout=self.timeout_s))  # noqa: B023
            out.extend(resp.persons)
            token = resp.next_page_token
            if not token:
                return out

    def delete_collection(self, collection: str) -> None:
        req = identification_pb2.DeleteCollectionRequest(collection=collection)
        self._call(lambda: self._ident.DeleteCollection(req, timeout=self.timeout_s))

    def list_collections(self) -> Sequence[identification_pb2.CollectionSummary]:
        return self._call(lambda: self._ident.ListCollections(identification_pb2.ListCollectionsRequest(),
                                                              timeout=self.timeout_s)).collections

    def model_statistics(self, model: str = "") -> Sequence[models_pb2.ModelStatistics]:
        req = models_pb2.GetModelStatisticsRequest(model=model)
        return self._call(lambda: self._models.GetModelStatistics(req, timeout=self.timeout_s)).models

    def list_models(self) -> Sequence[models_pb2.ModelInfo]:
        return self._call(lambda: self._models.ListModels(models_pb2.ListModelsRequest(),
                                                          timeout=self.timeout_s)).models
