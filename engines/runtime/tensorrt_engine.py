"""TensorRT engines on cuda-python: one execution context and one non-default stream per instance, pinned host
buffers and device buffers sized from the engine's profile, tensors bound by name, ``execute_async_v3``, and
CUDA graphs per input shape (batch padded to a bucket) with fallback to plain execution.

Only imported on the GPU path (``tensorrt`` and ``cuda`` are imported inside functions). The shape and buffer
arithmetic lives in pure functions (``TensorIO``, ``plan_buffers``) that the CPU tests exercise.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.atomic_write import write_atomically
from engines.repository import ModelMetadata
from engines.runtime.base import EngineError, EngineInstance, InferTimings, Model, TensorSpec
from engines.tensorrt.buckets import bucket_for, pad_batch, unpad
from engines.tensorrt.flavour import Flavour

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorIO:
    """One engine tensor as the runtime needs it, read from the engine by name."""

    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]  # inputs: the profile's max; outputs: their shape at the max input shapes

    @property
    def max_bytes(self) -> int:
        return int(np.prod(self.max_shape)) * self.dtype.itemsize


def plan_buffers(tensors: Sequence[TensorIO]) -> dict[str, int]:
    """Bytes to allocate per tensor (device and pinned host alike): enough for the largest batch."""
    plan = {}
    for t in tensors:
        if any(d < 0 for d in t.max_shape):
            raise EngineError(f"tensor {t.name!r} has an unbounded shape {t.max_shape}: give the profile a max")
        plan[t.name] = t.max_bytes
    return plan


def output_shape_for(batch: int, out: TensorIO) -> tuple[int, ...]:
    """Outputs scale with the batch along axis 0 (the engines here are batch-major)."""
    return (batch, *out.max_shape[1:])


class _TrtLogger:
    """Collects TensorRT's log lines, so a failed build or deserialisation can say why."""

    def __init__(self, trt: Any) -> None:
        self.lines: list[str] = []
        lock = threading.Lock()
        lines = self.lines

        class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.WARNING:
                    with lock:
                        lines.append(f"{severity.name}: {msg}")
                    log.info("tensorrt %s: %s", severity.name, msg)

        self.logger = Logger()


_LOGGERS: dict[str, _TrtLogger] = {}


def trt_logger(trt: Any = None) -> _TrtLogger:
    """One logger per process and flavour (TensorRT keeps a process-wide pointer to it). ``trt``: the module
    (``tensorrt`` or ``tensorrt_rtx``); default ``tensorrt``."""
    if trt is None:
        trt = importlib.import_module("tensorrt")
    key = str(trt.__name__)
    if key not in _LOGGERS:
        _LOGGERS[key] = _TrtLogger(trt)
    return _LOGGERS[key]


