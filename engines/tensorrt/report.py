"""``make engines-report``: every served model built with each installed TensorRT flavour, FP32 and FP16, and
what the builds hold: build time, engine size, the parsed network's layer count and layer output types, and
(only where a GPU can deserialise the engine) the engine inspector's fused layer list.

Writes benchmarks/results/engines.json and engines.md. Builds come from the engine cache when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from engines.repository import ModelRepository
from engines.tensorrt.availability import availability
from engines.tensorrt.build import engine_requests, ensure_engine
from engines.tensorrt.cache import BuilderSettings
from engines.tensorrt.flavour import DEFAULT_RTX_TARGETS, Flavour, installed

log = logging.getLogger("engines.tensorrt.report")


def inspect_engine(plan: Path, flavour: Flavour) -> list[Any] | str:
    """The inspector's per-layer JSON, or why it could not run (deserialising needs a supported GPU)."""
    from engines.runtime.tensorrt_engine import trt_logger

    trt = flavour.load()
    runtime = trt.Runtime(trt_logger(trt).logger)
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        return "not deserialisable here (needs a GPU this flavour supports)"
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return list(info.get("Layers", []))


def report(repo: ModelRepository, flavours: list[Flavour], gpu_ok: bool) -> list[dict[str, Any]]:
    rows = []
    for flavour in flavours:
        if not flavour.rtx and not gpu_ok:
            log.warning("%s builds need a GPU: skipped", flavour.label())
            continue
        for precision in ("fp32", "fp16"):
            for req in engine_requests(repo, repo.names(), precision):
                plan = ensure_engine(repo, req, BuilderSettings(), flavour)
                info = json.loads((plan.parent / "build.json").read_text())
                row = {"model": req.name, "flavour": flavour.label(), "precision": precision,
                       "targets": info["key"]["targets"], "build_seconds": info["build_seconds"],
                       "engine_bytes": plan.stat().st_size, "layers": info["network"]["layers"],
                       "output_types": info["network"]["output_types"],
                       "profile": info["key"]["profiles"][0]}
                if gpu_ok:
                    row["inspector"] = inspect_engine(plan, flavour)
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], where: str) -> str:
    out = [f"Built on: {where}. Profiles from each model's batcher settings; TensorRT-RTX targets "
           f"{', '.join(DEFAULT_RTX_TARGETS)}.", "",
           "| model | flavour | precision | build s | engine KiB | layers | layer output types |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["output_types"].items()))
        out.append(f"| {r['model']} | {r['flavour']} | {r['precision']} | {r['build_seconds']:.2f} | "
                   f"{r['engine_bytes'] / 1024:.0f} | {r['layers']} | {types} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flavours = installed()
    if not flavours:
        log.error("neither tensorrt nor tensorrt_rtx is installed (make tensorrt-rtx installs TensorRT-RTX)")
        return 2
    avail = availability()
    rows = report(ModelRepository(a.repository), flavours, avail.tensorrt_usable)
    where = avail.reason if avail.tensorrt_usable else f"the CPU, no GPU ({avail.reason})"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "engines.json").write_text(json.dumps({"where": where, "engines": rows}, indent=2))
    text = markdown(rows, where)
    (a.out / "engines.md").write_text(text)
    print(text)
    return 0



if __name__ == "__main__":
    sys.exit(main())
