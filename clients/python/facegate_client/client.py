"""A small, typed, synchronous client.

Deadlines are on by default (a call never hangs), and only UNAVAILABLE is retried (with jittered exponential
backoff): it is the one status that means the request did no work. RESOURCE_EXHAUSTED is surfaced, not
retried, so load shedding reaches the caller's own back-off logic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc, models_pb2, models_pb2_grpc

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


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations carried by an INVALID_ARGUMENT error, if any."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: list[tuple[str, str]] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


class FacegateClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float = 10.0,
                 retry: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 16 * 1024 * 1024) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._liveness = liveness_pb2_grpc.LivenessServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
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

    def model_statistics(self, model: str = "") -> Sequence[models_pb2.ModelStatistics]:
        req = models_pb2.GetModelStatisticsRequest(model=model)
        return self._call(lambda: self._models.GetModelStatistics(req, timeout=self.timeout_s)).models

    def list_models(self) -> Sequence[models_pb2.ModelInfo]:
        return self._call(lambda: self._models.ListModels(models_pb2.ListModelsRequest(),
                                                          timeout=self.timeout_s)).models
