"""Test doubles for ``tensorrt`` and ``cuda.bindings.runtime``: just enough of both APIs (as NVIDIA's
Python API documents them) to execute facegate's TensorRT code paths on a CPU. Never used outside tests.

The fake engine computes ``output = input * 2`` (per item, flattened to the output's width) from fake device
memory; a stream that is capturing records enqueued work into a graph instead of running it.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from typing import Any

import numpy as np


class FakeCuda:
    """cuda.bindings.runtime: device memory is a dict of bytearrays, pinned host memory real ctypes buffers."""

    cudaStreamNonBlocking = 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self) -> None:
        self.device: dict[int, bytearray] = {}
        self.host: dict[int, Any] = {}
        self.next_ptr = 0x1000
        self.capturing: dict[int, list[Any]] = {}
        self.graphs: dict[int, list[Any]] = {}
        self.launches = 0
        self.freed: list[int] = []
        self.fail_capture = False

    def _ptr(self) -> int:
        self.next_ptr += 0x10000
        return self.next_ptr

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, 1

    def cudaGetDeviceProperties(self, dev: int) -> tuple[int, Any]:
        return 0, types.SimpleNamespace(name=b"Fake GPU\x00", major=9, minor=0)

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"cudaErrorFake"

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"fake error"

    def cudaGetLastError(self) -> tuple[int]:
        return (0,)

    def cudaMalloc(self, n: int) -> tuple[int, int]:
        p = self._ptr()
        self.device[p] = bytearray(n)
        return 0, p

    def cudaFree(self, p: int) -> tuple[int]:
        del self.device[p]
        self.freed.append(p)
        return (0,)

    def cudaMallocHost(self, n: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(n)
        addr = ctypes.addressof(buf)
        self.host[addr] = buf
        return 0, addr

    def cudaFreeHost(self, p: int) -> tuple[int]:
        del self.host[p]
        self.freed.append(p)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        return 0, self._ptr()

    def cudaStreamDestroy(self, s: int) -> tuple[int]:
        self.freed.append(int(s))
        return (0,)

    def cudaStreamSynchronize(self, s: int) -> tuple[int]:
        return (0,)

    def enqueue(self, stream: int, op: Any) -> None:
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(op)
        else:
            op()

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: int) -> tuple[int]:
        def op() -> None:
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.device[dst][:n] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(self.device[src][:n]), n)
        self.enqueue(stream, op)
        return (0,)

    def cudaStreamBeginCapture(self, s: int, mode: Any) -> tuple[int]:
        self.capturing[int(s)] = []
        return (0,)

    def cudaStreamEndCapture(self, s: int) -> tuple[int, int]:
        ops = self.capturing.pop(int(s), [])
        g = self._ptr()
        self.graphs[g] = ops
        return 0, g

    def cudaGraphInstantiate(self, g: int, flags: int) -> tuple[int, int]:
        return 0, g

    def cudaGraphLaunch(self, g: int, s: int) -> tuple[int]:
        self.launches += 1
        for op in self.graphs[g]:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, g: int) -> tuple[int]:
        return (0,)

    def cudaGraphDestroy(self, g: int) -> tuple[int]:
        self.graphs.pop(g, None)
        return (0,)


def make_fake_tensorrt(cuda: FakeCuda) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.16.1"  # type: ignore[attr-defined]

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(  # type: ignore[attr-defined]
        NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2)

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            lo, _, hi = self.engine.profile[name]
            if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def infer_shapes(self) -> list[str]:
            return [n for n in self.engine.inputs if n not in self.shapes]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            batch = self.shapes[self.engine.inputs[0]][0]
            return (batch, self.engine.out_width)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            if cuda.fail_capture and int(stream) in cuda.capturing:
                return False
            inp, out = self.engine.inputs[0], self.engine.outputs[0]
            shape = self.shapes[inp]
            src, dst = self.addresses[inp], self.addresses[out]

            def op() -> None:
                n = int(np.prod(shape))
                x = np.frombuffer(bytes(cuda.device[src][: n * 4]), np.float32).reshape(shape[0], -1)
                y = (x[:, : self.engine.out_width] * 2).astype(np.float32)
                cuda.device[dst][: y.nbytes] = y.tobytes()
            cuda.enqueue(stream, op)
            return True

    class Engine:
        def __init__(self, spec: dict[str, Any]) -> None:
            self.inputs = [spec["input"]]
            self.outputs = [spec["output"]]
            self.profile = {spec["input"]: [tuple(s) for s in spec["profile"]]}
            self.out_width = spec["out_width"]
            self.num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def get_tensor_profile_shape(self, name: str, idx: int) -> list[tuple[int, ...]]:
            return self.profile[name]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            try:
                spec = json.loads(plan)
            except ValueError:
                self.logger.log(Severity.ERROR, "the engine plan file is not compatible with this version")
                return None
            return Engine(spec)

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[tuple[int, ...]]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = [tuple(lo), tuple(opt), tuple(hi)]

    class TimingCache:
        def serialize(self) -> bytes:
            return b"timing"

    class Config:
        def __init__(self) -> None:
            self.profiles: list[Profile] = []
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool: int, n: int) -> None:
            self.workspace = n

        def add_optimization_profile(self, p: Profile) -> None:
            self.profiles.append(p)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache()

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> None:
            self.timing = cache

        def get_timing_cache(self) -> TimingCache:
            return self.timing

    class Network:
        num_layers = 0  # the fake parser adds no layers

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            assert flags == 1 << 1  # STRONGLY_TYPED, never EXPLICIT_BATCH
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            (name, shapes), = config.profiles[0].shapes.items()
            return json.dumps({"input": name, "output": "logits", "profile": shapes, "out_width": 3}).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    return trt
