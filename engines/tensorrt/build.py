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

from engines.declarations import ModelDeclaration, declaration_for
from engines.repository import ModelRepository
from engines.tensorrt.cache import BuilderSettings, BuildKey, Device, EngineCache
from engines.tensorrt.cli import engine_cli
from engines.tensorrt.fp16 import FP16_FILE, convert_fp16
from engines.tensorrt.profiles import InputProfile, Profile, SpatialRange, batch_buckets, derive_profile
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


def profile_for(decl: ModelDeclaration, req: EngineRequest) -> Profile:
    """Batch 1..max from the batcher settings; each dynamic non-batch axis over its declared (min, opt, max)."""
    inputs: list[InputProfile] = []
    for t in decl.inputs:
        spatial = SpatialRange(dict(decl.dynamic_axes.get(t.name, {})))
        inputs.extend(derive_profile([(t.name, t.shape)], req.max_batch_size, req.preferred, spatial).inputs)
    return Profile(tuple(inputs))


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
    decl = declaration_for(repo.load(req.name))
    onnx_path = onnx_for(repo, req.name, req.precision)
    key = BuildKey(sha256_file(onnx_path), trt_version, device, (profile_for(decl, req),), req.precision, settings)
    return key, onnx_path


def _hardware_level(trt: Any, level: str) -> Any:
    return {"none": trt.HardwareCompatibilityLevel.NONE,
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}[level]


def build_plan(onnx_path: Path, key: BuildKey, timing_cache: Path) -> tuple[bytes, list[str]]:
    """ONNX -> serialised engine with TensorRT (the 10.x and 11.x Python API)."""
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


def engine_requests(repo: ModelRepository, models: list[str], precision: str) -> list[EngineRequest]:
    """What to build per model: the batch range its declared batcher defaults can form."""
    out = []
    for m in models:
        b = declaration_for(repo.load(m)).batching
        out.append(EngineRequest(m, b.max_batch_size, b.preferred_batch_sizes, precision))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace-mib", type=int, default=4096)
    p.add_argument("--optimization-level", type=int, default=3)
    p.add_argument("--hardware-compatibility", choices=["none", "ampere_plus", "same_compute_capability"],
                   default="none")
    run = engine_cli(p, argv, "build TensorRT engines")
    if run is None:
        return 2
    settings = BuilderSettings(run.args.workspace_mib, run.args.optimization_level, run.args.hardware_compatibility)
    for req in engine_requests(run.repo, run.models, run.args.precision):
        ensure_engine(run.repo, req, settings)
        log.info("%s: buckets for CUDA graphs %s", req.name, batch_buckets(req.max_batch_size, req.preferred))
    return 0


if __name__ == "__main__":
    sys.exit(main())