def describe(engine: Any, trt: Any) -> list[TensorIO]:
    """Read every I/O tensor from the engine; output max shapes by setting inputs to their profile max."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ctx = engine.create_execution_context()
    try:
        io: list[TensorIO] = []
        for n in names:
            if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                max_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(n, 0)[2])
                if not ctx.set_input_shape(n, max_shape):
                    raise EngineError(f"cannot set {n} to its profile max {max_shape}")
                io.append(TensorIO(n, True, np.dtype(trt.nptype(engine.get_tensor_dtype(n))), max_shape))
        missing = ctx.infer_shapes()
        if missing:
            raise EngineError(f"shapes still unknown after setting every input: {missing}")
        for n in names:
            if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
                io.append(TensorIO(n, False, np.dtype(trt.nptype(engine.get_tensor_dtype(n))), shape))
        return io
    finally:
        del ctx


class _Executor:
    """A context bound to the instance's buffers; for CUDA graphs, one per captured shape (TensorRT advice)."""

    def __init__(self, engine: Any, io: Sequence[TensorIO], device: Mapping[str, Any],
                 runtime_config: Any = None) -> None:
        # TensorRT-RTX: contexts made from one runtime config share its runtime cache (just-in-time kernels).
        self.ctx = (engine.create_execution_context(runtime_config) if runtime_config is not None
                    else engine.create_execution_context())
        if self.ctx is None:
            raise EngineError("could not create an execution context (out of device memory?)")
        for t in io:
            if not self.ctx.set_tensor_address(t.name, device[t.name].ptr):
                raise EngineError(f"cannot bind tensor {t.name!r}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.graph: Any = None

    def set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if self.shapes.get(name) != shape:
                if not self.ctx.set_input_shape(name, shape):
                    raise EngineError(f"input {name!r}: shape {shape} is outside the engine's profile")
                self.shapes[name] = shape


class TensorRTInstance(EngineInstance):
    def __init__(self, engine: Any, io: Sequence[TensorIO], buckets: Sequence[int], cuda_graphs: bool,
                 max_graphs: int = 16, runtime_config: Any = None) -> None:
        from engines.runtime import cuda

        self._cuda = cuda
        self.io = list(io)
        self.inputs = [t for t in io if t.is_input]
        self.outputs = [t for t in io if not t.is_input]
        self.buckets = tuple(buckets)
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        plan = plan_buffers(io)
        self.stream = cuda.Stream()
        self.device = {n: cuda.DeviceBuffer(b) for n, b in plan.items()}
        self.host = {n: cuda.PinnedBuffer(b) for n, b in plan.items()}
        self.engine = engine
        self.runtime_config = runtime_config
        self.plain = _Executor(engine, io, self.device, runtime_config)
        self.graphs: OrderedDict[tuple[tuple[int, ...], ...], _Executor] = OrderedDict()
        self.seen: set[tuple[tuple[int, ...], ...]] = set()
        self.graph_failures = 0

    def _graph_for(self, shapes: dict[str, tuple[int, ...]]) -> _Executor | None:
        """The executor with a captured graph for these shapes; captured on a shape's second use, after the
        first (plain) run has warmed it up, as TensorRT requires."""
        key = tuple(shapes[t.name] for t in self.inputs)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        if key not in self.seen or len(self.graphs) >= self.max_graphs:
            self.seen.add(key)
            return None
        ex = _Executor(self.engine, self.io, self.device, self.runtime_config)
        ex.set_shapes(shapes)
        cuda = self._cuda
        try:
            if not ex.ctx.execute_async_v3(self.stream.ptr):  # warm-up run of this context before capture
                raise EngineError("warm-up enqueue failed")
            self.stream.synchronize()
            cuda.Graph.begin(self.stream)
            ok = ex.ctx.execute_async_v3(self.stream.ptr)
            if not ok:
                cuda.Graph.abort(self.stream)
                raise EngineError("enqueue refused during capture")
            ex.graph = cuda.Graph.end(self.stream)
        except (EngineError, cuda.CudaError) as exc:
            self.graph_failures += 1
            log.warning("CUDA graph capture failed for %s (%s); running without a graph", key, exc)
            self.seen.add(key)
            self.max_graphs = len(self.graphs)  # stop trying: the engine likely has uncapturable layers
            return None
        self.graphs[key] = ex
        return ex

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InferTimings]:
        t0 = time.perf_counter_ns()
        n = next(iter(inputs.values())).shape[0]
        size = bucket_for(n, self.buckets) if self.cuda_graphs else n
        batch = pad_batch(inputs, size) if size != n else dict(inputs)
        shapes = {t.name: tuple(batch[t.name].shape) for t in self.inputs}
        for t in self.inputs:
            arr = np.ascontiguousarray(batch[t.name], dtype=t.dtype)
            view = self.host[t.name].view(t.dtype, arr.shape)
            np.copyto(view, arr)
            self.stream.h2d(self.device[t.name].ptr, self.host[t.name].ptr, arr.nbytes)
        t1 = time.perf_counter_ns()
        ex = self._graph_for(shapes) if self.cuda_graphs else None
        if ex is not None:
            ex.set_shapes(shapes)
            ex.graph.launch(self.stream)
        else:
            self.plain.set_shapes(shapes)
            if not self.plain.ctx.execute_async_v3(self.stream.ptr):
                raise EngineError("execute_async_v3 failed")
        t2 = time.perf_counter_ns()
        views = {}
        for t in self.outputs:
            shape = output_shape_for(size, t)
            view = self.host[t.name].view(t.dtype, shape)
            self.stream.d2h(self.host[t.name].ptr, self.device[t.name].ptr, view.nbytes)
            views[t.name] = view
        self.stream.synchronize()  # outputs are valid only now
        outs = {k: np.array(v) for k, v in unpad(views, n).items()}
        t3 = time.perf_counter_ns()
        return outs, InferTimings(t1 - t0, t2 - t1, t3 - t2)

    def time_batches(self, inputs: Mapping[str, np.ndarray], iterations: int, graphs: bool,
                     transfers: bool) -> float:
        """Seconds per batch, with or without CUDA graphs and host<->device copies (what trtexec reports with
        --noCudaGraph / --includeDataTransfers)."""
        self.infer(inputs)  # warm-up; also loads the device buffers with this batch
        shapes = {t.name: tuple(inputs[t.name].shape) for t in self.inputs}
        ex = None
        if graphs:
            self.infer(inputs)
            ex = self._graph_for(shapes)
        self.plain.set_shapes(shapes)
        nbytes = {t.name: int(np.prod(shapes[t.name])) * t.dtype.itemsize for t in self.inputs}
        out_bytes = {t.name: int(np.prod(output_shape_for(next(iter(shapes.values()))[0], t)))
                     * t.dtype.itemsize for t in self.outputs}
        self.stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(iterations):
            if transfers:
                for t in self.inputs:
                    self.stream.h2d(self.device[t.name].ptr, self.host[t.name].ptr, nbytes[t.name])
            if ex is not None:
                ex.graph.launch(self.stream)
            elif not self.plain.ctx.execute_async_v3(self.stream.ptr):
                raise EngineError("execute_async_v3 failed")
            if transfers:
                for t in self.outputs:
                    self.stream.d2h(self.host[t.name].ptr, self.device[t.name].ptr, out_bytes[t.name])
        self.stream.synchronize()
        return (time.perf_counter() - t0) / iterations

    def close(self) -> None:
        """Reverse order of creation: graphs, contexts, buffers, stream."""
        for ex in self.graphs.values():
            if ex.graph is not None:
                ex.graph.destroy()
            del ex.ctx
        self.graphs.clear()
        del self.plain
        for h in self.host.values():
            h.free()
        for d in self.device.values():
            d.free()
        self.stream.destroy()


