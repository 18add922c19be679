"""The model registry: loads the served models from the repository, one dynamic batcher each, and warms them up.

What each model is and how it batches comes from its declaration (``engines.declarations``); which runtime
runs it comes from the engine factory (``engines.runtime.factory``): this module sees only the runtime interface.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from engines.declarations import ModelDeclaration, declaration_for
from engines.repository import ModelMetadata, ModelRepository
from engines.runtime.base import Model
from engines.runtime.factory import EngineFactory
from engines.tensorrt.availability import Availability
from server.batching.scheduler import DynamicBatcher
from server.config import ServerConfig
from server.placement import CpuPlacement
from server.priority import compute_thread
from server.workers import worker_index

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    meta: ModelMetadata
    declaration: ModelDeclaration
    engine: Model
    batcher: DynamicBatcher
    runtime_reason: str = ""


class ModelRegistry:
    def __init__(self, repository: ModelRepository, config: ServerConfig,
                 avail: Availability | None = None) -> None:
        self.repository = repository
        self.config = config
        # Where compute threads run (server.placement): each model's instances, and the server's decoding pool,
        # spread over the CPUs. Several workers begin on different CPUs, so their first threads do not share one.
        self.placement = CpuPlacement(config.pin_compute_threads, start=worker_index() or 0)
        self.models: dict[str, ServedModel] = {}
        self.factory = EngineFactory(repository, config.runtime, avail)

    def compute_pool_init(self) -> Callable[[], None]:
        """The initializer of one compute thread pool (an engine's instances, the decoding pool): its threads at
        ``compute_nice``, spread over the CPUs."""
        return compute_thread(self.config.compute_nice, self.placement.pool())

    async def load(self, names: list[str], group: int = 1) -> None:
        """Load ``names``; ``group`` > 1 when every request calls that many of them together (engine threads)."""
        loop = asyncio.get_running_loop()
        for name in names:
            meta = self.repository.load(name)
            decl = declaration_for(meta)
            batching = self.config.batcher_for(name, decl.batching)
            # Engine creation (and a TensorRT build) takes a while and holds no event-loop state: off the loop.
            engine, reason = await loop.run_in_executor(None, self.factory.create, decl, batching, group)
            batcher = DynamicBatcher(engine, batching, self.compute_pool_init())
            await batcher.start()
            self.models[name] = ServedModel(meta, decl, engine, batcher, reason)
            log.info("loaded %s v%s on %s [%s] (%s)", name, meta.version, engine.runtime, reason, batcher.config)

    async def load_ensemble(self, members: list[str]) -> None:
        """An ensemble's members, loaded and warmed: every clip calls all of them at once (``group``)."""
        await self.load(members, group=len(members))
        await self.warmup(members, rounds=1)

    async def warmup(self, names: list[str] | None = None, rounds: int = 2) -> None:
        """Run single requests and a full batch through every batcher, so first clients see warm latency."""
        for served in (self.models[n] for n in names or list(self.models)):
            item = served.declaration.warmup_item()
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
