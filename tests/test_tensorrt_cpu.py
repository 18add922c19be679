"""Everything around TensorRT that needs no GPU: profiles, buckets, the engine cache, buffer sizing, FP16
variants, runtime selection, and that the CPU path never imports tensorrt or cuda."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.runtime.base import EngineError
from engines.runtime.factory import choose
from engines.runtime.tensorrt_engine import TensorIO, output_shape_for, plan_buffers
from engines.tensorrt.availability import Availability, availability
from engines.tensorrt.buckets import bucket_for, pad_batch, unpad
from engines.tensorrt.cache import BuilderSettings, BuildKey, Device, EngineCache
from engines.tensorrt.profiles import SpatialRange, batch_buckets, derive_profile, fits
from tests.conftest import ROOT

H200 = Device("NVIDIA H200", (9, 0))


def test_profile_follows_the_batcher_and_keeps_static_axes() -> None:
    p = derive_profile([("input", (-1, 3, 80, 80))], max_batch_size=32, preferred=(8, 16))
    (i,) = p.inputs
    assert (i.min, i.opt, i.max) == ((1, 3, 80, 80), (16, 3, 80, 80), (32, 3, 80, 80))
    assert derive_profile([("input", (-1, 3))], 8).inputs[0].opt == (8, 3)  # no preferred: opt at the max


def test_every_dynamic_input_of_a_multi_input_model_is_in_the_profile() -> None:
    p = derive_profile([("slow", (-1, 3, 4, 64, 64)), ("fast", (-1, 3, 16, 64, 64))], 4)
    assert [i.name for i in p.inputs] == ["slow", "fast"]
    assert all(i.max[0] == 4 and i.min[0] == 1 for i in p.inputs)


def test_dynamic_spatial_axes_need_a_range() -> None:
    with pytest.raises(ValueError, match="axis 2 is dynamic"):
        derive_profile([("input", (-1, 3, -1, -1))], 8)
    p = derive_profile([("input", (-1, 3, -1, -1))], 8, spatial=SpatialRange({2: (32, 221, 640), 3: (32, 166, 640)}))
    assert p.inputs[0].opt == (8, 3, 221, 166)
    assert fits(p, {"input": (3, 3, 221, 166)}) and not fits(p, {"input": (9, 3, 221, 166)})
    assert not fits(p, {"input": (1, 3, 700, 166)})


def test_buckets_and_padding() -> None:
    assert batch_buckets(12, (6,)) == (1, 2, 4, 6, 8, 12)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, (1, 2, 4, 8))
    x = {"input": np.arange(6, dtype=np.float32).reshape(3, 2)}
    padded = pad_batch(x, 4)
    assert padded["input"].shape == (4, 2) and padded["input"][3].tolist() == [4.0, 5.0]
    assert unpad({"y": padded["input"]}, 3)["y"].shape == (3, 2)


def key(**kw: object) -> BuildKey:
    base: dict[str, object] = dict(onnx_sha256="a" * 64, tensorrt_version="10.16.1", device=H200,
                                   profiles=(derive_profile([("input", (-1, 3, 80, 80))], 32),), precision="fp16",
                                   builder=BuilderSettings())
    base.update(kw)
    return BuildKey(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64},
    {"tensorrt_version": "11.4.0"},
    {"device": Device("NVIDIA H100 80GB HBM3", (9, 0))},
    {"device": Device("NVIDIA H200", (10, 0))},
    {"profiles": (derive_profile([("input", (-1, 3, 80, 80))], 16),)},
    {"precision": "fp32"},
    {"builder": BuilderSettings(optimization_level=5)},
])
def test_cache_key_changes_with_everything_that_invalidates_an_engine(change: dict) -> None:
    assert key().digest() != key(**change).digest()
    assert key().digest() == key().digest()


def test_engine_cache_store_lookup_invalidate_prune(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "minifasnet_v2")
    k = key()
    assert cache.lookup(k) is None
    path = cache.store(k, b"plan-bytes", 1.5, ["WARNING: something"])
    assert cache.lookup(k) == path and path.read_bytes() == b"plan-bytes"
    meta = json.loads((path.parent / "build.json").read_text())
    assert meta["key"]["gpu"] == "NVIDIA H200" and meta["key"]["compute_capability"] == [9, 0]
    # A half-written build (no metadata) is not a cache hit.
    (path.parent / "build.json").unlink()
    assert cache.lookup(k) is None
    cache.store(k, b"plan-bytes", 1.5, [])
    cache.invalidate(k)
    assert cache.lookup(k) is None and not cache.folder(k).exists()
    for i in range(5):
        cache.store(key(onnx_sha256=f"{i}" * 64), b"x", 0, [])
    keep = key(onnx_sha256="9" * 64)
    cache.store(keep, b"x", 0, [])
    cache.prune(keep, max_entries=3)
    assert len([p for p in cache.root.iterdir() if p.is_dir()]) == 3 and cache.lookup(keep) is not None
    assert cache.timing_cache_path(k).name == "timing-sm90-trt10.16.1.cache"


def test_buffers_are_sized_from_the_engine_profile() -> None:
    io = [TensorIO("input", True, np.dtype(np.float32), (32, 3, 80, 80)),
          TensorIO("logits", False, np.dtype(np.float32), (32, 3)),
          TensorIO("mask", False, np.dtype(np.float16), (32, 10))]
    assert plan_buffers(io) == {"input": 32 * 3 * 80 * 80 * 4, "logits": 32 * 3 * 4, "mask": 32 * 10 * 2}
    assert output_shape_for(5, io[1]) == (5, 3)
    with pytest.raises(EngineError, match="unbounded"):
        plan_buffers([TensorIO("x", True, np.dtype(np.float32), (-1, 3))])


def test_runtime_selection() -> None:
    none = availability(lambda: None, lambda: (False, 0))
    assert choose(True, none) == ("onnxruntime", "tensorrt is not installed")
    no_cuda = availability(lambda: "10.16.1", lambda: (False, 0))
    assert choose(True, no_cuda)[1] == "cuda-python (cuda.bindings) is not installed"
    no_gpu = availability(lambda: "10.16.1", lambda: (True, 0))
    assert choose(True, no_gpu) == ("onnxruntime", "no CUDA GPU is visible")
    gpu = availability(lambda: "10.16.1", lambda: (True, 1))
    assert gpu.tensorrt_usable and choose(True, gpu) == ("tensorrt", "TensorRT 10.16.1 with 1 GPU(s)")
    assert choose(False, gpu)[0] == "onnxruntime"
    runtime, reason = choose(True, gpu, lambda: "build failed: out of memory")
    assert runtime == "onnxruntime" and "out of memory" in reason


def test_this_machine_falls_back_to_onnxruntime_with_a_reason() -> None:
    avail = availability()
    if avail.tensorrt_usable:
        pytest.skip("TensorRT and a GPU are present here")
    assert isinstance(avail, Availability) and avail.reason


def test_the_cpu_path_imports_neither_tensorrt_nor_cuda() -> None:
    # Importing everything, and probing availability as the server does at start: without a GPU neither
    # TensorRT flavour is loaded, even where TensorRT-RTX is installed (as in CI).
    code = ("import sys, server.app, server.model_registry, engines.runtime.tensorrt_engine, engines.tensorrt.build; "
            "from engines.tensorrt.availability import availability; a = availability(); "
            "assert a.gpus or not a.tensorrt_usable; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', "
            "'tensorrt_rtx_bindings') or (m.split('.')[0] == 'cuda' and not a.cuda_python)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builder_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="optimization_level"):
        BuilderSettings(optimization_level=6)
