"""What one CheckLiveness costs per stage, on one thread, in each configuration, and the best throughput ratio
that any scheduling could give the measured configuration over the baseline.

Each stage runs alone, call after call, on an otherwise idle machine (median of ``rounds`` timings of ``calls``
calls): the header, the decode, the detector's input, the detector, its decoding and NMS, the two crops and the
quality checks, each classifier. Engines are created by the same factory as the server's (the baseline forces
ONNX Runtime; ``auto`` chooses per model, gated precisions included) and timed at batch 1 and per item at batch 8.
Everything a call costs besides these stages (gRPC, the event loop, thread hand-offs, the load generator sharing
the cores) is left out, and it is the same for both configurations; so the ratio of the two sums, batch-8 engine
costs on both sides, is the highest saturation ratio the measured configuration could reach.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from engines.declarations import declaration_for
from engines.repository import ModelRepository
from engines.runtime.factory import EngineFactory, RuntimeSettings
from engines.specs import DETECTOR, LIVENESS_SPECS
from engines.vision.crop import crop_for_model
from engines.vision.detection import FaceDetector
from engines.vision.imaging import ImageLimits, decode_image, probe_image
from server.pipelines.quality import QualityConfig, assess_face


def _ms(fn: Callable[[], object], calls: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


def stage_costs(repository: Path, image: bytes, cpu_runtime: str, calls: int = 40, rounds: int = 5
                ) -> dict[str, Any]:
    """Milliseconds per stage for one image; engines at batch 1 and per item at batch 8."""
    repo = ModelRepository(repository)
    factory = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=cpu_runtime))
    limits = ImageLimits()
    header = probe_image(image, limits)
    bgr = decode_image(image, limits, header=header).bgr
    detector = FaceDetector(0.6)
    inp = detector.prepare(bgr)
    engines = {}
    for name in (DETECTOR, *(s.name for s in LIVENESS_SPECS)):
        decl = declaration_for(repo.load(name))
        model, _ = factory.create(decl, decl.batching)
        engines[name] = (model, model.new_instance())
    det_out, _ = engines[DETECTOR][1].infer({"input": inp.tensor[None]})
    face = detector.faces({k: v[0] for k, v in det_out.items()}, inp)[0]
    box = face.pixel_box(bgr.shape[1], bgr.shape[0])
    crops = {s.name: crop_for_model(bgr, box, s.scale, s.width, s.height) for s in LIVENESS_SPECS}
    feeds = {DETECTOR: inp.tensor, **crops}
    stages = {
        "header": _ms(lambda: probe_image(image, limits), calls, rounds),
        "decode": _ms(lambda: decode_image(image, limits, header=header), calls, rounds),
        "detector input": _ms(lambda: detector.prepare(bgr), calls, rounds),
        "detections and NMS": _ms(lambda: detector.faces({k: v[0] for k, v in det_out.items()}, inp), calls,
                                  rounds),
        "crops and quality": _ms(lambda: ([crop_for_model(bgr, box, s.scale, s.width, s.height)
                                           for s in LIVENESS_SPECS], assess_face(bgr, box, QualityConfig())),
                                 calls, rounds),
    }
    fixed = sum(stages.values())
    runtimes: dict[str, str] = {}
    for name, (model, instance) in engines.items():
        for batch, label, n in ((1, f"{name} b1", calls), (8, f"{name} b8 per item", max(1, calls // 8))):
            feed = {"input": np.repeat(feeds[name][None], batch, axis=0)}
            stages[label] = _ms(partial(instance.infer, feed), n, rounds) / batch
        runtimes[name] = model.runtime
        model.close()
    return {"runtime": cpu_runtime, "engines": runtimes, "stages_ms": stages,
            "total_b1_ms": fixed + sum(v for k, v in stages.items() if k.endswith(" b1")),
            "total_b8_ms": fixed + sum(v for k, v in stages.items() if k.endswith("per item"))}


def compare(repository: Path, image: bytes, measured: str = "auto") -> dict[str, Any]:
    base, meas = stage_costs(repository, image, "onnxruntime"), stage_costs(repository, image, measured)
    return {"baseline": base, "measured": meas,
            "bound_b1": base["total_b1_ms"] / meas["total_b1_ms"],
            "bound_b8": base["total_b8_ms"] / meas["total_b8_ms"]}


def markdown(r: dict[str, Any]) -> list[str]:
    b, m = r["baseline"], r["measured"]
    lines = ["", "## One call's stages, one thread (ms; engines at batch 1 and per item at batch 8)", "",
             f"Baseline engines: {', '.join(f'{k} {v}' for k, v in b['engines'].items())}. Measured: "
             f"{', '.join(f'{k} {v}' for k, v in m['engines'].items())}.", "",
             "| stage | baseline | measured |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {m['stages_ms'][k]:.3f} |" for k, v in b["stages_ms"].items()]
    lines += [f"| **sum, engines at b1** | {b['total_b1_ms']:.2f} | {m['total_b1_ms']:.2f} |",
              f"| **sum, engines at b8** | {b['total_b8_ms']:.2f} | {m['total_b8_ms']:.2f} |", "",
              f"Best possible saturation ratio (no gRPC, event loop or client cost on either side): "
              f"**{r['bound_b8']:.2f}x** with batch-8 engines, {r['bound_b1']:.2f}x at batch 1."]
    return lines
