"""Compare TensorRT engines with ONNX Runtime, and time raw engine throughput by batch size.

``python -m engines.tensorrt.check --repository model_repository [--timing]``: for each model, the max abs and
max relative error of the engine's outputs against ONNX Runtime (CPU) on the same random inputs, and with
``--timing`` items/s by batch size with and without CUDA graphs and host transfers (the numbers to compare with
``trtexec --noCudaGraph --includeDataTransfers``). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engines.declarations import declaration_for
from engines.runtime.onnxruntime_engine import OnnxRuntimeModel
from engines.tensorrt.build import engine_requests
from engines.tensorrt.cache import BuilderSettings
from engines.tensorrt.cli import engine_cli
from engines.tensorrt.profiles import batch_buckets

log = logging.getLogger("engines.tensorrt.check")


def random_batch(item: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(0, 255, (n, *v.shape)).astype(v.dtype) for k, v in item.items()}


def errors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    abs_err = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    rel = max(float((np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-3)).max()) for k in a)
    return {"max_abs": abs_err, "max_rel": rel}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timing", action="store_true")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tensorrt-check.json"))
    run = engine_cli(p, argv, "check TensorRT engines")
    if run is None:
        return 2
    from engines.runtime.tensorrt_engine import TensorRTModel
    from engines.tensorrt.build import ensure_engine

    a, repo = run.args, run.repo
    report: dict[str, Any] = {"availability": run.availability.reason, "flavour": run.flavour.label(),
                              "precision": a.precision, "models": {}}
    for req in engine_requests(repo, run.models, a.precision):
        meta = repo.load(req.name)
        plan = ensure_engine(repo, req, BuilderSettings(), run.flavour, run.device)
        buckets = batch_buckets(req.max_batch_size, req.preferred)
        trt_inst = TensorRTModel(plan, meta, buckets, cuda_graphs=True, flavour=run.flavour).new_instance()
        ort_inst = OnnxRuntimeModel(repo.onnx_path(req.name), meta, ["CPUExecutionProvider"]).new_instance()
        item = declaration_for(meta).warmup_item()
        entry: dict[str, Any] = {"accuracy": {}, "timing": {}}
        for n in sorted({1, min(3, req.max_batch_size), req.max_batch_size}):
            batch = random_batch(item, n, seed=n)
            entry["accuracy"][n] = errors(trt_inst.infer(batch)[0], ort_inst.infer(batch)[0])
        if a.timing:
            for n in buckets:
                batch = random_batch(item, n, seed=0)
                row = {}
                for graphs in (False, True):
                    for transfers in (False, True):
                        sec = trt_inst.time_batches(batch, a.iterations, graphs, transfers)  # type: ignore[attr-defined]
                        row[f"graphs={graphs},transfers={transfers}"] = {"items_per_s": n / sec,
                                                                         "ms_per_batch": sec * 1e3}
                entry["timing"][n] = row
        report["models"][req.name] = entry
        log.info("%s: %s", req.name, json.dumps(entry["accuracy"]))
        trt_inst.close()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
