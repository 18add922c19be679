"""Build TensorRT engines from the model repository's ONNX files (``make engines``).

``python -m engines.tensorrt.build --repository model_repository [--precision fp16] [--models ...]``

Per model: (for fp16) an FP16 ONNX variant with FP32 I/O; an optimisation profile derived from the model's
batcher settings; a strongly typed network (the only kind TensorRT 11 builds, opt-in on 10.x); workspace limit,
optimisation level and hardware compatibility from ``BuilderSettings``; the timing cache kept beside the engine;
the plan stored in the engine cache under its build key. An engine that is cached but fails to deserialise
(another GPU, another TensorRT) is deleted and rebuilt, and the reason is logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.repository import ModelMetadata, ModelRepository
from engines.specs import DETECTOR, DETECTOR_SPEC
from engines.tensorrt.cache import BuilderSettings, BuildKey, Device, EngineCache
from engines.tensorrt.fp16 import FP16_FILE, convert_fp16
from engines.tensorrt.profiles import Profile, SpatialRange, batch_buckets, derive_profile
from engines.weights import sha256_file

log = logging.getLogger("engines.tensorrt.build")


class EngineBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineRequest:
    """What to build for one model."""

    name: str
    max_batch_size: int
    preferred: tuple[int, ...] = ()
    precision: str = "fp16"


def detector_range() -> SpatialRange:
    """Height and width range of the detector input (``DetectorSpec.dynamic_axes``); opt is the 3:4 portrait every
    phone photo becomes."""
    opt = dict(zip((2, 3), DETECTOR_SPEC.export_size, strict=True))
    return SpatialRange({axis: (lo, opt[axis], hi) for axis, (lo, hi) in DETECTOR_SPEC.dynamic_axes().items()})


def profile_for(meta: ModelMetadata, req: EngineRequest) -> Profile:
    inputs = [(t.name, t.shape) for t in meta.inputs]
    spatial = detector_range() if meta.name == DETECTOR else None
    return derive_profile(inputs, req.max_batch_size, req.preferred, spatial)


def onnx_for(repo: ModelRepository, name: str, precision: str) -> Path:
    src = repo.onnx_path(name)
    if precision == "fp32":
        return src
    if precision != "fp16":
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    dst = src.with_name(FP16_FILE)
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        convert_fp16(src, dst)
    return dst


def build_key(repo: ModelRepository, req: EngineRequest, settings: BuilderSettings, trt_version: str,
              device: Device) -> tuple[BuildKey, Path]:
    meta = repo.load(req.name)
    onnx_path = onnx_for(repo, req.name, req.precision)
    key = BuildKey(sha256_file(onnx_path), trt_version, device, (profile_for(meta, req),), req.precision, settings)
    return key, onnx_path


def _hardware_level(trt: Any, level: str) -> Any:
    return {"none": trt.HardwareCompatibilityLevel.NONE,
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}[level]


def build_plan(onnx_path: Path, key: BuildKey, timing_cache: Path) -> tuple[bytes, list[str]]:
    """ONNX -> serialised engine with TensorRT (10.x or 11.x API; see docs/tensorrt.md)."""
    import tensorrt as trt

    from engines.runtime.tensorrt_engine import trt_logger

    logger = trt_logger()
    start = len(logger.lines)
    builder = trt.Builder(logger.logger)
    # Strongly typed: always on in 11.x (flag ignored), opt-in on 10.x. EXPLICIT_BATCH must not be named.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"ONNX parse failed for {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.builder.workspace_mib << 20)
    config.builder_optimization_level = key.builder.optimization_level
    if key.builder.hardware_compatibility != "none":
        config.hardware_compatibility_level = _hardware_level(trt, key.builder.hardware_compatibility)
    if key.builder.max_aux_streams is not None:
        config.max_aux_streams = key.builder.max_aux_streams
    for prof in key.profiles:
        p = builder.create_optimization_profile()
        for inp in prof.inputs:
            p.set_shape(inp.name, inp.min, inp.opt, inp.max)
        config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, True)  # ignore_mismatch: a cache from another device is merely not reused
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"build failed for {onnx_path}: {'; '.join(logger.lines[start:]) or 'no log'}")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_suffix(".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(timing_cache)
    return bytes(plan), logger.lines[start:]


def can_deserialize(plan_path: Path) -> str | None:
    """None if the plan loads on this GPU and TensorRT, else the reason TensorRT logged."""
    import tensorrt as trt

    from engines.runtime.tensorrt_engine import trt_logger

    logger = trt_logger()
    start = len(logger.lines)
    runtime = trt.Runtime(logger.logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        return "; ".join(logger.lines[start:]) or "deserialize_cuda_engine returned None"
    del engine
    return None


def ensure_engine(repo: ModelRepository, req: EngineRequest, settings: BuilderSettings) -> Path:
    """The cached plan for this model on this GPU and TensorRT, building (or rebuilding) it when needed."""
    import tensorrt as trt

    from engines.runtime.cuda import device_info

    name, cc = device_info(0)
    key, onnx_path = build_key(repo, req, settings, str(trt.__version__), Device(name, cc))
    cache = EngineCache(repo.model_dir(req.name))
    plan = cache.lookup(key)
    if plan is not None:
        reason = can_deserialize(plan)
        if reason is None:
            return plan
        log.warning("%s: cached engine %s does not load (%s); rebuilding", req.name, key.digest(), reason)
        cache.invalidate(key)
    log.info("%s: building %s engine (profile %s)", req.name, req.precision, key.profiles[0].as_key())
    t0 = time.time()
    data, lines = build_plan(onnx_path, key, cache.timing_cache_path(key))
    path = cache.store(key, data, time.time() - t0, lines)
    cache.prune(key)
    log.info("%s: built in %.1fs (%d bytes) -> %s", req.name, time.time() - t0, len(data), path)
    return path


def requests_from_config(models: list[str], precision: str) -> list[EngineRequest]:
    from server.config import ServerConfig

    cfg = ServerConfig()
    out = []
    for m in models:
        b = cfg.batcher_for(m, cfg.clip_batching if m.startswith("slowfast") else None)
        out.append(EngineRequest(m, b.max_batch_size, b.preferred_batch_sizes, precision))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", nargs="*", help="default: every model in the repository")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--workspace-mib", type=int, default=4096)
    p.add_argument("--optimization-level", type=int, default=3)
    p.add_argument("--hardware-compatibility", choices=["none", "ampere_plus", "same_compute_capability"],
                   default="none")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engines.runtime.select import availability

    avail = availability()
    if not avail.tensorrt_usable:
        log.error("cannot build TensorRT engines here: %s", avail.reason)
        return 2
    repo = ModelRepository(a.repository)
    settings = BuilderSettings(a.workspace_mib, a.optimization_level, a.hardware_compatibility)
    for req in requests_from_config(a.models or repo.names(), a.precision):
        ensure_engine(repo, req, settings)
        log.info("%s: buckets for CUDA graphs %s", req.name, batch_buckets(req.max_batch_size, req.preferred))
    return 0


if __name__ == "__main__":
    sys.exit(main())
