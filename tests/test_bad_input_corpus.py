"""Every case of the bad-input corpus (tests/bad_inputs.py) against a real server process: the right status,
then a correct answer from the same server; the server's peak memory over the whole corpus stays bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.server_process import facegate_process
from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
)
from facegate_client.client import clip_from_folder
from inference import grpc_service_pb2_grpc as oip_grpc
from tests.bad_inputs import Materials, cases
from tests.test_server_auth import SYNTH, clip_folder

pytestmark = [pytest.mark.weights, pytest.mark.slow]
MAX_PEAK_RSS = 2 * 1024**3


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def corpus_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[grpc.Channel, int]]:
    if not SYNTH.is_dir():
        pytest.fail(f"the synthetic clips are missing in {SYNTH} (make identify-models)")
    folder = tmp_path_factory.mktemp("corpus-server")
    config = folder / "facegate.toml"
    config.write_text(f'[server]\ngallery_path = "{folder / "g.sqlite"}"\n[audit]\npath = "{folder / "a.jsonl"}"\n')
    with facegate_process(repository_dir, ["--config", str(config)], folder / "server.log") as (address, proc):
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        yield channel, proc.pid
        channel.close()


def test_every_bad_input_gets_its_status_and_the_server_keeps_answering(
        corpus_server: tuple[grpc.Channel, int], samples: Path, tmp_path: Path) -> None:
    channel, pid = corpus_server
    live = liveness_pb2_grpc.LivenessServiceStub(channel)
    ident = identification_pb2_grpc.IdentificationServiceStub(channel)
    infer = oip_grpc.GRPCInferenceServiceStub(channel)
    calls = {"CheckLiveness": live.CheckLiveness, "IdentifyFromClip": ident.IdentifyFromClip,
             "EnrollFromClip": ident.EnrollFromClip, "DeletePerson": ident.DeletePerson,
             "ListPersons": ident.ListPersons, "ModelInfer": infer.ModelInfer}
    photo = (samples / "image_T1.jpg").read_bytes()
    frames = [f.data for f in clip_from_folder(clip_folder(1, 0), 200.0).frames]
    m = Materials(tmp_path, photo, frames)
    ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection=m.collection), timeout=10)
    ident.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
        collection=m.collection, person_id=m.enrolled, clips=[clip_from_folder(clip_folder(1, 0), 200.0)]),
        timeout=60)
    good = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=photo))
    corpus = cases(tmp_path)
    assert len(corpus) >= 60
    wrong: list[str] = []
    for case in corpus:
        request = case.build(m)
        t0 = time.monotonic()
        try:
            calls[case.rpc](request, timeout=case.timeout_s)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
        took = time.monotonic() - t0
        if code not in case.codes:
            wrong.append(f"{case.name}: {code.name} (expected {'/'.join(c.name for c in case.codes)}, {took:.1f} s)")
        # ... and the server still answers correctly.
        assert live.CheckLiveness(good, timeout=30).decision == liveness_pb2.DECISION_LIVE, case.name
    assert wrong == []
    rss = peak_rss(pid)
    print(f"bad-input corpus: {len(corpus)} cases; server peak RSS {rss / 2**20:.0f} MiB")
    assert rss < MAX_PEAK_RSS, f"peak RSS {rss / 2**20:.0f} MiB"


def test_bytes_that_are_not_the_request_message_get_invalid_argument(
        corpus_server: tuple[grpc.Channel, int], samples: Path) -> None:
    """A request whose bytes do not parse as the method's message is the caller's error: INVALID_ARGUMENT naming the
    request, not INTERNAL (or UNKNOWN for a health check, which no auth scope covers), on unary and streaming methods
    alike; the server answers the next call."""
    from facegate_client.client import field_violations

    channel, _ = corpus_server
    live = liveness_pb2_grpc.LivenessServiceStub(channel)
    good = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes()))
    for method in ("/facegate.v1.LivenessService/CheckLiveness", "/facegate.v1.IdentificationService/IdentifyFromClip",
                   "/inference.GRPCInferenceService/ModelInfer", "/grpc.health.v1.Health/Check"):
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(method)(b"\xff\xff\xff\xff", timeout=10)
        err = raised.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, method  # type: ignore[attr-defined]
        assert [f for f, _ in field_violations(err)] == ["request"], method
        assert live.CheckLiveness(good, timeout=30).decision == liveness_pb2.DECISION_LIVE
    garbage = b"\xff\xff\xff\xff"
    streams = {  # a health watch (one request, a stream back) and reflection (streams both ways)
        "/grpc.health.v1.Health/Watch": lambda: list(channel.unary_stream("/grpc.health.v1.Health/Watch")(
            garbage, timeout=10)),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": lambda: list(channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(iter([garbage]), timeout=10)),
    }
    for method, call in streams.items():
        with pytest.raises(grpc.RpcError) as raised:
            call()
        err = raised.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, method  # type: ignore[attr-defined]
        assert [f for f, _ in field_violations(err)] == ["request"], method
        assert live.CheckLiveness(good, timeout=30).decision == liveness_pb2.DECISION_LIVE
