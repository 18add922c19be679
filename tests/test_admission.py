"""Server-wide budgets: what does not fit is refused at once with RESOURCE_EXHAUSTED and RetryInfo."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from engines.errors import ResourceExhaustedError
from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc
from server.admission import Budget
from server.pipelines.identification import ClipLimits
from tests.conftest import start_server, stop_server


def test_a_budget_refuses_what_does_not_fit_and_gives_back_what_was_held() -> None:
    async def main() -> None:
        b = Budget("pixels", 100, "pixels")
        async with b.hold(60):
            assert b.in_use == 60
            with pytest.raises(ResourceExhaustedError, match="server busy"):
                async with b.hold(50):
                    pass
            async with b.hold(40):
                assert b.in_use == 100
        assert b.in_use == 0
        with pytest.raises(ResourceExhaustedError, match="over the server's pixels budget"):
            async with b.hold(101):
                pass
        with pytest.raises(RuntimeError):
            async with b.hold(10):
                raise RuntimeError("the work failed")
        assert b.in_use == 0 and b.refused == 2

    asyncio.run(main())


def test_an_image_over_the_pixel_budget_is_resource_exhausted_with_retry_info(repository_dir: Path,
                                                                              samples: Path) -> None:
    limit = 1_000_000
    running, thread = start_server(repository_dir, max_inflight_pixels=limit,
                                   clip_limits=ClipLimits(max_request_pixels=limit))
    try:
        buf = io.BytesIO()
        Image.new("RGB", (1200, 1000), (100, 100, 100)).save(buf, "JPEG")
        stub = liveness_pb2_grpc.LivenessServiceStub(running.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=buf.getvalue())),
                               timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        ok = stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(
            image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes())), timeout=30)
        assert ok.decision == liveness_pb2.DECISION_LIVE  # 640x480 fits
    finally:
        stop_server(running, thread)
