"""Build TensorRT or TensorRT-RTX engines from the model repository's ONNX files (``make engines``).

``python -m engines.tensorrt.build --repository model_repository [--precision fp16|fp32|both] [--models ...]``

Per model: (for fp16) an FP16 ONNX variant with FP32 I/O; an optimisation profile derived from the model's
batcher settings; a strongly typed network (the only kind TensorRT 11 and TensorRT-RTX build, opt-in on 10.x);
workspace limit, optimisation level and hardware compatibility from ``BuilderSettings``; for TensorRT-RTX, the
target compute capabilities (it builds ahead of time on the CPU: no GPU needed); the timing cache kept beside
the engine; the plan stored in the engine cache under its build key. An engine that is cached but fails to
deserialise (another GPU, another TensorRT) is deleted and rebuilt, and the reason is logged. Parser and builder
errors carry TensorRT's own messages (which name the ONNX node).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.atomic_write import write_atomically
from engines.declarations import ModelDeclaration, declaration_for
from engines.file_lock import once
from engines.repository import ModelRepository
from engines.tensorrt.cache import ANY_TARGET, BuilderSettings, BuildKey, Device, EngineCache
from engines.tensorrt.cli import engine_cli
from engines.tensorrt.flavour import DEFAULT_RTX_TARGETS, Flavour
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


def build_key(repo: ModelRepository, req: EngineRequest, settings: BuilderSettings, flavour: Flavour,
              device: Device, targets: tuple[str, ...] = ()) -> tuple[BuildKey, Path]:
    decl = declaration_for(repo.load(req.name))
    onnx_path = onnx_for(repo, req.name, req.precision)
    key = BuildKey(sha256_file(onnx_path), flavour.version, ANY_TARGET if flavour.rtx else device,
                   (profile_for(decl, req),), req.precision, settings, flavour.name,
                   tuple(targets) if flavour.rtx else ())
    return key, onnx_path


def _hardware_level(trt: Any, level: str) -> Any:
    return {"none": trt.HardwareCompatibilityLevel.NONE,
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}[level]


def parse_network(trt: Any, onnx_path: Path) -> tuple[Any, Any, Any, Any]:
    """(builder, network, parser, logger) for an ONNX file; parser errors name the failing node."""
    from engines.runtime.tensorrt_engine import trt_logger

    logger = trt_logger(trt)
    builder = trt.Builder(logger.logger)
    # Strongly typed: always on in 11.x and TensorRT-RTX, opt-in on 10.x. EXPLICIT_BATCH must not be named.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = f" (node {e.node_name()!r}, {e.node_operator()})" if hasattr(e, "node_name") else ""
            errors.append(f"{e.desc()}{node}" if hasattr(e, "desc") else str(e))
        raise EngineBuildError(f"ONNX parse failed for {onnx_path}: {'; '.join(errors)}")
    return builder, network, parser, logger


def network_summary(network: Any, trt: Any) -> dict[str, Any]:
    """Layer count and the data types of the layers' outputs in a parsed network (what runs in which precision)."""
    types: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            name = str(layer.get_output_type(j)).rsplit(".", 1)[-1]
            types[name] = types.get(name, 0) + 1
    return {"layers": int(network.num_layers), "output_types": types}


def build_plan(onnx_path: Path, key: BuildKey, timing_cache: Path, flavour: Flavour | None = None
               ) -> tuple[bytes, list[str], dict[str, Any]]:
    """ONNX -> (serialised engine, log lines, network summary) with TensorRT 10.x/11.x or TensorRT-RTX."""
    flavour = flavour or Flavour(key.flavour, key.tensorrt_version)
    trt = flavour.load()
    builder, network, _parser, logger = parse_network(trt, onnx_path)
    start = len(logger.lines)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.builder.workspace_mib << 20)
    config.builder_optimization_level = key.builder.optimization_level
    if key.builder.hardware_compatibility != "none":
        config.hardware_compatibility_level = _hardware_level(trt, key.builder.hardware_compatibility)
    if key.builder.max_aux_streams is not None:
        config.max_aux_streams = key.builder.max_aux_streams
    if flavour.rtx:  # ahead of time, for each target GPU generation
        config.num_compute_capabilities = len(key.targets)
        for i, target in enumerate(key.targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target), i)
    for prof in key.profiles:
        p = builder.create_optimization_profile()
        for inp in prof.inputs:
            p.set_shape(inp.name, inp.min, inp.opt, inp.max)
        config.add_optimization_profile(p)
    if not flavour.rtx:  # TensorRT-RTX times nothing at build time (its timing cache calls are no-ops)
        cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, True)  # ignore_mismatch: a cache from another device is merely not reused
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"build failed for {onnx_path}: {'; '.join(logger.lines[start:]) or 'no log'}")
    if not flavour.rtx:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan), logger.lines[start:], network_summary(network, trt)


