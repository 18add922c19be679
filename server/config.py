"""Server configuration: typed, validated dataclasses; read from an optional TOML file plus command-line flags.

Nothing here reads the environment or argv at import time; ``server.__main__`` does that once.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engines.specs import DETECTOR, LIVENESS_V1SE, LIVENESS_V2
from engines.tensorrt.cache import BuilderSettings
from server.batching.config import BatcherConfig
from server.imaging import ImageLimits
from server.pipelines.clip import ClipLimits
from server.pipelines.liveness import LivenessConfig
from server.pipelines.quality import QualityConfig

# Defaults per model, measured on 2 CPU cores (benchmarks/results): the classifiers are tiny, so large
# batches amortise the per-call overhead; the detector is heavier and gains less beyond 8.
DEFAULT_BATCHING: dict[str, BatcherConfig] = {
    DETECTOR: BatcherConfig(max_batch_size=16, max_queue_delay_us=1000, max_queue_size=1024, instances=2),
    LIVENESS_V2: BatcherConfig(max_batch_size=32, max_queue_delay_us=1000, max_queue_size=1024, instances=1),
    LIVENESS_V1SE: BatcherConfig(max_batch_size=32, max_queue_delay_us=1000, max_queue_size=1024, instances=1),
}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default: exposing biometrics is a deliberate choice)."""
    port: int = 50051
    model_repository: Path = Path("model_repository")
    tls_cert: Path | None = None
    """PEM certificate chain: with tls_key, the server listens with TLS instead of plaintext."""
    tls_key: Path | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest request accepted by gRPC; larger ones get RESOURCE_EXHAUSTED from the transport."""
    max_concurrent_rpcs: int = 4096
    """RPCs in flight beyond this are refused with RESOURCE_EXHAUSTED before any work is done."""
    drain_delay_s: float = 1.0
    """On SIGTERM: health turns NOT_SERVING at once but RPCs are still accepted for this long, so load balancers
    stop routing here and calls already on the wire are taken in (grpc cancels calls not yet accepted)."""
    drain_grace_s: float = 10.0
    """Then: refuse new RPCs, let those in flight finish for up to this long, and cancel the rest."""
    cpu_workers: int = max(2, min(8, (os.cpu_count() or 2) * 2))
    """Threads for decoding and resizing (these release the GIL)."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per session; parallelism comes from instances and batching."""
    prefer_gpu: bool = True
    """Use a GPU runtime when one is installed and a GPU is present (ONNX Runtime's CUDA provider for now)."""
    tensorrt_precision: str = "fp16"
    """Engine precision on GPUs: "fp16" (an FP16 ONNX variant with FP32 I/O) or "fp32"."""
    tensorrt_builder: BuilderSettings = field(default_factory=BuilderSettings)
    cuda_graphs: bool = True
    """Replay CUDA graphs per batch bucket on TensorRT (falls back to plain execution if capture fails)."""
    batching_enabled: bool = True
    """False runs every request alone (the no-batching baseline of the benchmarks)."""
    batching: dict[str, BatcherConfig] = field(default_factory=lambda: dict(DEFAULT_BATCHING))
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    gallery_path: Path = Path("data/gallery.sqlite")
    """SQLite file of the enrolment gallery (created on first start)."""
    identification_ensemble: str = ""
    """Ensemble manifest under <model_repository>/ensembles/ to serve; empty = the only (or first) one."""
    clip_batching: BatcherConfig = field(default_factory=lambda: BatcherConfig(
        max_batch_size=8, max_queue_delay_us=2000, max_queue_size=256, instances=1))
    """Batcher settings of every SlowFast ensemble member (unless [batching.<member>] overrides)."""
    clip_limits: ClipLimits = field(default_factory=ClipLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if self.max_message_bytes < self.liveness.image.max_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least liveness.image.max_bytes "
                f"({self.liveness.image.max_bytes}), or valid images could never arrive"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert ({self.tls_cert}) and tls_key ({self.tls_key}) must be given together")
        if self.tensorrt_precision not in ("fp16", "fp32"):
            raise ValueError(f"tensorrt_precision must be fp16 or fp32, got {self.tensorrt_precision!r}")
        if self.cpu_workers < 1:
            raise ValueError(f"cpu_workers must be >= 1, got {self.cpu_workers}")

    def batcher_for(self, model: str, default: BatcherConfig | None = None) -> BatcherConfig:
        cfg = self.batching.get(model, default or BatcherConfig())
        return cfg if self.batching_enabled else cfg.unbatched()


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def load_config(path: Path | None, **overrides: Any) -> ServerConfig:
    """Read a TOML file (sections: [server], [liveness], [liveness.image], [liveness.quality],
    [batching.<model>]) and apply keyword overrides (from the command line) on top."""
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path else {}
    server = dict(data.get("server", {}))
    for key in ("model_repository", "gallery_path", "tls_cert", "tls_key"):
        if key in server:
            server[key] = Path(server[key])
    live = dict(data.get("liveness", {}))
    image = _build(ImageLimits, live.pop("image", {}), "[liveness.image]")
    quality = _build(QualityConfig, live.pop("quality", {}), "[liveness.quality]")
    liveness = _build(LivenessConfig, {**live, "image": image, "quality": quality}, "[liveness]")
    batching = dict(DEFAULT_BATCHING)
    for model, section in data.get("batching", {}).items():
        section = dict(section)
        if "preferred_batch_sizes" in section:
            section["preferred_batch_sizes"] = tuple(section["preferred_batch_sizes"])
        base = batching.get(model, BatcherConfig())
        batching[model] = _build(BatcherConfig, {**_asdict(base), **section}, f"[batching.{model}]")
    cfg = _build(ServerConfig, {**server, "batching": batching, "liveness": liveness}, "[server]")
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _asdict(cfg: BatcherConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
