"""The Triton peer of the comparison benchmark starts from what `make bench-env` installs and answers correctly,
on ONNX Runtime and on OpenVINO (the same engines facegate runs), through the Open Inference Protocol."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.compare import triton_server
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT

pytestmark = [pytest.mark.weights, pytest.mark.slow]
VENV = ROOT / ".venv-bench"


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_triton_peer_answers_like_onnxruntime(engine: str, repository_dir: Path, tmp_path: Path) -> None:
    if not (VENV / ".installed").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("the benchmark environment is missing (make bench-env)")
        pytest.skip("make bench-env first")
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
