"""Authentication, authorisation and request-bytes admission for every RPC, before anything is decoded.

The interceptor swaps the method's request deserializer for the identity, so the handler receives raw bytes:
the caller is identified and its scope checked first, the request's size is taken from the server's bytes
budget, and only then is the message parsed and handed to the servicer. Collection-limited scopes are checked
right after parsing (the collection is a request field). Every refusal goes to the audit log. Health is open, but
its watches, like every stream, are counted against the open-streams budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from engines.errors import PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from server.admission import Budget, WaitGate
from server.audit import AuditLog
from server.auth.callers import Authenticator, Caller, bearer_token, certificate_identities
from server.auth.scopes import COLLECTION_SCOPES, grants, required_scope
from server.servicers.call_context import CURRENT_CALLER, metadata_request_id
from server.servicers.error_interceptor import parse_request
from server.servicers.streams import relay


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, audit: AuditLog, request_bytes: Budget,
                 calls: Budget | None = None, gates: Mapping[str, WaitGate] | None = None,
                 streams: Budget | None = None) -> None:
        self._auth = authenticator
        self._audit = audit
        self._bytes = request_bytes
        self._calls = calls or Budget("calls in flight", 1 << 30, "calls")
        # Streaming calls, open ones (health watches) included: each may stay open as long as its client likes.
        self._streams = streams or Budget("open streams", 1 << 30, "streams")
        # Full method name -> the wait gate of the pipeline it enters: while that pipeline sheds, its calls are
        # refused here, before parsing or any servicer code (the pipeline itself checks again, with the deadline).
        self._gates = dict(gates or {})

    def _refuse(self, err: Exception, method: str, context: grpc.aio.ServicerContext, caller: str,
                collection: str = "") -> Exception:
        outcome = "unauthenticated" if isinstance(err, UnauthenticatedError) else "permission_denied"
        self._audit.record(rpc=method, caller=caller, outcome=outcome, collection=collection,
                           request_id=metadata_request_id(context) or "", reason=str(err))
        return err

    def identify(self, context: grpc.aio.ServicerContext, method: str, scope: str) -> Caller:
        if not self._auth.enabled:
            return self._auth.anonymous()
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
        if not grants(caller.scopes, scope):
            raise self._refuse(PermissionDeniedError(f"caller {caller.name!r} lacks the {scope!r} scope"),
                               method, context, caller.name)
        return caller

    def check_collection(self, caller: Caller, scope: str, request: Any, method: str,
                         context: grpc.aio.ServicerContext) -> None:
        collection = getattr(request, "collection", None)
        if scope in COLLECTION_SCOPES and isinstance(collection, str) and not grants(caller.scopes, scope,
                                                                                      collection):
            raise self._refuse(PermissionDeniedError(
                f"caller {caller.name!r} lacks the {scope!r} scope on collection {collection!r}"),
                method, context, caller.name, collection)

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
            return handler if scope is None else self._unary(handler, method, scope)
        return self._streaming(handler, method, scope)

    def _unary(self, handler: grpc.RpcMethodHandler, method: str, scope: str) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        parse = handler.request_deserializer
        gate = self._gates.get(method)

        async def guarded(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            caller = self.identify(context, method, scope)
            request: Any = None
            try:
                if gate is not None:
                    gate.check()
                with self._calls.hold(1), self._bytes.hold(len(raw)):
                    request = parse_request(parse, raw)
                    self.check_collection(caller, scope, request, method, context)
                    CURRENT_CALLER.set(caller)
                    return await inner(request, context)
            except ResourceExhaustedError as err:  # shed load is a refused call too: counted, summarised
                self._audit.record_shed(rpc=method, caller=caller.name, reason=str(err))
                raise

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)

    def _open_stream(self, context: grpc.aio.ServicerContext, method: str, scope: str | None) -> None:
        # A refusal is raised, and the error-mapping interceptor around this one turns it into its status.
        if scope is not None:
            CURRENT_CALLER.set(self.identify(context, method, scope))

    def _streaming(self, handler: grpc.RpcMethodHandler, method: str, scope: str | None) -> grpc.RpcMethodHandler:
        # Health watches (open) and reflection: identity and scope checked when the stream opens, and the stream
        # holds one of the open-streams budget while it lasts.
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def guarded_ss(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                self._open_stream(context, method, scope)
                with self._streams.hold(1):
                    await relay(inner_ss(requests, context), context)

            return grpc.stream_stream_rpc_method_handler(guarded_ss, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def guarded_us(request: Any, context: grpc.aio.ServicerContext) -> None:
                self._open_stream(context, method, scope)
                with self._streams.hold(1):
                    await relay(inner_us(request, context), context)

            return grpc.unary_stream_rpc_method_handler(guarded_us, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler

