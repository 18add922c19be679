"""CheckLiveness through a real server on 127.0.0.1 with the real CPU engines and weights."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from PIL import Image, ImageOps

from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc, models_pb2, models_pb2_grpc
from facegate_client.client import DECISION_NAMES, field_violations
from tests.conftest import REFERENCE, RunningServer
from tests.images import encode, gradient, png_declaring
from tests.served import gated_precisions

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def stub(live_server: RunningServer) -> liveness_pb2_grpc.LivenessServiceStub:
    return liveness_pb2_grpc.LivenessServiceStub(live_server.channel())


def check(stub: liveness_pb2_grpc.LivenessServiceStub, data: bytes, timeout: float = 30, **kw: object
          ) -> liveness_pb2.CheckLivenessResponse:
    req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=data), **kw)  # type: ignore[arg-type]
    return stub.CheckLiveness(req, timeout=timeout)


def upright(path: Path, fmt: str) -> bytes:
    """The sample physically rotated upright and re-encoded without EXIF."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_samples_give_the_reference_answers(name: str, stub, samples: Path,  # type: ignore[no-untyped-def]
                                           repository_dir: Path) -> None:
    decision, live, box, conf = REFERENCE[name]
    r = check(stub, (samples / name).read_bytes())
    assert DECISION_NAMES[r.decision] == decision
    assert r.live_score == pytest.approx(live, abs=0.01)
    assert (r.face.box.x, r.face.box.y, r.face.box.width, r.face.box.height) == box
    assert r.face.detection_score == pytest.approx(conf, abs=1e-3)
    assert r.image.width == 480 and r.image.height == 640 and r.image.exif_orientation == 6
    assert r.face.normalized_box.x == pytest.approx(box[0] / 480)
    assert r.threshold == pytest.approx(0.5)
    assert [s.model for s in r.model_scores] == ["minifasnet_v2", "minifasnet_v1se"]
    assert {m.name for m in r.models} == {"retinaface", "minifasnet_v2", "minifasnet_v1se"}
    # Which CPU runtime served each model (chosen per model by measurement) and at which precision.
    assert all(m.runtime.split(":")[0] in ("onnxruntime", "openvino") and len(m.sha256) == 64 for m in r.models)
    # A reduced precision only where its gates passed (bf16 for the classifiers on a CPU with bf16, here).
    assert all(m.runtime.rsplit(":", 1)[1] in gated_precisions(repository_dir, m.name)
               for m in r.models if m.runtime.startswith("openvino"))
    assert r.timings.total_ms > 0 and r.request_id


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_upright_reencoded_samples_give_the_same_verdicts(name: str, fmt: str, stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    decision, live, _, _ = REFERENCE[name]
    r = check(stub, upright(samples / name, fmt))
    assert r.image.exif_orientation == 1
    assert DECISION_NAMES[r.decision] == decision
    assert r.live_score == pytest.approx(live, abs=0.05)


def test_threshold_override_changes_the_decision(stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    data = (samples / "image_F2.jpg").read_bytes()  # live score 0.18
    assert check(stub, data, threshold=0.1).decision == liveness_pb2.DECISION_LIVE
    r = check(stub, data, threshold=0.2)
    assert r.decision == liveness_pb2.DECISION_UNCERTAIN and r.threshold == pytest.approx(0.2)


def test_no_face_is_an_answer_not_an_error(stub) -> None:  # type: ignore[no-untyped-def]
    r = check(stub, encode(gradient(320, 240), "PNG"))
    assert r.decision == liveness_pb2.DECISION_UNSPECIFIED
    assert list(r.quality_issues) == [liveness_pb2.QUALITY_ISSUE_FACE_NOT_FOUND]
    assert not r.HasField("face")


def test_request_id_is_echoed_or_generated(stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    data = (samples / "image_T1.jpg").read_bytes()
    assert check(stub, data, request_id="abc-123").request_id == "abc-123"
    req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=data))
    r = stub.CheckLiveness(req, timeout=30, metadata=(("x-request-id", "from-metadata"),))
    assert r.request_id == "from-metadata"
    assert len(check(stub, data).request_id) == 32


def test_200_concurrent_calls_are_all_right_and_batched(live_server: RunningServer, stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    """A burst far over what two cores serve within the server's queue-wait limit: every call is answered right
    or refused at once with RESOURCE_EXHAUSTED and RetryInfo, and a client that waits as RetryInfo says and
    retries gets every answer. Requests were batched."""
    names = sorted(REFERENCE)
    payloads = {n: (samples / n).read_bytes() for n in names}
    models = models_pb2_grpc.ModelServiceStub(live_server.channel())
    before = {m.model: m for m in models.GetModelStatistics(models_pb2.GetModelStatisticsRequest()).models}
    pending = [(i, names[i % 3]) for i in range(200)]
    answered, refusals, rounds = 0, 0, 0
    while pending and rounds < 50:
        rounds += 1
        futures = [(i, name, stub.CheckLiveness.future(
            liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=payloads[name])), timeout=120))
            for i, name in pending]
        pending, delay = [], 0.0
        for i, name, fut in futures:
            err = fut.exception()
            if err is not None:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                status = rpc_status.from_call(err)
                retry = next(error_details_pb2.RetryInfo.FromString(d.value) for d in status.details
                             if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
                delay = max(delay, retry.retry_delay.ToTimedelta().total_seconds())
                pending.append((i, name))
                refusals += 1
                continue
            r = fut.result()
            assert DECISION_NAMES[r.decision] == REFERENCE[name][0]
            assert r.live_score == pytest.approx(REFERENCE[name][1], abs=0.01)
            answered += 1
        time.sleep(delay)
    assert answered == 200, f"{len(pending)} calls still refused after {rounds} rounds"
    after = {m.model: m for m in models.GetModelStatistics(models_pb2.GetModelStatisticsRequest()).models}
    for model in ("retinaface", "minifasnet_v2", "minifasnet_v1se"):
        requests = after[model].inference_count - before[model].inference_count
        executions = after[model].execution_count - before[model].execution_count
        assert requests == 200  # refused calls never reached a model
        assert executions < requests, f"{model}: no batching ({requests} requests in {executions} executions)"
        assert any(b.batch_size > 1 and b.executions > 0 for b in after[model].batch_sizes)


def assert_still_serving(live_server: RunningServer, stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    health = health_pb2_grpc.HealthStub(live_server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    r = check(stub, (samples / "image_T1.jpg").read_bytes())
    assert r.decision == liveness_pb2.DECISION_LIVE


def _truncated_jpeg(samples: Path) -> bytes:
    data = (samples / "image_T1.jpg").read_bytes()
    return data[: len(data) // 3]


BAD_IMAGES = {
    "empty": (lambda s: b"", "empty"),
    "random": (lambda s: np.random.default_rng(3).bytes(5000), "not a decodable"),
    "truncated_jpeg": (_truncated_jpeg, "corrupt or truncated"),
    "one_pixel": (lambda s: encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "at least 32 px"),
    "pixel_bomb": (lambda s: png_declaring(30000, 30000), "pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_get_invalid_argument_with_field_details(case: str, live_server: RunningServer, stub,  # type: ignore[no-untyped-def]
                                                            samples: Path) -> None:
    make, words = BAD_IMAGES[case]
    with pytest.raises(grpc.RpcError) as info:
        check(stub, make(samples))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(info.value)
    assert violations and violations[0][0] == "image.data" and words in violations[0][1]
    assert_still_serving(live_server, stub, samples)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan])
def test_threshold_outside_unit_interval_is_invalid(threshold: float, live_server: RunningServer, stub,  # type: ignore[no-untyped-def]
                                                    samples: Path) -> None:
    with pytest.raises(grpc.RpcError) as info:
        check(stub, (samples / "image_T1.jpg").read_bytes(), threshold=threshold)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value)[0][0] == "threshold"
    assert_still_serving(live_server, stub, samples)


def test_message_over_the_size_limit_is_resource_exhausted(live_server: RunningServer, stub,  # type: ignore[no-untyped-def]
                                                           samples: Path) -> None:
    with pytest.raises(grpc.RpcError) as info:
        check(stub, b"\xff" * (17 * 1024 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(live_server, stub, samples)


@pytest.mark.parametrize("timeout", [0.0, 0.002])
def test_expired_deadline_is_deadline_exceeded(timeout: float, live_server: RunningServer, stub,  # type: ignore[no-untyped-def]
                                               samples: Path) -> None:
    with pytest.raises(grpc.RpcError) as info:
        check(stub, (samples / "image_T1.jpg").read_bytes(), timeout=timeout)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(live_server, stub, samples)


def test_overlong_request_id_is_invalid(stub, samples: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        check(stub, (samples / "image_T1.jpg").read_bytes(), request_id="x" * 200)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_model_listing(live_server: RunningServer) -> None:
    ch = live_server.channel()
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "facegate.v1.LivenessService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    # A watch (a streaming method the interceptors wrap) sends the current status first.
    watch = health.Watch(health_pb2.HealthCheckRequest(service="facegate.v1.LivenessService"), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    reply = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=30)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"facegate.v1.LivenessService", "facegate.v1.ModelService", "grpc.health.v1.Health"} <= names
    models = models_pb2_grpc.ModelServiceStub(ch).ListModels(models_pb2.ListModelsRequest(), timeout=30).models
    assert {m.version.name for m in models} >= {"retinaface", "minifasnet_v2", "minifasnet_v1se"}
    assert all(m.ready and m.batching.max_batch_size > 1 for m in models)
    assert all(m.runtime_reason for m in models)  # why this runtime (here: no TensorRT)
    with pytest.raises(grpc.RpcError) as info:
        models_pb2_grpc.ModelServiceStub(ch).GetModelStatistics(
            models_pb2.GetModelStatisticsRequest(model="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
