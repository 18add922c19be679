"""A plaintext port that serves grpc.health.v1 and nothing else (``[server] health_port``), for probes that cannot
speak TLS.

Kubernetes' native gRPC probes, like most load balancers' health checks, dial without TLS and present no client
certificate: against a TLS port every probe fails, so a deployment that turns TLS on would otherwise lose its
readiness, liveness and startup probes. This port answers from the same health servicer as the main port (the same
statuses, the drain's NOT_SERVING included) and serves no other service, not even reflection: no token, image or
template ever crosses it. Of the health service it serves Check alone, which is what probes call: a Watch stays
open as long as its client likes, and enough of them would hold every slot and fail the probes (64 did, before).
Its calls are bounded apart from the main port's, by ``max_health_and_stream_calls``.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

# A HealthCheckRequest carries one service name; anything larger is not a probe.
_MAX_REQUEST_BYTES = 4096


class HealthPort:
    def __init__(self, servicer: health.aio.HealthServicer, host: str, port: int, max_calls: int,
                 reuse_port: bool) -> None:
        self._address = f"{host}:{port}"
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
                     ("grpc.so_reuseport", 1 if reuse_port else 0)],  # (--workers: every worker binds it)
            maximum_concurrent_rpcs=max_calls)
        check = grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME,
                                                                                   {"Check": check}),))

    async def start(self) -> None:
        if self.server.add_insecure_port(self._address) == 0:
            raise OSError(f"could not bind the health port {self._address}")
        await self.server.start()
        log.info("health checks (grpc.health.v1 Check alone, plaintext) on %s", self._address)

    async def stop(self) -> None:
        await self.server.stop(0)
