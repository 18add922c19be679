"""Prometheus metrics from a live server, read as a scraper would: GET /metrics on the metrics port."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.server_process import free_port, metrics_text
from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc
from tests.conftest import Sample, promtool, scrape, start_server, stop_server

pytestmark = pytest.mark.weights
METHOD = "/facegate.v1.LivenessService/CheckLiveness"
def scrape_until(port: int, key: Sample, timeout: float = 5.0) -> dict[Sample, float]:
    """Scrape until `key` is present. grpc.aio's context.abort() sends the status to the client before it raises,
    so the interceptor's count of a refused call can land a moment after the client already holds the error."""
    deadline = time.monotonic() + timeout
    while True:
        out = scrape(port)
        if key in out or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def test_ten_calls_show_as_ten_in_the_counter_and_the_histogram(repository_dir: Path, samples: Path) -> None:
    port = free_port()
    running, thread = start_server(repository_dir, metrics_port=port)
    try:
        before = scrape(port)
        stub = liveness_pb2_grpc.LivenessServiceStub(running.channel())
        image = common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes())
        for _ in range(10):
            stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(image=image), timeout=30)
        after = scrape(port)
        ok = ("facegate_requests_total", (("caller", "anonymous"), ("code", "OK"), ("method", METHOD)))
        count = ("facegate_request_duration_seconds_count", (("method", METHOD),))
        assert after[ok] - before.get(ok, 0.0) == 10
        assert after[count] - before.get(count, 0.0) == 10
        assert ("facegate_model_queue_depth", (("model", "retinaface"),)) in after
        info = {dict(labels)["model"]: dict(labels) for (name, labels), v in after.items()
                if name == "facegate_model_info" and v == 1}
        assert {"retinaface", "minifasnet_v2", "minifasnet_v1se"} <= set(info)
        for model in info.values():  # the same runtime string ListModels and every response carry
            assert model["version"] and re.fullmatch(r"(onnxruntime|openvino|tensorrt)\S*", model["runtime"])
        assert after[("facegate_model_inferences_total", (("model", "minifasnet_v2"),))] >= 10
        assert ("facegate_decode_duration_seconds_count", (("kind", "image"),)) in after
        assert after[("facegate_admission_shed_total", (("pipeline", "liveness"),))] == 0
        assert ("facegate_admission_expected_wait_seconds", (("pipeline", "identification"),)) in after
        # Each server-wide budget: its size, nothing held once the calls have ended, nothing refused.
        budgets = {"calls": 256, "request_bytes": 256 << 20, "decoded_pixels": 250_000_000,
                   "infer_input_bytes": 64 << 20, "health_and_streams": 64, "streams": 48}
        for name, size in budgets.items():
            assert after[("facegate_budget_capacity", (("budget", name),))] == size
            assert after[("facegate_budget_in_use", (("budget", name),))] == 0
            assert after[("facegate_budget_refused_total", (("budget", name),))] == 0
        # Video decodes stopped at a limit, by which (counted in this process: the server runs in it here).
        assert {dict(labels)["reason"] for (name, labels) in after
                if name == "facegate_video_decodes_stopped_total"} == {"cpu", "busy", "stalled", "memory"}
        # The C heap: the models' native memory is in use (glibc here).
        assert after[("facegate_heap_in_use_bytes", ())] > 100 * 2**20
        assert after[("facegate_heap_free_bytes", ())] >= 0
        # The control group's working set holds the models too (the server runs in this process here), and so does
        # the process's own resident memory (the client library's process collector).
        assert after[("facegate_memory_working_set_bytes", ())] > 100 * 2**20
        assert after[("process_resident_memory_bytes", ())] > 100 * 2**20
        # A refused call is counted with its code, and by reason.
        with pytest.raises(Exception):  # noqa: B017 - any gRPC error; the code is checked below
            stub.CheckLiveness(liveness_pb2.CheckLivenessRequest(), timeout=30)
        refused = ("facegate_requests_total",
                   (("caller", "anonymous"), ("code", "INVALID_ARGUMENT"), ("method", METHOD)))
        final = scrape_until(port, refused)
        assert final[refused] == 1
        # No caller-supplied string is ever a label value.
        known = {"retinaface", "minifasnet_v2", "minifasnet_v1se", "image", "clip", "video", "+Inf", "liveness",
                 "identification", *budgets}
        assert all(v in ("OK", "INVALID_ARGUMENT") or v.startswith("/") or v in known or v.replace(".", "").isdigit()
            or v.startswith("slowfast") or k in ("le", "reason", "version", "runtime")
            or (k, v) == ("caller", "anonymous") for (_, labels) in final for k, v in labels)
        # Prometheus's own linter finds nothing to say of the exposition (names, units, suffixes, help texts).
        lint = subprocess.run([promtool(), "check", "metrics"], input=metrics_text(port), capture_output=True,
                              text=True, timeout=60)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr
    finally:
        stop_server(running, thread)


def test_each_clip_decoded_is_measured_by_kind(repository_dir: Path, tmp_path: Path) -> None:
    import cv2

    from facegate.v1 import identification_pb2, identification_pb2_grpc
    from tests.bad_inputs import video
    from tests.conftest import _need
    from tests.images import encode, gradient

    if not (repository_dir / "ensembles").is_dir():
        _need(f"a trained identification ensemble in {repository_dir} (make identify-models)")
    port = free_port()
    running, thread = start_server(repository_dir, metrics_port=port)
    try:
        stub = identification_pb2_grpc.IdentificationServiceStub(running.channel())
        stub.CreateCollection(identification_pb2.CreateCollectionRequest(collection="metered"), timeout=10)
        frames = [cv2.flip(gradient(160, 120), i % 2) for i in range(12)]
        clips = {"clip": identification_pb2.Clip(frames=[common_pb2.Image(data=encode(f, "jpeg")) for f in frames],
                                                 fps=200.0),
                 "video": identification_pb2.Clip(video=video(tmp_path / "c.avi", frames), fps=200.0)}
        for clip in clips.values():
            stub.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(collection="metered", clip=clip),
                                  timeout=60)
        identified = scrape(port)
        # An enrolment decodes each of its clips on its own: one observation per clip, of the clip's kind.
        stub.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
            collection="metered", person_id="p1", clips=list(clips.values())), timeout=60)
        enrolled = scrape(port)
        for kind in clips:
            count, total = (("facegate_decode_duration_seconds_count", (("kind", kind),)),
                            ("facegate_decode_duration_seconds_sum", (("kind", kind),)))
            assert identified[count] == 1
            assert identified[total] > 0
            assert enrolled[count] == 2
            assert enrolled[total] > identified[total]
    finally:
        stop_server(running, thread)
