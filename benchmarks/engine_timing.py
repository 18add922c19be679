"""Raw engine throughput by batch size: one ONNX Runtime instance, repeated whole batches, no batcher."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engines.declarations import declaration_for
from engines.repository import ModelRepository
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel


def onnxruntime_throughput(repository: Path, model: str, batch_sizes: list[int], seconds_per_point: float,
                           unit: str = "items") -> dict[int, dict[str, float]]:
    """Per batch size: ``<unit>_per_s`` and ``ms_per_batch``, after one warm-up batch each."""
    repo = ModelRepository(repository)
    meta = repo.load(model)
    inst = OnnxRuntimeModel(repo.onnx_path(model), meta, ["CPUExecutionProvider"], intra_op_threads=1).new_instance()
    item = declaration_for(meta).warmup_item()
    rows: dict[int, dict[str, float]] = {}
    for bs in batch_sizes:
        batch = {k: np.stack([v] * bs) for k, v in item.items()}
        inst.infer(batch)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds_per_point:
            inst.infer(batch)
            n += 1
        dt = time.perf_counter() - t0
        rows[bs] = {f"{unit}_per_s": n * bs / dt, "ms_per_batch": dt / n * 1e3}
    return rows