class TensorRTModel(Model):
    def __init__(self, plan_path: Path, meta: ModelMetadata, buckets: Sequence[int], cuda_graphs: bool = True,
                 max_batch_size: int | None = None, flavour: Flavour | None = None,
                 runtime_cache: Path | None = None) -> None:
        """``flavour``: TensorRT (default) or TensorRT-RTX; ``runtime_cache``: where TensorRT-RTX keeps its
        just-in-time kernels for this GPU between runs (loaded here, saved on close)."""
        trt = flavour.load() if flavour is not None else importlib.import_module("tensorrt")
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger.logger)
        before = len(self._logger.lines)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            reason = "; ".join(self._logger.lines[before:]) or "no reason logged"
            raise EngineError(f"cannot deserialise {plan_path}: {reason}")
        self.io = describe(self._engine, trt)
        self.name = meta.name
        self.version = meta.version
        self.runtime = f"{trt.__name__}:{trt.__version__}"
        self._runtime_config: Any = None
        self._runtime_cache_path = runtime_cache
        self._runtime_cache: Any = None
        if flavour is not None and flavour.rtx:
            self._runtime_config = self._engine.create_runtime_config()
            self._runtime_cache = self._runtime_config.create_runtime_cache()
            if runtime_cache is not None and runtime_cache.is_file():
                self._runtime_cache.deserialize(runtime_cache.read_bytes())
            self._runtime_config.set_runtime_cache(self._runtime_cache)
        self.inputs = tuple(TensorSpec(t.name, t.dtype, (-1, *t.max_shape[1:])) for t in self.io if t.is_input)
        self.outputs = tuple(TensorSpec(t.name, t.dtype, (-1, *t.max_shape[1:])) for t in self.io if not t.is_input)
        self.max_batch_size = max_batch_size or min(t.max_shape[0] for t in self.io if t.is_input)
        self.buckets = tuple(buckets)
        self.cuda_graphs = cuda_graphs
        self._instances: list[TensorRTInstance] = []

    def new_instance(self) -> EngineInstance:
        inst = TensorRTInstance(self._engine, self.io, self.buckets, self.cuda_graphs,
                                runtime_config=self._runtime_config)
        self._instances.append(inst)
        return inst

    def close(self) -> None:
        # Instances are closed by their batcher; then the engine, then the runtime that made it.
        if self._runtime_cache is not None and self._runtime_cache_path is not None:
            write_atomically(self._runtime_cache_path, bytes(self._runtime_cache.serialize()))
        self._instances.clear()
        del self._engine
        del self._runtime
