"""CPU time one IdentifyFromClip costs in process, per configuration: the ceiling on its throughput.

The identification pipeline (decoding, detection, spotting, the model window, the ensemble; no gRPC, no gallery)
is built as the server builds it, from a server configuration (the measured one, and the baseline's settings from
``benchmarks.baseline``), and embeds clips one after another while the process's CPU time is read (every thread:
the event loop, the pool, the engines). At saturation a server cannot serve more than ``cores / CPU per clip``
clips a second, and gRPC adds about the same cost to both configurations, so the ratio of the two CPU times is the
highest saturation ratio the measured configuration could reach over the baseline on this machine.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.baseline import server_config
from engines.identify.ensemble import find_ensemble
from engines.machine import usable_cpus
from engines.repository import ModelRepository
from engines.specs import DETECTOR
from server.config import ServerConfig
from server.model_registry import ModelRegistry
from server.pipelines.clip_input import ClipInput
from server.pipelines.identification import ClipPipeline


async def _cpu_per_clip(config: ServerConfig, clips: list[ClipInput], rounds: int) -> dict[str, Any]:
    ensemble = find_ensemble(config.model_repository)
    if ensemble is None:
        raise SystemExit("no identification ensemble: run `make identify-models` first")
    members = list(ensemble.members)
    registry = ModelRegistry(ModelRepository(config.model_repository), config)
    await registry.load([DETECTOR])
    await registry.warmup()
    await registry.load_ensemble(members)
    pool = ThreadPoolExecutor(config.cpu_workers)
    pipeline = ClipPipeline(registry.batcher(DETECTOR), [registry.batcher(m) for m in members], ensemble, pool,
                            config.clip_limits, reduced_decode=config.clip_reduced_decode)
    try:
        for clip in clips[:2]:  # warm: first calls allocate
            await pipeline.embed(clip, None)
        cpu, wall = [], []
        for _ in range(rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            for clip in clips:
                await pipeline.embed(clip, None)
            cpu.append((time.process_time() - c0) / len(clips) * 1e3)
            wall.append((time.perf_counter() - w0) / len(clips) * 1e3)
    finally:
        await registry.stop()
        pool.shutdown()
    runtimes = {n: registry.models[n].engine.runtime for n in (DETECTOR, *members)}
    return {"cpu_ms_per_clip": statistics.median(cpu), "wall_ms_per_clip": statistics.median(wall),
            "rounds": rounds, "clips": len(clips), "engines": runtimes}


def cpu_per_clip(repository: Path, settings_toml: str, clips: list[ClipInput], rounds: int = 3) -> dict[str, Any]:
    """Median over ``rounds`` of the process CPU milliseconds per clip, embedding ``clips`` one after another in a
    pipeline configured by ``settings_toml`` (a server configuration file's text)."""
    return asyncio.run(_cpu_per_clip(server_config(settings_toml, repository), clips, rounds))


def compare(repository: Path, measured_toml: str, baseline_toml: str, clips: list[ClipInput],
            rounds: int = 3) -> dict[str, Any]:
    """Both configurations, each ``rounds`` times, alternating; the ceiling is the median of paired ratios."""
    rows: dict[str, list[dict[str, Any]]] = {"measured": [], "baseline": []}
    for _ in range(rounds):
        rows["measured"].append(cpu_per_clip(repository, measured_toml, clips, 1))
        rows["baseline"].append(cpu_per_clip(repository, baseline_toml, clips, 1))
    ratios = [b["cpu_ms_per_clip"] / m["cpu_ms_per_clip"] for m, b in zip(rows["measured"], rows["baseline"],
                                                                         strict=True)]
    med = {k: statistics.median(r["cpu_ms_per_clip"] for r in v) for k, v in rows.items()}
    cores = usable_cpus()
    return {"rows": rows, "cpu_ms_per_clip": med, "ceiling_ratio": statistics.median(ratios),
            "ceiling_clips_per_s": {k: cores * 1e3 / v for k, v in med.items()}, "cores": cores}


def markdown(r: dict[str, Any]) -> list[str]:
    m, b = r["cpu_ms_per_clip"]["measured"], r["cpu_ms_per_clip"]["baseline"]
    return ["", "## CPU per clip in process (every thread; no gRPC, no gallery; clips one after another)", "",
            "| configuration | CPU ms per clip | at most clips/s on these cores |", "|---|---|---|",
            f"| baseline | {b:.1f} | {r['ceiling_clips_per_s']['baseline']:.1f} |",
            f"| measured | {m:.1f} | {r['ceiling_clips_per_s']['measured']:.1f} |", "",
            f"Highest saturation ratio these costs allow: **{r['ceiling_ratio']:.2f}x** (median of "
            f"{len(r['rows']['measured'])} paired rounds)."]
