"""The Open Inference Protocol endpoint: metadata, config, statistics, ModelInfer on every model, bad requests;
and Triton's own Python client against it (from the benchmark environment, when present)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from facegate_client.client import field_violations
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import ROOT, RunningServer
from tests.served import served_engine

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def stub(live_server: RunningServer) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(live_server.channel())


def request(model: str, x: np.ndarray, name: str = "input", dtype: str = "FP32") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model, id="r1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=x.shape)],
        raw_input_contents=[x.tobytes()])


def test_server_and_model_metadata(stub, live_server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    from facegate.v1 import models_pb2, models_pb2_grpc

    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "facegate" and "statistics" in meta.extensions
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="retinaface"))
    # The platform names the runtime `auto` measured fastest for it on this machine (ONNX Runtime or OpenVINO:
    # on two shared cores their speeds for RetinaFace are within the 10 % that decides, run to run).
    served = models_pb2_grpc.ModelServiceStub(live_server.channel()).ListModels(models_pb2.ListModelsRequest())
    runtime = next(m.version.runtime for m in served.models if m.version.name == "retinaface")
    expected = "openvino" if runtime.startswith("openvino") else "onnxruntime_onnx"
    assert md.platform == expected and list(md.inputs[0].shape) == [-1, 3, -1, -1]
    cfg = stub.ModelConfig(pb.ModelConfigRequest(name="minifasnet_v2")).config
    assert cfg.max_batch_size == 32 and list(cfg.input[0].dims) == [3, 80, 80]
    assert cfg.input[0].data_type == pb.TYPE_FP32
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    assert stub.ModelReady(pb.ModelReadyRequest(name="minifasnet_v1se")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready


def test_model_infer_equals_the_engine_and_is_counted(stub, live_server: RunningServer,  # type: ignore[no-untyped-def]
                                                     repository_dir: Path) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 255, (3, 3, 80, 80)).astype(np.float32)
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="minifasnet_v2")).model_stats[0].inference_count
    r = stub.ModelInfer(request("minifasnet_v2", x))
    assert r.id == "r1" and r.outputs[0].name == "logits" and list(r.outputs[0].shape) == [3, 3]
    got = np.frombuffer(r.raw_output_contents[0], np.float32).reshape(3, 3)
    # The same engine and precision the server reports (bf16 where its gate passed on this CPU) ...
    engine, precision = served_engine(live_server, repository_dir, "minifasnet_v2")
    ref = engine.infer({"input": x})[0]["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # ... and that engine is the FP32 model up to its precision (bf16 keeps 8 bits of mantissa).
    fp32 = ort.InferenceSession(str(repository_dir / "minifasnet_v2" / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, fp32, atol=1e-4 if precision == "fp32" else 0.1)
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="minifasnet_v2")).model_stats[0]
    assert stats.inference_count - before == 3 and stats.inference_stats.compute_infer.count > 0
    # The typed contents form works too.
    typed = pb.ModelInferRequest(model_name="minifasnet_v2", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 3, 80, 80], contents=pb.InferTensorContents(
            fp32_contents=x[0].reshape(-1).tolist()))])
    np.testing.assert_allclose(np.frombuffer(stub.ModelInfer(typed).raw_output_contents[0], np.float32),
                               engine.infer({"input": x[:1]})[0]["logits"][0], atol=1e-4)


BAD = {
    "unknown_model": (lambda x: request("nope", x), grpc.StatusCode.NOT_FOUND, None),
    "wrong_datatype": (lambda x: request("minifasnet_v2", x.astype(np.float64), dtype="FP64"),
                       grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype"),
    "wrong_shape": (lambda x: request("minifasnet_v2", x[:, :, :40]), grpc.StatusCode.INVALID_ARGUMENT,
                    "inputs[0].shape"),
    "wrong_name": (lambda x: request("minifasnet_v2", x, name="images"), grpc.StatusCode.INVALID_ARGUMENT,
                   "inputs"),
    "short_raw": (lambda x: pb.ModelInferRequest(
        model_name="minifasnet_v2", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=x.shape)], raw_input_contents=[x.tobytes()[:-4]]),
        grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]"),
    "detector_input_too_small": (lambda x: request("retinaface", np.zeros((1, 3, 8, 8), np.float32)),
                                 grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    "batch_too_large": (lambda x: request("minifasnet_v2", np.repeat(x, 33, axis=0)), grpc.StatusCode.INVALID_ARGUMENT,
                        "inputs[0].shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests(case: str, stub) -> None:  # type: ignore[no-untyped-def]
    make, code, field = BAD[case]
    x = np.zeros((1, 3, 80, 80), np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(x))
    assert info.value.code() == code
    if field:
        assert field_violations(info.value)[0][0] == field
    assert stub.ModelInfer(request("minifasnet_v2", x)).outputs  # still serving


_TRITON_CLIENT = textwrap.dedent("""
    import sys, numpy as np, tritonclient.grpc as g
    c = g.InferenceServerClient(sys.argv[1])
    assert c.is_server_ready()
    for m in sys.argv[2:]:
        md = c.get_model_metadata(m)
        shape = [2] + [{2: 221, 3: 166}.get(k, 1) if d == -1 else d for k, d in enumerate(md.inputs[0].shape) if k]
        inp = g.InferInput(md.inputs[0].name, shape, "FP32")
        inp.set_data_from_numpy(np.random.rand(*shape).astype(np.float32) * 255)
        r = c.infer(m, [inp])
        print(m, [tuple(r.as_numpy(o.name).shape) for o in md.outputs])
""")


def test_tritons_python_client_calls_every_model(live_server: RunningServer) -> None:
    python = ROOT / ".venv-bench" / "bin" / "python"
    if not python.exists():
        pytest.skip("Triton's client lives in the benchmark environment (make bench-env)")
    models = sorted(live_server.server.registry.models)  # type: ignore[attr-defined]
    out = subprocess.run([str(python), "-c", _TRITON_CLIENT, live_server.address, *models], capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert [line.split()[0] for line in out] == models
    assert all("(2," in line for line in out)
