"""The Triton peer of the comparison benchmark starts from what `make bench-env` installs and answers correctly,
on ONNX Runtime and on OpenVINO (the same engines facegate runs), through the Open Inference Protocol."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.compare import PeerExitedError, triton_server
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT

pytestmark = [pytest.mark.weights, pytest.mark.slow]
VENV = ROOT / ".venv-bench"


def needs_bench_env() -> None:
    if not (VENV / ".installed").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("the benchmark environment is missing (make bench-env)")
        pytest.skip("make bench-env first")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_triton_peer_answers_like_onnxruntime(engine: str, repository_dir: Path, tmp_path: Path) -> None:
    needs_bench_env()
    import onnxruntime as ort

    onnx = repository_dir / "minifasnet_v2" / "model.onnx"
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 80, 80)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with triton_server(VENV, onnx, "minifasnet_v2", 32, 1000, 1, tmp_path / "triton.log", engine) as address, \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        r = stub.ModelInfer(pb.ModelInferRequest(
            model_name="minifasnet_v2",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
            raw_input_contents=[x.tobytes()]), timeout=60)
    got = np.frombuffer(r.raw_output_contents[0], np.float32).reshape(ref.shape)
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_a_peer_that_cannot_start_fails_at_once_with_its_log(tmp_path: Path) -> None:
    """A peer that exits before it is ready (here: no model file) is started once more, then the failure says
    why, with the end of its log, instead of waiting out the readiness timeout."""
    needs_bench_env()
    log = tmp_path / "triton.log"
    began = time.monotonic()
    with pytest.raises(PeerExitedError) as info, \
            triton_server(VENV, tmp_path / "missing.onnx", "minifasnet_v2", 32, 1000, 1, log):
        pass
    assert "(twice)" in str(info.value) and "missing.onnx" in str(info.value)
    assert time.monotonic() - began < 100  # the readiness wait alone is 120 s per start
