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
    def __init__(self, repository: ModelRepository, config: ServerConfig) -> None:
        self.repository = repository
        self.config = config
        self.models: dict[str, ServedModel] = {}

    def _load_engine(self, name: str) -> tuple[ModelMetadata, Model]:
        meta = self.repository.load(name)
        providers = choose_providers(self.config.prefer_gpu)
        engine = OnnxRuntimeModel(self.repository.onnx_path(name), meta, providers,
                                  intra_op_threads=self.config.intra_op_threads)
        return meta, engine

    async def load(self, names: list[str], default: BatcherConfig | None = None) -> None:
        loop = asyncio.get_running_loop()
        for name in names:
            # Session creation takes a while and holds no event-loop state: do it off the loop.
            meta, engine = await loop.run_in_executor(None, self._load_engine, name)
            batcher = DynamicBatcher(engine, self.config.batcher_for(name, default))
            await batcher.start()
            self.models[name] = ServedModel(meta, engine, batcher)
            log.info("loaded %s v%s on %s (%s)", name, meta.version, engine.runtime, batcher.config)

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
