"""ONNX Runtime engines: the CPU default, and the CUDA execution provider where onnxruntime-gpu is installed."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.repository import ModelMetadata
from engines.runtime.base import EngineError, EngineInstance, InferTimings, Model, TensorSpec


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it and a GPU is wanted; the CPU provider always last."""
    have = available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if prefer_gpu and p in have]
    return [*chosen, "CPUExecutionProvider"]


class _OrtInstance(EngineInstance):
    def __init__(self, session: ort.InferenceSession, output_names: list[str]) -> None:
        self._session: ort.InferenceSession | None = session
        self._outputs = output_names

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InferTimings]:
        t0 = time.perf_counter_ns()
        if self._session is None:
            raise EngineError("onnxruntime: the instance is closed")
        try:
            results = self._session.run(self._outputs, dict(inputs))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime failed: {exc}") from exc
        t1 = time.perf_counter_ns()
        return dict(zip(self._outputs, results, strict=True)), InferTimings(0, t1 - t0, 0)

    def close(self) -> None:
        self._session = None


class OnnxRuntimeModel(Model):
    """One ``InferenceSession`` shared by all instances: ``run`` is thread-safe and releases the GIL."""

    def __init__(self, path: Path, meta: ModelMetadata, providers: Sequence[str] | None = None,
                 intra_op_threads: int = 1, max_batch_size: int | None = None) -> None:
        opts = ort.SessionOptions()
        # Few intra-op threads per session: parallelism comes from instances and batching, and several models
        # share the cores; ORT's default (one thread per core per session) oversubscribes them.
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or choose_providers()))
        self._session: ort.InferenceSession | None = session
        self.name = meta.name
        self.version = meta.version
        provider = session.get_providers()[0]
        self.runtime = f"onnxruntime:{provider}"
        self.inputs = tuple(TensorSpec(t.name, np.dtype(t.dtype), t.shape) for t in meta.inputs)
        self.outputs = tuple(TensorSpec(t.name, np.dtype(t.dtype), t.shape) for t in meta.outputs)
        self.max_batch_size = max_batch_size or meta.max_batch_size
        names = {i.name for i in session.get_inputs()}
        if names != {t.name for t in self.inputs}:
            raise EngineError(f"{path}: inputs {sorted(names)} do not match the metadata of {meta.name}")

    def new_instance(self) -> EngineInstance:
        if self._session is None:
            raise EngineError(f"{self.name}: the model is closed")
        return _OrtInstance(self._session, [t.name for t in self.outputs])

    def close(self) -> None:
        # The session's weights and thread pool are freed once the batcher has closed its instances too; a server
        # object that outlives its stop (a test's, or one embedded in another program) no longer holds them.
        self._session = None
