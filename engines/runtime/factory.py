"""The runtime choice, in one place: given a model's declaration and batcher settings, an engine behind the
runtime interface (``Model``) and the reason it runs where it runs.

TensorRT when its declaration allows it and TensorRT, cuda-python and a GPU are all present and the engine builds
or loads; else ONNX Runtime (CUDA provider where installed, else the CPU). The tensorrt and cuda imports stay
inside the TensorRT modules, imported only on that branch, so a CPU server never loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines.batching import BatcherConfig
from engines.declarations import CPU_RUNTIMES, ONNXRUNTIME, OPENVINO, TENSORRT, ModelDeclaration
from engines.machine import usable_cpus
from engines.precision import INT8_FILE
from engines.repository import ModelRepository
from engines.runtime.base import Model
from engines.runtime.cpu_choice import OPENVINO_BF16, OPENVINO_INT8, choose_cpu_runtime
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel, choose_providers
from engines.runtime.openvino_cache import DIRECTORY as OPENVINO_CACHE_DIR
from engines.runtime.openvino_cache import CompiledCache
from engines.tensorrt.availability import Availability, availability
from engines.tensorrt.cache import BuilderSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSettings:
    prefer_gpu: bool = True
    """Use a GPU runtime when one is installed and a GPU is present."""
    intra_op_threads: int = 1
    """Engine threads per model (ONNX Runtime session, OpenVINO compiled model); parallelism comes from instances
    and batching."""
    group_threads: int = 0
    """Engine threads per model of a group every request calls at once (the ensemble's members): 0 = one per core
    where the group outnumbers the cores, else ``intra_op_threads`` (``engine_threads``); > 0 sets it."""
    tensorrt_precision: str = "fp16"
    """Engine precision on GPUs: "fp16" (an FP16 ONNX variant with FP32 I/O) or "fp32"."""
    tensorrt_builder: BuilderSettings = field(default_factory=BuilderSettings)
    cuda_graphs: bool = True
    """Replay CUDA graphs per batch bucket on TensorRT (falls back to plain execution if capture fails)."""
    cpu_runtime: str = "auto"
    """On the CPU: "onnxruntime", "openvino", or "auto" (what measures faster for each model on this machine
    class, measured once and cached beside the model)."""
    int8: bool = True
    """Let ``auto`` serve a model's INT8 variant where it passed its parity gate (precision.json) and measures
    faster; false keeps every model out of INT8."""
    bf16: bool = True
    """Let ``auto`` serve a model in bf16 where the CPU has bf16 arithmetic, the model declares it and the gates
    of its pipelines passed on this machine class, and it measures faster; false keeps every model out of bf16."""
    openvino_static_batches: int = 8
    """On OpenVINO, batch sizes 1 to this (at most the model's largest batch) also run on a model compiled for
    exactly that size, where no input axis but the batch is dynamic: 1.06-1.22x faster per item (measured,
    ``engines.runtime.openvino_engine``; CheckLiveness c32 +2-6 % in process). Each costs, when the model loads,
    ~0.1 s of compilation, 10-17 MB and two idle plugin threads (with the defaults, the five OpenVINO models: +4.8 s,
    +400 MB, +80 threads; AMX Xeon). 0 = dynamic only."""
    openvino_cache: bool = True
    """Keep OpenVINO's compiled models in ``<model>/openvino-cache`` in the repository and import them at the next
    start (``engines.runtime.openvino_cache``): a server's start, most of which is compiling, went from 27-32 s to
    9-10 s (AVX2 EPYC). Deleting the directory is always safe; a read-only repository only loses the saving."""
    openvino_cache_days: float = 30.0
    """When a model loads, its cached compiled models that no start imported for this many days are removed (those of
    an older OpenVINO or older settings: ~15 MB per model each). 0 = never remove."""
    models: dict[str, str] = field(default_factory=dict)
    """Per-model runtime ([runtime.models] name = "auto" | "onnxruntime" | "openvino" | "tensorrt")."""

    def threads_for(self, group: int = 1) -> int:
        """Engine threads for a model called together with ``group - 1`` others (``engine_threads``)."""
        if group > 1 and self.group_threads > 0:
            return self.group_threads
        return engine_threads(self.intra_op_threads, group)

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1 or self.group_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 1 and group_threads >= 0, got {self.intra_op_threads} "
                             f"and {self.group_threads}")
        if self.openvino_cache_days < 0:
            raise ValueError(f"openvino_cache_days must be >= 0, got {self.openvino_cache_days}")
        if not 0 <= self.openvino_static_batches <= 64:
            raise ValueError(f"openvino_static_batches must lie in [0, 64], got {self.openvino_static_batches}")
        for name, value in {"cpu_runtime": self.cpu_runtime, **self.models}.items():
            allowed = ("auto", *CPU_RUNTIMES) + ((TENSORRT,) if name != "cpu_runtime" else ())
            if value not in allowed:
                raise ValueError(f"runtime for {name!r} must be one of {allowed}, got {value!r}")


def choose(prefer_gpu: bool, avail: Availability, engine_ok: Callable[[], str | None] | None = None,
           allowed: tuple[str, ...] = (ONNXRUNTIME, TENSORRT)) -> tuple[str, str]:
    """(runtime, reason): "tensorrt" or "onnxruntime". ``engine_ok`` builds or loads the engine and returns an
    error message on failure, in which case the model falls back to ONNX Runtime."""
    if not prefer_gpu:
        return ONNXRUNTIME, "GPU runtimes disabled (--cpu-only)"
    if TENSORRT not in allowed:
        return ONNXRUNTIME, "the model's declaration does not allow TensorRT"
    if not avail.tensorrt_usable:
        return ONNXRUNTIME, avail.reason
    if engine_ok is not None:
        error = engine_ok()
        if error:
            return ONNXRUNTIME, f"TensorRT engine unavailable ({error}); using ONNX Runtime"
    return TENSORRT, avail.reason


def engine_threads(base: int, group: int = 1, cores: int | None = None) -> int:
    """Engine threads for a model that each request calls together with ``group - 1`` others (an ensemble's
    members, called at once for every clip). One thread each suits a group that fits the cores. A group larger
    than the cores does not: the scheduler keeps each thread on its core, so 3 single-threaded members on 2 cores
    ran in two rounds (13.9 ms for one clip, Zen 4 EPYC; 6.7 ms each alone) where 2 threads each shared both
    cores (10.4 ms). Such a group's models get a thread per core."""
    cores = cores or usable_cpus()
    return max(base, cores) if group > cores else base


class EngineFactory:
    """Creates the engine of each model; probes TensorRT once (lazily, never at import time)."""

    def __init__(self, repository: ModelRepository, settings: RuntimeSettings,
                 avail: Availability | None = None) -> None:
        self.repository = repository
        self.settings = settings
        self.availability = avail or (availability() if settings.prefer_gpu else
                                      Availability(None, False, 0, "GPU runtimes disabled"))

    def create(self, decl: ModelDeclaration, batching: BatcherConfig, group: int = 1) -> tuple[Model, str]:
        """(engine, reason). ``group``: how many models each request calls together with this one (CPU threads,
        ``engine_threads``). Slow (may build a TensorRT engine): call it off the event loop."""
        model, reason = self._create(decl, batching, group)
        # After the load, which refreshed the blobs it imported; whatever runtime now serves the model, so the
        # blobs of one that moved off OpenVINO go too.
        self._prune_openvino_cache(decl.name)
        return model, reason

    def _prune_openvino_cache(self, name: str) -> None:
        days = self.settings.openvino_cache_days
        if not self.settings.openvino_cache or days <= 0:
            return
        removed, freed = CompiledCache(self.repository.model_dir(name) / OPENVINO_CACHE_DIR).prune(days * 86400)
        if removed:
            log.info("%s: removed %d stale cache file(s), %.1f MB (compiled models no start imported for %g days, "
                     "temporary files over an hour old)", name, removed, freed / 1e6, days)

    def _create(self, decl: ModelDeclaration, batching: BatcherConfig, group: int) -> tuple[Model, str]:
        meta = self.repository.load(decl.name)
        threads = self.settings.threads_for(group)
        plan = []
        flavour = self.availability.chosen

        def tensorrt_engine() -> str | None:
            from engines.tensorrt.build import EngineRequest, ensure_engine

            try:
                req = EngineRequest(decl.name, batching.max_batch_size, batching.preferred_batch_sizes,
                                    self.settings.tensorrt_precision)
                plan.append(ensure_engine(self.repository, req, self.settings.tensorrt_builder, flavour))
            except Exception as exc:  # any build/load failure falls back to ONNX Runtime for this model
                log.exception("%s: TensorRT engine unavailable", decl.name)
                return str(exc)
            return None

        wanted = self.settings.models.get(decl.name, "auto")
        allowed = tuple(r for r in decl.runtimes if wanted in ("auto", TENSORRT) or r != TENSORRT)
        runtime, reason = choose(self.settings.prefer_gpu, self.availability, tensorrt_engine, allowed)
        if runtime == TENSORRT:
            from engines.runtime.tensorrt_engine import TensorRTModel
            from engines.tensorrt.profiles import batch_buckets

            buckets = batch_buckets(batching.max_batch_size, batching.preferred_batch_sizes)
            runtime_cache = None
            if flavour is not None and flavour.rtx:
                from engines.runtime.cuda import device_info
                from engines.tensorrt.cache import Device, runtime_cache_name

                runtime_cache = plan[0].parent / runtime_cache_name(Device(*device_info(0)))
            return TensorRTModel(plan[0], meta, buckets, self.settings.cuda_graphs, batching.max_batch_size,
                                 flavour, runtime_cache), reason
        if self.settings.prefer_gpu and "CUDAExecutionProvider" in choose_providers(True):
            return self._onnxruntime(decl, meta, threads), reason
        cpu = wanted if wanted in CPU_RUNTIMES else self.settings.cpu_runtime
        static = min(self.settings.openvino_static_batches, batching.max_batch_size)  # OpenVINO's sizes 1..static
        if cpu == "auto":
            cpu, why = choose_cpu_runtime(self.repository, decl, threads, self.settings.int8, self.settings.bf16,
                                          static)
            reason = f"{reason}; on the CPU: {why}"
        else:
            reason = f"{reason}; on the CPU: {cpu} (configured)"
        if cpu in (OPENVINO, OPENVINO_INT8, OPENVINO_BF16) and OPENVINO in decl.runtimes:
            from engines.runtime.openvino_engine import OpenVinoModel

            # For INT8 and bf16, choose_cpu_runtime verified the gates (and the INT8 file, the CPU's bf16) just now.
            path, precision = {OPENVINO_INT8: (self.repository.model_dir(decl.name) / INT8_FILE, "int8"),
                               OPENVINO_BF16: (self.repository.onnx_path(decl.name), "bf16")
                               }.get(cpu, (self.repository.onnx_path(decl.name), "fp32"))
            cache = (CompiledCache(self.repository.model_dir(decl.name) / OPENVINO_CACHE_DIR)
                     if self.settings.openvino_cache else None)
            model = OpenVinoModel(path, meta, threads, precision=precision, streams=batching.instances,
                                  static_batches=range(1, static + 1), cache=cache)
            if cache is not None:  # so an operator can see why a start was slow (a miss is a compile)
                log.info("%s: %d compiled model(s) imported from %s, %d compiled", decl.name, cache.hits,
                         cache.directory, cache.misses)
            return model, reason
        return self._onnxruntime(decl, meta, threads), reason

    def _onnxruntime(self, decl: ModelDeclaration, meta: Any, threads: int) -> Model:
        providers = choose_providers(self.settings.prefer_gpu)
        return OnnxRuntimeModel(self.repository.onnx_path(decl.name), meta, providers, intra_op_threads=threads)
