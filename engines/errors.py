"""Typed domain errors. Raised below the servicers; mapped to gRPC status codes in one place
(``server.servicers.error_interceptor``), so nothing below the servicers imports grpc."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request field, dotted (e.g. "image.data", "threshold")
    description: str


class FacegateError(Exception):
    """Base of every error a client may see. The message is safe to show: no paths, no biometric data."""


class InvalidArgumentError(FacegateError):
    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class ResourceExhaustedError(FacegateError):
    """A bounded queue is full; the client should back off and retry (after ``retry_after_s`` when known)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitedError(ResourceExhaustedError):
    """A caller over its own rate: ``retry_after_s`` is when it may call again, exactly, not an estimate."""


class DeadlineExceededError(FacegateError):
    """The request's deadline passed before its work could run."""


class NotFoundError(FacegateError):
    pass


class FailedPreconditionError(FacegateError):
    pass


class UnavailableError(FacegateError):
    """Not ready yet, or draining for shutdown."""


class InternalError(FacegateError):
    """Something failed on our side; the client sees a generic message, the log has the details."""


class UnrecoverableError(FacegateError):
    """The server cannot serve any more (an engine broke); health flips to NOT_SERVING."""


class AlreadyExistsError(FacegateError):
    """What the request would create exists already (e.g. a person id on an enrolment that creates)."""


class UnauthenticatedError(FacegateError):
    """No valid caller identity (no credential, or one that matches no configured caller)."""


class PermissionDeniedError(FacegateError):
    """The caller is known but lacks the scope the call needs."""
