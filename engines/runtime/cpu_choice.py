"""``auto`` on the CPU: run each CPU runtime on the model's warm-up batch and keep the faster one, per model and
machine class (CPU model and core count), measured once and cached beside the model, with the numbers that
decided it (they become the reason ListModels shows)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from engines.declarations import ONNXRUNTIME, OPENVINO, ModelDeclaration
from engines.repository import ModelRepository
from engines.runtime.base import Model

log = logging.getLogger(__name__)
CHOICE_FILE = "cpu-runtime.json"
# Below this advantage the incumbent (ONNX Runtime) stays: a few per cent is within run-to-run noise.
MIN_GAIN = 1.10


def machine_class() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def items_per_s(model: Model, decl: ModelDeclaration, batch: int, seconds: float) -> float:
    inst = model.new_instance()
    inputs = decl.warmup_batch(batch)
    inst.infer(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        inst.infer(inputs)
        n += 1
    rate = n * batch / (time.perf_counter() - t0)
    inst.close()
    return rate


def measure(repo: ModelRepository, decl: ModelDeclaration, threads: int, seconds: float = 0.4
            ) -> dict[str, Any]:
    from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
    from engines.runtime.openvino_engine import OpenVinoModel

    meta = repo.load(decl.name)
    batch = max(1, min(8, decl.batching.max_batch_size))
    rates = {}
    for name, make in ((ONNXRUNTIME, lambda: OnnxRuntimeModel(repo.onnx_path(decl.name), meta,
                                                              ["CPUExecutionProvider"], threads)),
                       (OPENVINO, lambda: OpenVinoModel(repo.onnx_path(decl.name), meta, threads))):
        try:
            model = make()
        except Exception as exc:  # a runtime that cannot load the model simply loses
            log.warning("%s: %s cannot run it: %s", decl.name, name, exc)
            continue
        rates[name] = items_per_s(model, decl, batch, seconds)
        model.close()
    return {"batch": batch, "threads": threads, "items_per_s": rates, "measured_at": time.time()}


def choose_cpu_runtime(repo: ModelRepository, decl: ModelDeclaration, threads: int) -> tuple[str, str]:
    """(runtime, why) for this model on this machine class; measured on first use, then read from the cache."""
    if OPENVINO not in decl.runtimes:
        return ONNXRUNTIME, "onnxruntime (the only CPU runtime the model declares)"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ONNXRUNTIME, "onnxruntime (openvino is not installed)"
    path = repo.model_dir(decl.name) / CHOICE_FILE
    key = f"{machine_class()}|threads={threads}|onnx={repo.load(decl.name).onnx_sha256[:12]}"
    cached: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    entry = cached.get(key)
    if entry is None:
        entry = measure(repo, decl, threads)
        cached[key] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    rates = entry["items_per_s"]
    ort, ov = rates.get(ONNXRUNTIME, 0.0), rates.get(OPENVINO, 0.0)
    chosen = OPENVINO if ov > MIN_GAIN * ort else ONNXRUNTIME
    why = (f"{chosen} (auto: openvino {ov:.0f} vs onnxruntime {ort:.0f} items/s at batch {entry['batch']}, "
           f"{entry['threads']} thread(s), measured on {machine_class()})")
    return chosen, why