def can_deserialize(plan_path: Path, flavour: Flavour) -> str | None:
    """None if the plan loads on this GPU and TensorRT, else the reason TensorRT logged."""
    from engines.runtime.tensorrt_engine import trt_logger

    trt = flavour.load()
    logger = trt_logger(trt)
    start = len(logger.lines)
    runtime = trt.Runtime(logger.logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        return "; ".join(logger.lines[start:]) or "deserialize_cuda_engine returned None"
    del engine
    return None


def ensure_engine(repo: ModelRepository, req: EngineRequest, settings: BuilderSettings,
                  flavour: Flavour | None = None, device: Device | None = None,
                  targets: tuple[str, ...] = DEFAULT_RTX_TARGETS) -> Path:
    """The cached plan for this model, flavour and GPU (or RTX targets), building (or rebuilding) it when needed.
    ``device`` None: the GPU at hand (TensorRT needs one; TensorRT-RTX builds without one, then the cached plan
    is not test-loaded)."""
    if flavour is None:
        from engines.tensorrt.flavour import TENSORRT, probe

        flavour = probe(TENSORRT)
        if flavour is None:
            raise EngineBuildError("tensorrt is not installed")
    gpu = device
    if gpu is None and not flavour.rtx:
        from engines.runtime.cuda import device_info

        name, cc = device_info(0)
        gpu = Device(name, cc)
    key, onnx_path = build_key(repo, req, settings, flavour, gpu or ANY_TARGET, targets)
    cache = EngineCache(repo.model_dir(req.name))
    # Workers (--workers) or replicas starting together on one repository build each engine once: the first builds
    # while the others wait (a build takes GPU memory and minutes), then they load its plan.
    return once(cache.lock_path(key), lambda: _usable(cache, key, flavour, gpu, req.name),
                lambda: _build(cache, key, onnx_path, flavour, req))


def _usable(cache: EngineCache, key: BuildKey, flavour: Flavour, gpu: Device | None, name: str) -> Path | None:
    """The cached plan for ``key`` if there is one that loads here (where there is a GPU to load it on); a plan
    that does not load is removed."""
    plan = cache.lookup(key)
    if plan is None:
        return None
    reason = can_deserialize(plan, flavour) if gpu is not None else None
    if reason is None:
        return plan
    log.warning("%s: cached engine %s does not load (%s); rebuilding", name, key.digest(), reason)
    cache.invalidate(key)
    return None


def _build(cache: EngineCache, key: BuildKey, onnx_path: Path, flavour: Flavour, req: EngineRequest) -> Path:
    log.info("%s: building %s %s engine (profile %s%s)", req.name, flavour.label(), req.precision,
             key.profiles[0].as_key(), f", targets {','.join(key.targets)}" if key.targets else "")
    t0 = time.time()
    data, lines, summary = build_plan(onnx_path, key, cache.timing_cache_path(key), flavour)
    path = cache.store(key, data, time.time() - t0, lines, {"network": summary, "onnx": onnx_path.name})
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
    p.add_argument("--rtx-targets", nargs="+", default=list(DEFAULT_RTX_TARGETS),
                   help="TensorRT-RTX target compute capabilities (SM80 SM86 SM89 SM120 SM121; SM75 cannot "
                        "compile FP32 GEMMs)")
    run = engine_cli(p, argv, "build TensorRT engines", build_only=True)
    if run is None:
        return 2
    settings = BuilderSettings(run.args.workspace_mib, run.args.optimization_level, run.args.hardware_compatibility)
    precisions = ["fp32", "fp16"] if run.args.precision == "both" else [run.args.precision]
    for precision in precisions:
        for req in engine_requests(run.repo, run.models, precision):
            ensure_engine(run.repo, req, settings, run.flavour, run.device, tuple(run.args.rtx_targets))
            log.info("%s: buckets for CUDA graphs %s", req.name, batch_buckets(req.max_batch_size, req.preferred))
    return 0


if __name__ == "__main__":
    sys.exit(main())
