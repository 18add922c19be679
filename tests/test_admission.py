"""Budgets, server-wide and per caller: what does not fit is refused at once with RESOURCE_EXHAUSTED and RetryInfo."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from engines.errors import RateLimitedError, ResourceExhaustedError
from facegate.v1 import common_pb2, identification_pb2, liveness_pb2, liveness_pb2_grpc
from inference import grpc_service_pb2 as oip
from server.admission import Budget, CallerRate
from server.auth.callers import Authenticator
from server.auth.costs import units_by_method
from server.config import load_config
from server.pipelines.clip_input import ClipLimits
from server.servicers.error_interceptor import status_for
from tests.conftest import start_server, stop_server


def test_a_budget_refuses_what_does_not_fit_and_gives_back_what_was_held() -> None:
    b = Budget("pixels", 100, "pixels")
    with b.hold(60):
        assert b.in_use == 60
        with pytest.raises(ResourceExhaustedError, match="server busy"), b.hold(50):
            pass
        with b.hold(40):
            assert b.in_use == 100
    assert b.in_use == 0
    with pytest.raises(ResourceExhaustedError, match="over the server's pixels budget"), b.hold(101):
        pass
    with pytest.raises(RuntimeError), b.hold(10):
        raise RuntimeError("the work failed")
    assert b.in_use == 0 and b.refused == 2


def test_a_callers_rate_allows_its_burst_then_its_rate_and_says_when_to_retry() -> None:
    now = [100.0]
    rate = CallerRate(clock=lambda: now[0])
    for _ in range(3):  # a full bucket: the burst at once
        rate.take("a", 2.0, 3)
    with pytest.raises(ResourceExhaustedError, match=r"caller 'a' is over its rate_per_s = 2 \(burst 3\); retry in "
                       r"0\.50 s") as refused:
        rate.take("a", 2.0, 3)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    rate.take("b", 2.0, 3)  # another caller has its own bucket
    rate.take("a", 0.0, 0)  # no rate of its own: never refused
    now[0] += 0.5  # one token back
    rate.take("a", 2.0, 3)
    with pytest.raises(ResourceExhaustedError):
        rate.take("a", 2.0, 3)
    now[0] += 60.0  # a quiet minute refills the bucket to its size, not beyond
    for _ in range(3):
        rate.take("a", 2.0, 3)
    with pytest.raises(ResourceExhaustedError):
        rate.take("a", 2.0, 3)
    now[0] += 60.0  # burst 0: one second's worth (here 2.5 -> 3)
    for _ in range(3):
        rate.take("a", 2.5, 0)
    with pytest.raises(ResourceExhaustedError, match=r"\(burst 3\)"):
        rate.take("a", 2.5, 0)


def test_a_costly_call_takes_its_cost_from_the_callers_bucket() -> None:
    """[auth.call_costs]: a call of cost 4 takes 4 tokens, waits until 4 are back, and cost 0 is not counted."""
    now = [100.0]
    rate = CallerRate(clock=lambda: now[0])
    rate.take("a", 1.0, 5, cost=4.0)
    with pytest.raises(ResourceExhaustedError, match=r"over its rate_per_s = 1 \(burst 5; this call costs 4\); "
                       r"retry in 3\.00 s") as refused:
        rate.take("a", 1.0, 5, cost=4.0)
    assert refused.value.retry_after_s == pytest.approx(3.0)
    rate.take("a", 1.0, 5)  # the one token left serves a call of cost 1
    for _ in range(10):
        rate.take("a", 1.0, 5, cost=0.0)  # not counted
    now[0] += 3.9
    with pytest.raises(ResourceExhaustedError, match=r"retry in 0\.10 s"):
        rate.take("a", 1.0, 5, cost=4.0)
    now[0] += 0.1
    rate.take("a", 1.0, 5, cost=4.0)


def test_a_check_for_one_unit_takes_nothing() -> None:
    """``only_check`` (a request charged per unit, checked for one unit before it is received): refused exactly as
    a take would be, and nothing is taken when it is admitted."""
    now = [100.0]
    rate = CallerRate(clock=lambda: now[0])
    for _ in range(5):
        rate.take("a", 1.0, 3, cost=2.0, only_check=True)
    rate.take("a", 1.0, 3, cost=3.0)  # the whole bucket is still there
    with pytest.raises(ResourceExhaustedError, match=r"this call costs 2\); retry in 2\.00 s"):
        rate.take("a", 1.0, 3, cost=2.0, only_check=True)
    now[0] += 2.0
    rate.take("a", 1.0, 3, cost=2.0, only_check=True)
    rate.take("a", 1.0, 3, cost=2.0)


def test_enrolments_and_batches_are_charged_per_unit() -> None:
    """The methods charged per unit of their request, and the units counted in a parsed one."""
    units = units_by_method()
    assert set(units) == {"/facegate.v1.IdentificationService/EnrollFromClip",
                          "/inference.GRPCInferenceService/ModelInfer"}
    enrol = units["/facegate.v1.IdentificationService/EnrollFromClip"]
    assert enrol.count(identification_pb2.EnrollFromClipRequest(clips=[identification_pb2.Clip()] * 4)) == 4
    infer = units["/inference.GRPCInferenceService/ModelInfer"]
    tensor = oip.ModelInferRequest.InferInputTensor
    assert infer.count(oip.ModelInferRequest(inputs=[tensor(shape=[7, 3, 80, 80]), tensor(shape=[7, 5])])) == 7
    assert infer.count(oip.ModelInferRequest()) == 1  # (refused by the servicer: no inputs)


@pytest.mark.parametrize(("costs", "why"), [
    ("Identify = 4", r"unknown method\(s\) \['Identify'\]; known: \[.*'IdentifyFromClip'"),
    ("IdentifyFromClip = -1", "from 0 to 1000"), ("IdentifyFromClip = nan", "from 0 to 1000"),
    ('IdentifyFromClip = "4"', "from 0 to 1000"), ("IdentifyFromClip = true", "from 0 to 1000"),
    ("CheckLiveness = 6", r"caller 'x': its bucket \(5 at rate_per_s = 5, burst = 0\) is smaller than the "
                          r"costliest call in \[auth.call_costs\] it may make \(6\)"),
])
def test_bad_call_costs_stop_the_start(costs: str, why: str, tmp_path: Path) -> None:
    caller = '[[auth.callers]]\nname = "x"\nscopes = ["liveness"]\nrate_per_s = 5\n'
    (tmp_path / "c.toml").write_text(f"[auth.call_costs]\n{costs}\n\n{caller}")
    with pytest.raises(ValueError, match=why):
        load_config(tmp_path / "c.toml")
    # A cost over its bucket on a method the caller may not call is no obstacle (x has only "liveness").
    (tmp_path / "c.toml").write_text(f"[auth.call_costs]\nCheckLiveness = 5\nIdentifyFromClip = 50\n"
                                     f"ListModels = 0\n\n{caller}")
    config = load_config(tmp_path / "c.toml")
    authenticator = Authenticator(config.auth)
    assert authenticator.cost("/facegate.v1.IdentificationService/IdentifyFromClip") == 50.0
    assert authenticator.cost("/facegate.v1.ModelService/ListModels") == 0.0
    assert authenticator.cost("/facegate.v1.LivenessService/CheckLiveness") == 5.0
    assert authenticator.cost("/facegate.v1.ModelService/GetModelStatistics") == 1.0


def test_call_costs_are_applied_by_a_credentials_reload(tmp_path: Path) -> None:
    """A reload applies new costs with the callers (not listed as waiting for a restart); a server setting is."""
    from server.auth.reload import restart_needed

    (tmp_path / "a.toml").write_text("[auth.call_costs]\nIdentifyFromClip = 5\n")
    (tmp_path / "b.toml").write_text("[server]\ncpu_workers = 3\n\n[auth.call_costs]\nIdentifyFromClip = 2\n")
    old, new = load_config(tmp_path / "a.toml"), load_config(tmp_path / "b.toml")
    assert new.auth.call_costs != old.auth.call_costs
    assert restart_needed(old, new) == ["cpu_workers"]


def test_a_rates_retry_time_is_sent_as_it_is_and_an_estimate_bounded() -> None:
    def retry_s(err: ResourceExhaustedError) -> float:
        trailer = dict(status_for(err).trailing_metadata)["grpc-status-details-bin"]
        (detail,) = [d for d in status_pb2.Status.FromString(trailer).details
                     if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        info = error_details_pb2.RetryInfo()
        detail.Unpack(info)
        return float(info.retry_delay.ToTimedelta().total_seconds())

    assert retry_s(RateLimitedError("over its rate", retry_after_s=90.0)) == 90.0
    assert retry_s(ResourceExhaustedError("queue full", retry_after_s=90.0)) == 5.0


@pytest.mark.parametrize("setting", ["rate_per_s = -1.0", "rate_per_s = nan", "rate_per_s = inf", "burst = -2",
                                     'rate_per_s = "fast"'])
def test_a_bad_rate_stops_the_start(setting: str, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'[[auth.callers]]\nname = "x"\nscopes = ["liveness"]\n{setting}\n')
    with pytest.raises(ValueError, match=r"rate_per_s|burst"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text('[[auth.callers]]\nname = "x"\nscopes = ["liveness"]\nrate_per_s = 20\n')
    assert load_config(tmp_path / "c.toml").auth.callers[0].rate_per_s == 20


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


def test_modelinfer_inputs_are_held_to_their_own_budget(repository_dir: Path) -> None:
    """The pixel budget does not cover ModelInfer's tensors, and a model's activations grow with them (the detector
    at 640x640 took ~37 MB an input): calls whose inputs would pass ``max_inflight_infer_bytes`` are refused for
    room with RetryInfo, and served once there is room."""
    from inference import grpc_service_pb2_grpc as oip_grpc
    from server.config import ServerConfig

    with pytest.raises(ValueError, match=r"max_inflight_infer_bytes \(1000\) must be at least max_message_bytes"):
        ServerConfig(max_inflight_infer_bytes=1000)
    running, thread = start_server(repository_dir, max_message_bytes=8 << 20, max_inflight_infer_bytes=8 << 20)
    try:
        budget: Budget = running.server.infer_bytes  # type: ignore[attr-defined]
        assert budget.capacity == 8 << 20
        stub = oip_grpc.GRPCInferenceServiceStub(running.channel())
        request = oip.ModelInferRequest(model_name="retinaface", inputs=[oip.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[1, 3, 640, 640])], raw_input_contents=[bytes(3 * 640 * 640 * 4)])
        # Other calls' inputs hold all but 1 MiB of the budget: no room for this call's 4.9 MB.
        running.loop.call_soon_threadsafe(setattr, budget, "in_use", budget.capacity - (1 << 20))
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ModelInfer input bytes" in (info.value.details() or "")  # type: ignore[attr-defined]
        assert budget.refused == 1  # (facegate_budget_refused_total{budget="infer_input_bytes"})
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        running.loop.call_soon_threadsafe(setattr, budget, "in_use", 0)
        time.sleep(0.1)
        assert stub.ModelInfer(request, timeout=30).outputs  # room again: served
        assert budget.in_use == 0  # and let go of when it ended
    finally:
        stop_server(running, thread)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_wait_gate_admits_a_burst_then_refuses_what_would_wait_too_long() -> None:
    from server.admission import WaitGate

    async def main() -> None:
        clock = _Clock()
        gate = WaitGate("liveness", max_wait_s=0.7, min_in_flight=4, clock=clock)
        held: list[asyncio.Future[None]] = []

        async def call(duration: float) -> None:
            with gate.enter():
                fut = asyncio.get_running_loop().create_future()
                held.append(fut)
                await fut
            clock.now += duration

        # No rate measured yet: a burst of 10 on an idle server is admitted whatever its size.
        tasks = [asyncio.create_task(call(0.0)) for _ in range(8)]
        await asyncio.sleep(0)
        assert gate.in_flight == 8 and gate.refused == 0
        # 8 calls complete over 1 s of busy time (steps exact in binary): 8 calls/s.
        for fut in held:
            clock.now += 0.125
            fut.set_result(None)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert gate.rate == pytest.approx(8.0)
        held.clear()
        # 4 in flight at 8/s: a fifth would take ~0.625 s -> admitted; a sixth (~0.75 s) is refused at once.
        tasks = [asyncio.create_task(call(0.0)) for _ in range(5)]
        await asyncio.sleep(0)
        assert gate.in_flight == 5
        with pytest.raises(ResourceExhaustedError, match="would take ~750 ms") as info, gate.enter():
            pass
        assert info.value.retry_after_s == pytest.approx(0.05)
        assert gate.refused == 1 and gate.in_flight == 5
        # A call whose own deadline is nearer than its expected wait is refused too, even under max_wait_s.
        gate.max_wait_s = 10.0
        with pytest.raises(ResourceExhaustedError, match="over the 200 ms it may wait"):
            gate.check(deadline=clock.now + 0.2)
        gate.check(deadline=clock.now + 5.0)  # far enough: admitted
        for fut in held:
            fut.set_result(None)
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_overload_is_shed_with_resource_exhausted_and_retry_info(repository_dir: Path, samples: Path) -> None:
    """A real server whose gate may queue ~nothing: a burst far over its rate gets answers and, at once,
    RESOURCE_EXHAUSTED with RetryInfo; never a wrong answer; afterwards it serves normally."""
    from server.admission import WaitGate

    running, thread = start_server(repository_dir, max_queue_wait_s=0.001, admit_min_in_flight=2)
    try:
        data = (samples / "image_T1.jpg").read_bytes()
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=data))
        stub = liveness_pb2_grpc.LivenessServiceStub(running.channel())
        reference = stub.CheckLiveness(req, timeout=30)
        gate = running.server.gates["liveness"]  # type: ignore[attr-defined]
        assert isinstance(gate, WaitGate)
        # Warm-up bursts until the gate has measured a rate (it admits everything before): that takes half a second
        # of busy time, 3 bursts of 8 on a slow host, more where CheckLiveness runs at hundreds a second (an AMX
        # Xeon answered all 120 of the burst below before it had a rate). Once a rate is measured, a warm-up burst
        # may be shed too (on a busy host, it was).
        shed_early, bursts = 0, 0
        while gate.rate is None or bursts < 3:
            assert bursts < 100, "the gate never measured a rate"
            futures = [stub.CheckLiveness.future(req, timeout=30) for _ in range(8)]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), errors
            shed_early += len(errors)
            bursts += 1
        futures = [stub.CheckLiveness.future(req, timeout=30) for _ in range(120)]
        answered, refused = 0, []
        for f in futures:
            err = f.exception()
            if err is None:
                assert f.result().live_score == pytest.approx(reference.live_score, abs=1e-6)
                answered += 1
            else:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                refused.append(err)
        assert answered >= 2 and len(refused) >= 10  # how many depends on timing; some always are
        status = rpc_status.from_call(refused[0])  # type: ignore[arg-type]
        assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        assert gate.refused == shed_early + len(refused) and gate.in_flight == 0
        assert stub.CheckLiveness(req, timeout=30).decision == reference.decision
    finally:
        stop_server(running, thread)


def test_a_request_that_never_arrives_ends_at_the_default_deadline(repository_dir: Path, samples: Path) -> None:
    """``default_deadline_s`` bounds a call whose caller set no deadline, its request's arrival included: a call
    opened with no message sent holds its place in the calls budget only until then, ends DEADLINE_EXCEEDED, and
    the next call is served."""
    running, thread = start_server(repository_dir, default_deadline_s=1.0, max_inflight_calls=1)
    release = threading.Event()

    def nothing_until_released() -> Iterator[bytes]:
        release.wait(30)
        yield from ()

    try:
        channel = running.channel()
        stub = liveness_pb2_grpc.LivenessServiceStub(channel)
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes()))
        # No deadline from this client: only the server's default can end the call (else it waits for good).
        stalled = channel.stream_unary("/facegate.v1.LivenessService/CheckLiveness").future(nothing_until_released())
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as busy:  # its place is taken while it waits for its request
            stub.CheckLiveness(req, timeout=10)
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        ended = stalled.exception(timeout=10)  # (raises if the call is still open after 10 s)
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
        assert stub.CheckLiveness(req).decision == liveness_pb2.DECISION_LIVE  # no deadline set: the default
    finally:
        release.set()
        stop_server(running, thread)
