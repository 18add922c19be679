"""Authentication, authorisation and admission for every RPC, before its request message is received.

Every unary method is served as a stream-unary one, whose handler runs as soon as the call opens: the caller is
identified and its scope checked, and the call admitted (wait gate, calls budget), before the request's bytes are
read. A plain unary handler is handed its message only once gRPC has received all of it: a refused caller could
make the server hold up to ``max_message_bytes`` (16 MiB) per call first (64 unauthenticated 15 MiB calls took
the server from 0.4 to 1.5 GiB). The bytes are then taken from the request-bytes budget, parsed and handed to
the servicer; collection-limited scopes are checked right after parsing (the collection is a request field). Every
refusal goes to the audit log. Health needs no credential, so its checks and every stream (health watches,
reflection) are held to a budget of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from engines.errors import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.admission import Budget, CallerAdmission, PerCaller, WaitGate, bucket_size
from server.audit import AuditLog
from server.auth.callers import Authenticator, Caller, bearer_token, certificate_identities
from server.auth.costs import Units, units_by_method
from server.auth.scopes import COLLECTION_SCOPES, grants, required_scope
from server.servicers.call_context import (
    CURRENT_CALLER,
    CURRENT_DEADLINE,
    DEFAULT_DEADLINE_S,
    deadline_from,
    metadata_request_id,
)
from server.servicers.error_interceptor import parse_request
from server.servicers.streams import relay


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, audit: AuditLog, request_bytes: Budget,
                 calls: Budget | None = None, gates: Mapping[str, WaitGate] | None = None,
                 side: Budget | None = None, default_deadline_s: float = DEFAULT_DEADLINE_S,
                 per_caller: CallerAdmission | None = None, streams: Budget | None = None) -> None:
        self._auth = authenticator
        self._audit = audit
        self._bytes = request_bytes
        self._calls = calls or Budget("calls in flight", 1 << 30, "calls")
        # Health checks (no credential) and streams (each open as long as its client likes): bounded apart from the
        # calls, so that they can never take the gRPC slots the calls need.
        self._side = side or Budget("health checks and streams", 1 << 30, "calls")
        # Streams hold part of that budget only: the rest is kept for health checks (the probes).
        self._stream_slots = streams or Budget("streams", 1 << 30, "calls")
        # Full method name -> the wait gate of the pipeline it enters: while that pipeline sheds, its calls are
        # refused here, before their request is received or any servicer code runs (the pipeline itself checks
        # again, with the deadline).
        self._gates = dict(gates or {})
        self._default_deadline_s = default_deadline_s
        # Each caller's own max_in_flight and rate_per_s: in this process, or shared by a server's workers.
        self._per_caller = per_caller or PerCaller()
        self._streams: set[asyncio.Task[Any]] = set()  # the tasks serving open streams (event loop only)
        self._closing = False

    def _refuse(self, err: Exception, method: str, context: grpc.aio.ServicerContext, caller: str,
                collection: str = "") -> Exception:
        outcome = "unauthenticated" if isinstance(err, UnauthenticatedError) else "permission_denied"
        self._audit.record(rpc=method, caller=caller, outcome=outcome, collection=collection,
                           request_id=metadata_request_id(context) or "", reason=str(err))
        return err

    def identify(self, context: grpc.aio.ServicerContext, method: str, scope: str) -> Caller:
        if not self._auth.enabled:
            CURRENT_CALLER.set(anonymous := self._auth.anonymous())
            return anonymous
        token = bearer_token(context.invocation_metadata())
        caller: Caller | None = None
        claimed = ""
        if token is not None:
            caller = self._auth.from_token(token)
            claimed = "(bearer token)"
        else:
            identities = certificate_identities(context.auth_context() or {})
            caller = self._auth.from_certificate(identities) if identities else None
            claimed = identities[0] if identities else ""
        if caller is None:
            why = ("the bearer token matches no configured caller" if token is not None else
                   f"client certificate {claimed!r} matches no configured caller" if claimed else
                   "no credential: send 'authorization: Bearer <token>' metadata or a client certificate")
            raise self._refuse(UnauthenticatedError(why), method, context, claimed)
        CURRENT_CALLER.set(caller)  # (also what the metrics count the call under, refused from here on or not)
        if not grants(caller.scopes, scope):
            raise self._refuse(PermissionDeniedError(f"caller {caller.name!r} lacks the {scope!r} scope"),
                               method, context, caller.name)
        return caller

    def install(self, authenticator: Authenticator) -> None:
        """New credentials (server.auth.reload), for every check made from now on."""
        self._auth = authenticator

    def check_collection(self, caller: Caller, scope: str, request: Any, method: str,
                         context: grpc.aio.ServicerContext) -> None:
        collection = getattr(request, "collection", None)
        if scope in COLLECTION_SCOPES and isinstance(collection, str) and not grants(caller.scopes, scope,
                                                                                      collection):
            raise self._refuse(PermissionDeniedError(
                f"caller {caller.name!r} lacks the {scope!r} scope on collection {collection!r}"),
                method, context, caller.name, collection)

    def _charge(self, caller: Caller, cost: float, units: Units, request: Any) -> None:
        """The whole cost of a parsed request of several ``units`` (its clips, its batch), taken from its caller's
        bucket; refused, with nothing taken, when the bucket does not hold it yet (RESOURCE_EXHAUSTED, RetryInfo),
        or never could (INVALID_ARGUMENT: a retry would be refused alike; a smaller request would not)."""
        if caller.rate_per_s <= 0 or cost <= 0:
            return
        count = max(1, units.count(request))
        size = bucket_size(caller.rate_per_s, caller.burst)
        if count * cost > size:
            raise InvalidArgumentError(FieldViolation(units.field, (
                f"{count} {units.noun} at a cost of {cost:g} each cost {count * cost:g}, more than the rate bucket "
                f"of caller {caller.name!r} ever holds ({size} at rate_per_s = {caller.rate_per_s:g}, burst = "
                f"{caller.burst}); send at most {int(size // cost)} a request")))
        self._per_caller.take(caller.name, caller.rate_per_s, caller.burst, count * cost)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        scope = required_scope(method)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return self._unary(handler, method, scope)
        return self._streaming(handler, method, scope)

    def _unary(self, handler: grpc.RpcMethodHandler, method: str, scope: str | None) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        parse = handler.request_deserializer
        gate = self._gates.get(method)
        units = units_by_method().get(method)

        async def guarded(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            # The call's deadline is fixed now, for the servicer too: the request itself must arrive before it.
            deadline = deadline_from(context, self._default_deadline_s)
            CURRENT_DEADLINE.set(deadline)
            if scope is None:  # health checks
                with self._side.hold(1):
                    return await inner(parse_request(parse, await _read_one(context, deadline)), context)
            caller = self.identify(context, method, scope)
            cost = self._auth.cost(method)  # (read once: a reload may install other costs while the call runs)
            try:
                # A request of several units is checked for one unit's cost now and charged in full once parsed.
                self._per_caller.take(caller.name, caller.rate_per_s, caller.burst, cost,
                                      only_check=units is not None)
                with self._per_caller.hold(caller.name, caller.max_in_flight):
                    if gate is not None:
                        gate.check()
                    with self._calls.hold(1):
                        raw = await _read_one(context, deadline)  # only now is the request received
                        with self._bytes.hold(len(raw)):
                            request = parse_request(parse, raw)
                            self.check_collection(caller, scope, request, method, context)
                            if units is not None:
                                self._charge(caller, cost, units, request)
                            return await inner(request, context)
            except ResourceExhaustedError as err:  # shed load is a refused call too: counted, summarised
                self._audit.record_shed(rpc=method, caller=caller.name, reason=str(err))
                raise

        return grpc.stream_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)

    async def _run_stream(self, context: grpc.aio.ServicerContext, method: str, scope: str | None,
                          work: Callable[[], Awaitable[None]]) -> None:
        """One streaming call: its caller checked when it opens (a refusal is raised, for the error-mapping
        interceptor around this one to turn into its status), held to the side budget, and ended with UNAVAILABLE
        by ``close_streams``."""
        if scope is not None:
            self.identify(context, method, scope)
        if self._closing:
            raise UnavailableError("the server is shutting down; reconnect")
        task = asyncio.current_task()
        assert task is not None  # (gRPC runs each call's handler in a task of its own)
        with self._stream_slots.hold(1), self._side.hold(1):
            self._streams.add(task)
            try:
                await work()
            except asyncio.CancelledError:
                if self._closing:  # (a call its client cancelled is not turned into a status)
                    raise UnavailableError("the server is shutting down; reconnect") from None
                raise
            finally:
                self._streams.discard(task)

    def close_streams(self) -> None:
        """Ends every open stream with UNAVAILABLE (the server drains: health watchers were told NOT_SERVING when
        the drain began). Left open, they were calls in flight to the drain, and held it for its whole grace
        period: 11 s instead of ~1 s with five health watches open."""
        self._closing = True
        for task in list(self._streams):
            task.cancel()

    @staticmethod
    async def _unary_stream(inner: Any, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await relay(inner(await _single(requests), context), context)

    def _streaming(self, handler: grpc.RpcMethodHandler, method: str, scope: str | None) -> grpc.RpcMethodHandler:
        # Health watches (open) and reflection: identity and scope checked when the stream opens, and the stream
        # holds one of the side budget while it lasts.
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def guarded_ss(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                await self._run_stream(context, method, scope, lambda: relay(inner_ss(requests, context), context))

            return grpc.stream_stream_rpc_method_handler(guarded_ss, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            # Served as stream-stream, like the unary methods as stream-unary: the budget is taken when the call
            # opens, before its request is received.
            async def guarded_us(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                await self._run_stream(context, method, scope,
                                       lambda: self._unary_stream(inner_us, requests, context))

            return grpc.stream_stream_rpc_method_handler(guarded_us, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler


# Reads still in flight for calls that stopped waiting for them (asyncio holds tasks only weakly).
_READS: set[asyncio.Future[Any]] = set()


def _let_go(read: asyncio.Future[Any]) -> None:
    """A finished read is dropped and its failure retrieved: one that ended after its call stopped waiting raises
    what gRPC raises then (the call's own abort, "RPC already finished"), which nobody reads."""
    _READS.discard(read)
    if not read.cancelled():
        read.exception()


_MISSING = FieldViolation("request", "is missing: the call ended before its request message")


async def _read_one(context: grpc.aio.ServicerContext, deadline: float) -> bytes:
    """The one request message of a unary method served as stream-unary, if it arrives before ``deadline`` (a
    request trickled in, or never finished, would otherwise hold its call's budget for good when the caller set no
    deadline). Read with ``context.read()``, not by iterating the request stream: the iterator's async generator
    cost ~40 us of event-loop time a call (a bare server: 379 against 336 us a call for a plain unary handler;
    read(), within 2 % of it)."""
    # The read runs in a task of its own that nothing cancels; the call waits for it through a shield. gRPC's
    # asyncio layer frees a receive's native memory (the message's buffer, its op array) only in the coroutine
    # that awaits the receive: cancelled while the receive was in flight (this timeout, or gRPC cancelling the
    # handler when the caller's deadline passes), that coroutine leaves them behind for good (grpc/grpc#43360).
    # That was ~16 KB a call for late CheckLiveness calls, 1.0 -> 4.1 GiB in 120 s of them. Left to finish,
    # the read ends when the call does: at its deadline, or once the status below is sent.
    read = asyncio.ensure_future(context.read())
    _READS.add(read)
    read.add_done_callback(_let_go)
    try:
        async with asyncio.timeout_at(deadline):
            raw = await asyncio.shield(read)
    except TimeoutError:
        raise DeadlineExceededError("the request message did not arrive before the call's deadline") from None
    if raw is grpc.aio.EOF:
        raise InvalidArgumentError(_MISSING)
    return raw  # type: ignore[no-any-return]


async def _single(requests: AsyncIterator[Any]) -> Any:
    """The one request message of a unary-stream method served as stream-stream (parsed by the error-mapping
    interceptor as it is read)."""
    async for request in requests:
        return request
    raise InvalidArgumentError(_MISSING)
