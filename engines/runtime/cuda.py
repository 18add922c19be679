"""A thin, checked layer over cuda-python's runtime API (``cuda.bindings.runtime``).

Every call returns ``(err, *values)``; ``check`` raises ``CudaError`` with the error's name when err != 0, so no
failure passes silently. The runtime API uses the device's primary context, so worker threads need no context
juggling (the reason PyCUDA is not used). Imported only on the GPU path.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class CudaError(RuntimeError):
    pass


def _rt() -> Any:
    from cuda.bindings import runtime as cudart

    return cudart


def check(result: Any) -> Any:
    """Unpack ``(err, *values)``: raise on error, return the value(s)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, *values = result
    if int(err) != 0:
        cudart = _rt()
        name = cudart.cudaGetErrorName(err)[1]
        text = cudart.cudaGetErrorString(err)[1]
        raise CudaError(f"{name.decode() if isinstance(name, bytes) else name}: "
                        f"{text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    return int(check(_rt().cudaGetDeviceCount()))


def device_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    props = check(_rt().cudaGetDeviceProperties(device))
    name = props.name
    name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    return name, (int(props.major), int(props.minor))


class DeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(_rt().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(_rt().cudaFree(self.ptr))
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory with a numpy view (async copies need pinned memory to overlap)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(_rt().cudaMallocHost(self.nbytes)))
        self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self.nbytes:
            raise ValueError(f"{shape} {dtype} needs {n} bytes; the buffer has {self.nbytes}")
        return self.bytes[:n].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(_rt().cudaFreeHost(self.ptr))
            self.ptr = 0


class Stream:
    """A non-default, non-blocking stream (the default stream forces extra synchronisation in TensorRT)."""

    def __init__(self) -> None:
        cudart = _rt()
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def h2d(self, dst: int, src: int, nbytes: int) -> None:
        cudart = _rt()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))

    def d2h(self, dst: int, src: int, nbytes: int) -> None:
        cudart = _rt()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle))

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(_rt().cudaStreamDestroy(self.handle))
            self.handle = None


class Graph:
    """A captured CUDA graph and its executable instance."""

    def __init__(self, graph: Any, exec_: Any) -> None:
        self.graph = graph
        self.exec = exec_

    @staticmethod
    def begin(stream: Stream) -> None:
        cudart = _rt()
        # Thread-local capture: other threads' CUDA calls cannot invalidate this capture (TensorRT/Triton do this).
        check(cudart.cudaStreamBeginCapture(stream.handle,
                                            cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    @staticmethod
    def end(stream: Stream) -> Graph:
        cudart = _rt()
        graph = check(cudart.cudaStreamEndCapture(stream.handle))
        return Graph(graph, check(cudart.cudaGraphInstantiate(graph, 0)))

    @staticmethod
    def abort(stream: Stream) -> None:
        """End a failed capture and clear the sticky error, so plain execution can continue."""
        cudart = _rt()
        try:
            cudart.cudaStreamEndCapture(stream.handle)
        finally:
            cudart.cudaGetLastError()

    def launch(self, stream: Stream) -> None:
        check(_rt().cudaGraphLaunch(self.exec, stream.handle))

    def destroy(self) -> None:
        cudart = _rt()
        if self.exec is not None:
            check(cudart.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if self.graph is not None:
            check(cudart.cudaGraphDestroy(self.graph))
            self.graph = None
