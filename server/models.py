"""Loads the served models from the repository, one dynamic batcher each, and warms them up."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.repository import ModelMetadata, ModelNotFoundError, ModelRepository
from engines.runtime.base import Model
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel, choose_providers
from engines.runtime.select import Availability, availability, choose
from engines.specs import DETECTOR, DETECTOR_SPEC
from server.batching.config import BatcherConfig
from server.batching.scheduler import DynamicBatcher
from server.config import ServerConfig
from server.pipelines.clip import Ensemble
from server.pipelines.clip_window import ClipSpec

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    meta: ModelMetadata
    engine: Model
    batcher: DynamicBatcher
    runtime_reason: str = ""


def warmup_item(meta: ModelMetadata) -> dict[str, np.ndarray]:
    """One request's inputs (no batch axis) of realistic shape, for warm-up."""
    item: dict[str, np.ndarray] = {}
    for t in meta.inputs:
        shape = list(t.shape[1:])
        if meta.name == DETECTOR:
            shape[1:3] = DETECTOR_SPEC.export_size
        item[t.name] = np.zeros([d if d > 0 else 1 for d in shape], dtype=t.dtype)
    return item


class ModelRegistry:
    def __init__(self, repository: ModelRepository, config: ServerConfig,
                 avail: Availability | None = None) -> None:
        self.repository = repository
        self.config = config
        self.models: dict[str, ServedModel] = {}
        # Probed once (lazily imports tensorrt / cuda-python, never at module import time).
        self.availability = avail or (availability() if config.prefer_gpu else
                                      Availability(None, False, 0, "GPU runtimes disabled"))

    def _load_engine(self, name: str, batching: BatcherConfig) -> tuple[ModelMetadata, Model, str]:
        meta = self.repository.load(name)
        plan: list[Path] = []

        def tensorrt_engine() -> str | None:
            from engines.tensorrt.build import EngineRequest, ensure_engine

            try:
                req = EngineRequest(name, batching.max_batch_size, batching.preferred_batch_sizes,
                                    self.config.tensorrt_precision)
                plan.append(ensure_engine(self.repository, req, self.config.tensorrt_builder))
            except Exception as exc:  # any build/load failure falls back to ONNX Runtime for this model
                log.exception("%s: TensorRT engine unavailable", name)
                return str(exc)
            return None

        runtime, reason = choose(self.config.prefer_gpu, self.availability, tensorrt_engine)
        engine: Model
        if runtime == "tensorrt":
            from engines.runtime.tensorrt_engine import TensorRTModel
            from engines.tensorrt.profiles import batch_buckets

            buckets = batch_buckets(batching.max_batch_size, batching.preferred_batch_sizes)
            engine = TensorRTModel(plan[0], meta, buckets, self.config.cuda_graphs, batching.max_batch_size)
        else:
            providers = choose_providers(self.config.prefer_gpu)
            engine = OnnxRuntimeModel(self.repository.onnx_path(name), meta, providers,
                                      intra_op_threads=self.config.intra_op_threads)
        return meta, engine, reason

    async def load(self, names: list[str], default: BatcherConfig | None = None) -> None:
        loop = asyncio.get_running_loop()
        for name in names:
            batching = self.config.batcher_for(name, default)
            # Engine creation (and a TensorRT build) takes a while and holds no event-loop state: off the loop.
            meta, engine, reason = await loop.run_in_executor(None, self._load_engine, name, batching)
            batcher = DynamicBatcher(engine, batching)
            await batcher.start()
            self.models[name] = ServedModel(meta, engine, batcher, reason)
            log.info("loaded %s v%s on %s [%s] (%s)", name, meta.version, engine.runtime, reason, batcher.config)

    async def warmup(self, names: list[str] | None = None, rounds: int = 2) -> None:
        """Run single requests and a full batch through every batcher, so first clients see warm latency."""
        for served in (self.models[n] for n in names or list(self.models)):
            item = warmup_item(served.meta)
            for _ in range(rounds):
                await served.batcher.infer(item)
                await asyncio.gather(*[served.batcher.infer(item)
                                       for _ in range(served.batcher.config.max_batch_size)])

    def batcher(self, name: str) -> DynamicBatcher:
        return self.models[name].batcher

    @property
    def broken(self) -> list[str]:
        return [n for n, m in self.models.items() if m.batcher.broken]

    async def stop(self) -> None:
        for served in self.models.values():
            await served.batcher.stop()
            served.engine.close()


def find_ensemble(repository: Path, name: str = "") -> Ensemble | None:
    """The identification ensemble manifest to serve (``<repository>/ensembles/<name>.json``), if any."""
    folder = repository / "ensembles"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if name:
        paths = [p for p in paths if p.stem == name]
        if not paths:
            raise ModelNotFoundError(f"no identification ensemble {name!r} in {folder}")
    if not paths:
        return None
    m = json.loads(paths[0].read_text())
    return Ensemble(name=m["name"], version=m["version"], members=tuple(m["members"]),
                    threshold=float(m["threshold"]), margin=float(m["margin"]), spec=ClipSpec(**m["clip"]),
                    embedding_dim=int(m["slowfast"]["embed_dim"]))
