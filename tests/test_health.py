"""Health that tells the truth: each service follows its own models, and the inference protocol's readiness is
false while a model is broken or the server drains."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.server_process import free_port
from facegate.v1 import identification_pb2, identification_pb2_grpc
from facegate_client.client import clip_from_folder
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import start_server, stop_server
from tests.test_server_auth import SYNTH, clip_folder

pytestmark = pytest.mark.weights
LIVENESS = "facegate.v1.LivenessService"
IDENTIFICATION = "facegate.v1.IdentificationService"


def status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_a_broken_slowfast_member_takes_down_identification_only(repository_dir: Path, tmp_path: Path) -> None:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    running, thread = start_server(repository_dir, gallery_path=tmp_path / "g.sqlite")
    try:
        server = running.server
        health = health_pb2_grpc.HealthStub(running.channel())
        oip = pb_grpc.GRPCInferenceServiceStub(running.channel())
        assert status(health, IDENTIFICATION) == health_pb2.HealthCheckResponse.SERVING
        assert oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        member = server.identification.ensemble.members[0]  # type: ignore[attr-defined]
        # The engine failed three times in a row: what the batcher records before refusing more work.
        server.registry.models[member].batcher._broken = RuntimeError("simulated engine failure")  # type: ignore[attr-defined]
        ident = identification_pb2_grpc.IdentificationServiceStub(running.channel())
        ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection="c"), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            ident.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
                collection="c", clip=clip_from_folder(clip_folder(1, 0), 200.0)), timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        time.sleep(0.2)
        assert status(health, IDENTIFICATION) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status(health, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
        assert status(health, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert not oip.ModelReady(pb.ModelReadyRequest(name=member), timeout=10).ready
        assert oip.ModelReady(pb.ModelReadyRequest(name="retinaface"), timeout=10).ready
    finally:
        stop_server(running, thread)


def test_readiness_is_false_while_draining(repository_dir: Path, tmp_path: Path) -> None:
    import asyncio

    probe_port = free_port()
    running, thread = start_server(repository_dir, gallery_path=tmp_path / "g.sqlite", drain_delay_s=2.0,
                                   health_port=probe_port)
    oip = pb_grpc.GRPCInferenceServiceStub(running.channel())
    probe = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{probe_port}"))
    assert oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert status(probe, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
    future = asyncio.run_coroutine_threadsafe(running.server.stop(1.0, 2.0), running.loop)  # type: ignore[attr-defined]
    time.sleep(0.5)  # within the drain delay: still accepting calls, but no longer ready
    assert not oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name="retinaface"), timeout=10).ready
    # The probes' own port says so too (server.health_port): the pod leaves the Service's endpoints.
    assert status(probe, LIVENESS) == health_pb2.HealthCheckResponse.NOT_SERVING
    future.result(30)
    with pytest.raises(grpc.RpcError):  # and it closes with the server
        status(probe, "")
    running.loop.call_soon_threadsafe(running.loop.stop)
    thread.join(30)


def test_open_health_watches_are_bounded_and_cannot_lock_calls_or_probes_out(repository_dir: Path, tmp_path: Path,
                                                                              samples: Path) -> None:
    """A health watch needs no credential and stays open as long as its client likes, holding one of gRPC's
    concurrent-RPC slots: without a bound of their own, enough watches would refuse every biometric call. Nor may
    they take the whole bound: a probe's health check must still be answered."""
    import asyncio

    from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc

    running, thread = start_server(repository_dir, gallery_path=tmp_path / "g.sqlite", max_health_and_stream_calls=3,
                                   max_inflight_calls=4, max_concurrent_rpcs=7)
    channel = running.channel()
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=30) for _ in range(10)]
    try:
        opened, refused = [], []
        for w in watches:
            try:
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
                opened.append(w)
            except grpc.RpcError as err:
                refused.append(err.code())  # type: ignore[attr-defined]
        # Of the 3 side slots, streams may hold 2: the third is kept for health checks.
        assert len(opened) == 2 and refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
        assert status(health, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
        image = common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes())
        live = liveness_pb2_grpc.LivenessServiceStub(channel)
        assert live.CheckLiveness(liveness_pb2.CheckLivenessRequest(image=image), timeout=30).decision == \
            liveness_pb2.DECISION_LIVE
        # An open watch still follows the server: draining turns it NOT_SERVING, and once the drain delay is over
        # the watch is ended with UNAVAILABLE instead of holding the drain for its grace period (10 s here).
        t0 = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(10.0, 0.5), running.loop)  # type: ignore[attr-defined]
        assert next(opened[0]).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(opened[0])
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        stopping.result(30)
        assert time.monotonic() - t0 < 5
    finally:
        for w in watches:
            w.cancel()
        running.loop.call_soon_threadsafe(running.loop.stop)
        thread.join(30)
