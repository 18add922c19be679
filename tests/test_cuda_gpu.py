"""cuda-python on a real GPU: the buffers, stream and CUDA graphs the TensorRT runtime is built on. Needs only
cuda-python and a GPU (no TensorRT, no server), so it runs on any GPU machine; marked ``gpu``, it skips with the
reason elsewhere. Self-contained (no conftest): ``pytest --noconftest -m gpu tests/test_cuda_gpu.py``."""

from __future__ import annotations

import numpy as np
import pytest

from engines.tensorrt.availability import probe_cuda

HAS_CUDA, GPUS, CC = probe_cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and GPUS), reason="needs cuda-python and a GPU")]


def test_buffers_and_stream_round_trip() -> None:
    from engines.runtime import cuda

    stream, host, dev = cuda.Stream(), cuda.PinnedBuffer(1 << 20), cuda.DeviceBuffer(1 << 20)
    src = host.view(np.dtype(np.float32), (1 << 18,))
    src[:] = np.arange(1 << 18, dtype=np.float32)
    stream.h2d(dev.ptr, host.ptr, 1 << 20)
    stream.synchronize()
    src[:] = 0
    stream.d2h(host.ptr, dev.ptr, 1 << 20)
    stream.synchronize()
    assert np.array_equal(src, np.arange(1 << 18, dtype=np.float32))
    dev.free()
    host.free()
    stream.destroy()


def test_a_captured_graph_replays_with_the_buffers_current_contents() -> None:
    from engines.runtime import cuda

    stream = cuda.Stream()
    a, b, dev = cuda.PinnedBuffer(4096), cuda.PinnedBuffer(4096), cuda.DeviceBuffer(4096)
    va, vb = a.view(np.dtype(np.int32), (1024,)), b.view(np.dtype(np.int32), (1024,))
    cuda.Graph.begin(stream)
    stream.h2d(dev.ptr, a.ptr, 4096)
    stream.d2h(b.ptr, dev.ptr, 4096)
    graph = cuda.Graph.end(stream)
    for k in range(3):  # the same graph, new data each time: what the TensorRT runtime relies on
        va[:] = np.arange(1024, dtype=np.int32) * (k + 1)
        graph.launch(stream)
        stream.synchronize()
        assert np.array_equal(vb, va)
    graph.destroy()
    for buf in (a, b):
        buf.free()
    dev.free()
    stream.destroy()


def test_a_failed_capture_is_aborted_and_plain_work_goes_on() -> None:
    from engines.runtime import cuda

    stream, host, dev = cuda.Stream(), cuda.PinnedBuffer(256), cuda.DeviceBuffer(256)
    cuda.Graph.begin(stream)
    with pytest.raises(cuda.CudaError):
        stream.synchronize()  # not allowed while capturing: the capture is invalidated
    cuda.Graph.abort(stream)
    v = host.view(np.dtype(np.uint8), (256,))
    v[:] = 7
    stream.h2d(dev.ptr, host.ptr, 256)
    v[:] = 0
    stream.d2h(host.ptr, dev.ptr, 256)
    stream.synchronize()
    assert (v == 7).all()
    host.free()
    dev.free()
    stream.destroy()
