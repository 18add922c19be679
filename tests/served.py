"""The engine a running server says it serves a model on (runtime and precision from ListModels), rebuilt in the
test process: what the server's outputs must equal, whichever CPU runtime and precision ``auto`` chose here."""

from __future__ import annotations

from pathlib import Path

from engines.declarations import declaration_for
from engines.precision import INT8_FILE, passed_bf16, passed_int8
from engines.repository import ModelRepository
from engines.runtime.base import EngineInstance
from tests.conftest import RunningServer


def gated_precisions(repository_dir: Path, model: str) -> set[str]:
    """The CPU precisions the model may be served in here: FP32, and each reduced one whose gates passed."""
    from engines.runtime.cpu_choice import gated_pipelines

    repo = ModelRepository(repository_dir)
    decl = declaration_for(repo.load(model))
    allowed = {"fp32"}
    if "int8" in decl.cpu_precisions and passed_int8(repo, model)[0] is not None:
        allowed.add("int8")
    if "bf16" in decl.cpu_precisions and passed_bf16(repo, model, gated_pipelines(repo, decl))[0]:
        allowed.add("bf16")
    return allowed


def served_runtime(server: RunningServer, model: str) -> str:
    """The runtime string the server reports for ``model``, e.g. ``openvino:2026.4.1:CPU:bf16``."""
    from facegate.v1 import models_pb2, models_pb2_grpc

    listed = models_pb2_grpc.ModelServiceStub(server.channel()).ListModels(models_pb2.ListModelsRequest())
    return next(m.version.runtime for m in listed.models if m.version.name == model)


def served_engine(server: RunningServer, repository_dir: Path, model: str) -> tuple[EngineInstance, str]:
    """(an instance of the same engine, its precision): ONNX Runtime FP32, or OpenVINO in the served precision."""
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.openvino_engine import OpenVinoModel

    repo = ModelRepository(repository_dir)
    meta = repo.load(model)
    runtime = served_runtime(server, model)
    if runtime.startswith("openvino"):
        precision = runtime.rsplit(":", 1)[1]
        path = repo.model_dir(model) / INT8_FILE if precision == "int8" else repo.onnx_path(model)
        return OpenVinoModel(path, meta, precision=precision).new_instance(), precision
    assert runtime.startswith("onnxruntime"), runtime
    return OnnxRuntimeModel(repo.onnx_path(model), meta, ["CPUExecutionProvider"]).new_instance(), "fp32"
