"""OpenVINO on the CPU: the same ONNX files as ONNX Runtime, compiled by OpenVINO's CPU plugin.

One compiled model per ``Model``; each instance owns an infer request (requests are not thread-safe, compiled
models are). Few threads per instance, for the same reason as ONNX Runtime's settings: the parallelism comes from
instances and batching, and several models share the cores. The compiled model has one stream per instance, because
the CPU plugin runs one request at a time per stream: two instances on one stream took turns (RetinaFace, batch 8,
two requests from two threads: 428-444 items/s against 439-445 for one; two streams: 779-862; Zen 4 EPYC, 2 cores).
Dynamic batch (and the detector's dynamic height and width) are kept: OpenVINO's CPU plugin runs dynamic shapes.
Where every input axis but the batch is fixed (the classifiers, the SlowFast members), each batch size up to a limit
is also compiled with static shapes, and a batch of that size runs there: the plugin then skips the shape inference
and buffer reallocation a dynamic call makes, and picks kernels for the exact shape. The outputs are bit-identical to
the dynamic model's. Measured on the AMX Xeon, bf16, one thread, interleaved rounds: MiniFASNetV2 0.903 -> 0.741 ms
at batch 1 (1.22x), 0.444 -> 0.420 ms an item at batch 8 (1.06x); a SlowFast member 2.370 -> 2.086 (1.14x) and
2.100 -> 1.884 ms an item (1.11x). Each static size costs ~0.1 s of compilation when the model loads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.machine import has_bf16
from engines.repository import ModelMetadata
from engines.runtime.base import EngineError, EngineInstance, InferTimings, Model, TensorSpec
from engines.runtime.openvino_cache import CompiledCache
from engines.weights import sha256_file

PRECISIONS = ("fp32", "bf16", "int8")  # int8: ``path`` is the QDQ variant (engines.precision)


def cpu_config(threads: int, precision: str = "fp32", streams: int = 1) -> dict[str, Any]:
    """How every model is compiled for the CPU (also by the Triton peer in the benchmarks, to compare like with
    like): ``streams`` requests at once (one per instance), each on ``threads`` threads. The plugin shares its
    thread count among the streams, so it is ``threads * streams`` (with 1 thread, a second stream is silently
    dropped). No CPU pinning: OpenVINO pins each compiled model's threads to cores of its choosing, and with several
    models in one process (three SlowFast members, two liveness classifiers) it put them all on the same core.
    Measured (AMD EPYC, 2 cores): the three members called in parallel took 23.4 ms pinned, the sum of their solo
    times, and 15.9 ms unpinned. The server owns its threads; the OS scheduler places them."""
    streams = max(1, streams)
    return {"INFERENCE_NUM_THREADS": max(1, threads) * streams, "NUM_STREAMS": streams, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}


class _OvInstance(EngineInstance):
    def __init__(self, request: Any, outputs: list[str], fixed: dict[int, Any] | None = None) -> None:
        self._request = request
        self._outputs = outputs
        self._fixed = fixed or {}  # batch size -> a request of the model compiled for exactly that batch

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InferTimings]:
        t0 = time.perf_counter_ns()
        batch = len(next(iter(inputs.values()))) if inputs else 0
        request = self._fixed.get(batch, self._request)
        if request is None:
            raise EngineError("openvino: the instance is closed")
        try:
            # share_inputs: the request reads the caller's arrays in place (the call is synchronous, so they outlive
            # it) instead of copying them into its own tensors while holding the GIL (a batch of clips is 0.8 MB
            # each).
            results = request.infer(dict(inputs), share_inputs=True)
        except Exception as exc:  # OpenVINO raises its own exception types
            raise EngineError(f"openvino failed: {exc}") from exc
        t1 = time.perf_counter_ns()
        by_name = {k.get_any_name(): v for k, v in results.items()}
        # The request reuses its output tensors on the next call: copy what leaves the instance.
        out = {name: np.array(by_name[name], copy=True) for name in self._outputs}
        return out, InferTimings(0, t1 - t0, time.perf_counter_ns() - t1)

    def close(self) -> None:
        self._request, self._fixed = None, {}


class OpenVinoModel(Model):
    def __init__(self, path: Path, meta: ModelMetadata, threads: int = 1, precision: str = "fp32",
                 max_batch_size: int | None = None, streams: int = 1, static_batches: Sequence[int] = (),
                 cache: CompiledCache | None = None) -> None:
        """``threads`` per instance; ``streams``: the instances that will run at once (the batcher's);
        ``static_batches``: batch sizes also compiled with static shapes, where no other input axis is dynamic;
        ``cache``: where compiled models are kept between starts (``engines.runtime.openvino_cache``)."""
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16" and not has_bf16():
            raise EngineError("this CPU has no bf16 support (OpenVINO lists no BF16 capability)")
        core = ov.Core()
        config = cpu_config(threads, precision, streams)
        model = core.read_model(str(path))
        digest = sha256_file(path) if cache is not None else ""

        def compile_model(m: Any, shapes: dict[str, list[int]] | None = None) -> Any:
            if cache is None:
                return core.compile_model(m, "CPU", config)
            return cache.compile(core, m, digest, config, shapes)

        self._compiled = compile_model(model)
        names = {n for p in self._compiled.inputs for n in p.get_names()}
        if not {t.name for t in meta.inputs} <= names:
            raise EngineError(f"{path}: inputs {sorted(names)} do not match the metadata of {meta.name}")
        self._static: dict[int, Any] = {}
        if all(d > 0 for t in meta.inputs for d in t.shape[1:]):
            for batch in sorted({b for b in static_batches if b >= 1}):
                shapes = {t.name: [batch, *t.shape[1:]] for t in meta.inputs}
                fixed = model.clone()
                fixed.reshape({fixed.input(name): shape for name, shape in shapes.items()})
                self._static[batch] = compile_model(fixed, shapes)
        self.name = meta.name
        self.version = meta.version
        self.precision = precision
        self.runtime = f"openvino:{ov.__version__.split('-')[0]}:CPU:{precision}"
        self.inputs = tuple(TensorSpec(t.name, np.dtype(t.dtype), t.shape) for t in meta.inputs)
        self.outputs = tuple(TensorSpec(t.name, np.dtype(t.dtype), t.shape) for t in meta.outputs)
        self.max_batch_size = max_batch_size or meta.max_batch_size

    def new_instance(self) -> EngineInstance:
        if self._compiled is None:
            raise EngineError(f"{self.name}: the model is closed")
        return _OvInstance(self._compiled.create_infer_request(), [t.name for t in self.outputs],
                           {b: c.create_infer_request() for b, c in self._static.items()})

    def close(self) -> None:
        # Each compiled model holds its weights and its plugin's threads (~1 GB and ~95 threads for the five models
        # of a server) until nothing refers to it; the batcher has closed its instances' requests by now.
        self._compiled, self._static = None, {}

    @property
    def static_batches(self) -> tuple[int, ...]:
        """The batch sizes that run on a model compiled for exactly that size."""
        return tuple(self._static)
