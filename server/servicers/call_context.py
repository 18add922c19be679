"""Per-call helpers every servicer shares: the request id (validated, or made) and the call's deadline on the
event-loop clock."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from typing import TYPE_CHECKING

import grpc

from engines.errors import FieldViolation, InvalidArgumentError

if TYPE_CHECKING:
    from server.auth.callers import Caller

_MAX_REQUEST_ID = 128
REQUEST_ID_METADATA = "x-request-id"

# Set by the servicer once it knows the request id (its own or the client's), read by the error interceptor: the
# handler runs in the interceptor's task, so the value is visible there after the handler raises.
CURRENT_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Set by the auth interceptor once the caller is identified (a servicer runs only once it is also authorised);
# read by servicers that record who changed what, and by the metrics interceptor around it (the same task) to count
# the call under its caller.
CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
# Set by the auth interceptor when a call opens, on the event-loop clock: the caller's deadline, or the server's
# default_deadline_s from then when the caller set none. Read by deadline_from.
CURRENT_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# Set by the tracing interceptor on a sampled call (its trace id, hex); read by the metrics interceptor around it (the
# same task) to attach the call's latency to its trace as an exemplar.
CURRENT_TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)
DEFAULT_DEADLINE_S = 30.0


def caller_label() -> str:
    """The call's caller as a metrics label: a configured caller's name (never a string the client chose), else
    ``anonymous`` (authentication off) or ``none`` (no caller identified: refused, or a health check)."""
    caller = CURRENT_CALLER.get()
    if caller is None:
        return "none"
    return "anonymous" if caller.via == "loopback" else caller.name


def caller_name() -> str:
    caller = CURRENT_CALLER.get()
    return caller.name if caller is not None else ""


def metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            return str(value)
    return None


def request_id_from(explicit: str, context: grpc.aio.ServicerContext) -> str:
    """The caller's id (field, else x-request-id metadata) after validation, else a fresh one; remembered for
    error details."""
    rid = explicit or metadata_request_id(context) or ""
    if not rid:
        rid = uuid.uuid4().hex
    elif len(rid) > _MAX_REQUEST_ID or not rid.isascii() or not rid.isprintable():
        raise InvalidArgumentError(FieldViolation(
            "request_id", f"must be at most {_MAX_REQUEST_ID} printable ASCII characters"))
    CURRENT_REQUEST_ID.set(rid)
    return rid


def deadline_from(context: grpc.aio.ServicerContext, default_s: float = DEFAULT_DEADLINE_S) -> float:
    """The call's deadline on the event-loop clock: the one fixed when the call opened (CURRENT_DEADLINE), else
    ``default_s`` from now when the caller set none, so no request can hold the server's resources forever."""
    fixed = CURRENT_DEADLINE.get()
    if fixed is not None:
        return fixed
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e9:  # grpc reports "no deadline" as None or a huge value
        remaining = default_s
    return asyncio.get_running_loop().time() + remaining
