"""The engine cache: one folder per build key under the model's folder, with a metadata file.

Engines are tied to the exact TensorRT flavour and version and to the GPU they were built for, so the key covers
everything that makes an engine valid: the ONNX file's sha256, the flavour (TensorRT or TensorRT-RTX) and its
version, the GPU name and compute capability (TensorRT) or the target compute capabilities (TensorRT-RTX, whose
engines are built ahead of time for a list of GPUs), the optimisation profiles, the precision recipe and the
builder settings. A changed input gives a new key and
so a new build; an engine that fails to deserialise anyway is deleted and rebuilt (``EngineCache.invalidate``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.atomic_write import write_atomically
from engines.tensorrt.profiles import Profile

PLAN_FILE = "model.plan"
META_FILE = "build.json"


@dataclass(frozen=True)
class BuilderSettings:
    workspace_mib: int = 4096
    optimization_level: int = 3  # TensorRT's default; 0..5
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    max_aux_streams: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must lie in [0, 5], got {self.optimization_level}")
        if self.workspace_mib < 16:
            raise ValueError(f"workspace_mib must be >= 16, got {self.workspace_mib}")


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: tuple[int, int]


# An RTX engine is not built for the GPU at hand but for its target list: the key's device says so.
ANY_TARGET = Device("any of the targets", (0, 0))


@dataclass(frozen=True)
class BuildKey:
    onnx_sha256: str
    tensorrt_version: str
    device: Device
    profiles: tuple[Profile, ...]
    precision: str  # "fp32" | "fp16" (FP16 ONNX variant, FP32 I/O)
    builder: BuilderSettings = field(default_factory=BuilderSettings)
    flavour: str = "tensorrt"  # "tensorrt" | "tensorrt_rtx"
    targets: tuple[str, ...] = ()  # TensorRT-RTX target compute capabilities (SM86, ...)

    def as_dict(self) -> dict[str, Any]:
        return {
            "onnx_sha256": self.onnx_sha256,
            "flavour": self.flavour,
            "targets": list(self.targets),
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.device.name,
            "compute_capability": list(self.device.compute_capability),
            "profiles": [p.as_key() for p in self.profiles],
            "precision": self.precision,
            "builder": asdict(self.builder),
        }

    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def runtime_cache_name(gpu: Device) -> str:
    """TensorRT-RTX's just-in-time kernels for one GPU, kept beside the engine they belong to."""
    cc = "".join(map(str, gpu.compute_capability))
    name = "".join(c if c.isalnum() else "_" for c in gpu.name)
    return f"runtime-{name}-sm{cc}.cache"


class EngineCache:
    def __init__(self, model_dir: Path) -> None:
        self.root = model_dir / "engines"

    def folder(self, key: BuildKey) -> Path:
        return self.root / key.digest()

    def plan_path(self, key: BuildKey) -> Path:
        return self.folder(key) / PLAN_FILE

    def timing_cache_path(self, key: BuildKey) -> Path:
        # Kept beside the engines and shared by builds for the same GPU and TensorRT version: a rebuild after an
        # ONNX change reuses the tactic timings.
        if key.flavour == "tensorrt_rtx":
            return self.root / f"timing-{'-'.join(key.targets)}-rtx{key.tensorrt_version}.cache"
        cc = "".join(map(str, key.device.compute_capability))
        return self.root / f"timing-sm{cc}-trt{key.tensorrt_version}.cache"

    def runtime_cache_path(self, key: BuildKey, gpu: Device) -> Path:
        return self.folder(key) / runtime_cache_name(gpu)

    def lock_path(self, key: BuildKey) -> Path:
        """Held while a process builds this key (``engines.file_lock``); beside the build folders, which ``prune``
        alone removes."""
        return self.root / f".{key.digest()}.lock"

    def lookup(self, key: BuildKey) -> Path | None:
        """The plan for this key if a complete build is cached (metadata written last marks completion)."""
        folder = self.folder(key)
        plan, meta = folder / PLAN_FILE, folder / META_FILE
        if not (plan.is_file() and meta.is_file()):
            return None
        try:
            recorded = json.loads(meta.read_text())["key"]
        except (ValueError, KeyError):
            return None
        return plan if recorded == key.as_dict() else None

    def store(self, key: BuildKey, plan: bytes, build_seconds: float, log_lines: list[str],
              extra: dict[str, Any] | None = None) -> Path:
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / PLAN_FILE, plan)  # never another process's half-written file
        meta = {"key": key.as_dict(), "digest": key.digest(), "built_at": time.time(),
                "build_seconds": build_seconds, "plan_bytes": len(plan), "log": log_lines[-50:], **(extra or {})}
        write_atomically(folder / META_FILE, json.dumps(meta, indent=2))
        return folder / PLAN_FILE

    def build_info(self, key: BuildKey) -> dict[str, Any]:
        """What ``store`` recorded: build seconds, plan size, the network summary."""
        return json.loads((self.folder(key) / META_FILE).read_text())  # type: ignore[no-any-return]

    def invalidate(self, key: BuildKey) -> None:
        shutil.rmtree(self.folder(key), ignore_errors=True)

    def prune(self, keep: BuildKey, max_entries: int = 3) -> list[Path]:
        """Delete the oldest other builds beyond ``max_entries`` (engines for other GPUs or versions)."""
        if not self.root.is_dir():
            return []
        others = sorted((p for p in self.root.iterdir() if p.is_dir() and p.name != keep.digest()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        removed = others[max(0, max_entries - 1):]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed
