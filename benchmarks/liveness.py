"""``make bench-liveness``: liveness numbers, written to JSON and Markdown.

1. In-process pipeline (no gRPC): latency at concurrency 1 and throughput at saturation.
2. Raw engine throughput per model and batch size (one instance, ONNX Runtime).
3. End to end over gRPC, the load generator in its own process: p50/p95/p99 and throughput at concurrency
   1, 8 and 32, with batching on and off, plus the server's achieved average batch per model.
4. Against the baseline (ONNX Runtime for every model: the configuration before issue 14), side by side: in
   process, the two pipelines back to back; over gRPC, two servers loaded in turn at concurrency 1 and at
   saturation; three rounds, cells the medians of rounds, ratios the medians of paired rounds (the host's speed
   drifts within minutes, so only pairs measured back to back compare).
5. One call's stages on one thread, baseline and measured (``benchmarks.liveness_stages``), and the highest
   saturation ratio their sums allow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import liveness_stages
from benchmarks.baseline import baseline_toml, measured_toml, server_config
from benchmarks.engine_timing import onnxruntime_throughput
from benchmarks.machine import machine_info, write_report
from benchmarks.server_process import facegate_server
from benchmarks.stats import median_row, paired_ratios, summarize
from engines.repository import ModelRepository
from engines.specs import DETECTOR, LIVENESS_SPECS
from server.model_registry import ModelRegistry
from server.pipelines.liveness import LivenessPipeline, LivenessRequest

MODELS = [DETECTOR, *(s.name for s in LIVENESS_SPECS)]


def progress(msg: str) -> None:
    print(f"[bench-liveness] {msg}", file=sys.stderr, flush=True)


async def in_process(repository: Path, images: list[bytes], n_latency: int, duration_s: float,
                     concurrency: int, settings_toml: str) -> dict[str, Any]:
    config = server_config(settings_toml, repository)
    registry = ModelRegistry(ModelRepository(repository), config)
    await registry.load(MODELS)
    await registry.warmup()
    pool = ThreadPoolExecutor(config.cpu_workers)
    pipeline = LivenessPipeline(registry.batcher(DETECTOR),
                                [(s, registry.batcher(s.name)) for s in LIVENESS_SPECS], config.liveness, pool)
    lat: list[float] = []
    for i in range(n_latency):
        t0 = time.perf_counter()
        await pipeline.check(LivenessRequest(images[i % len(images)]))
        lat.append(time.perf_counter() - t0)
    done: list[float] = []
    end = time.perf_counter() + duration_s

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await pipeline.check(LivenessRequest(images[k % len(images)]))
            done.append(time.perf_counter() - t0)
            k += concurrency

    t_start = time.perf_counter()
    await asyncio.gather(*[worker(i) for i in range(concurrency)])
    wall = time.perf_counter() - t_start
    await registry.stop()
    pool.shutdown()
    return {"latency_c1": summarize(lat, sum(lat)), f"saturation_c{concurrency}": summarize(done, wall)}


def engine_throughput(repository: Path, batch_sizes: list[int], seconds_per_point: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MODELS:
        rows = onnxruntime_throughput(repository, name, batch_sizes, seconds_per_point)
        out[name] = rows
        progress(f"engine {name}: " + ", ".join(f"b{b}={r['items_per_s']:.0f}/s" for b, r in rows.items()))
    return out


def end_to_end(repository: Path, image_paths: list[Path], concurrencies: list[int], warmup_s: float,
               duration_s: float, out_dir: Path, cpu_runtime: str = "auto") -> dict[str, Any]:
    results: dict[str, Any] = {}
    cfg = out_dir / f"liveness-{cpu_runtime}.toml"
    cfg.write_text(measured_toml(cpu_runtime))
    for mode, args in (("batching_on", []), ("batching_off", ["--no-batching"])):
        with facegate_server(repository, [*args, "--config", str(cfg)], out_dir / f"server-{mode}.log") as address:
            rows = {}
            for c in concurrencies:
                res = load(address, image_paths, c, warmup_s, duration_s)
                res["avg_batch"] = {m: x["avg_batch"] for m, x in res["server"].items()}
                rows[c] = res
                progress(f"{mode} c={c}: {res['throughput_rps']:.1f} req/s p50 {res['p50_ms']:.1f} ms "
                         f"p99 {res['p99_ms']:.1f} ms errors {res['errors']}")
            results[mode] = rows
    return results


def load(address: str, image_paths: list[Path], c: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--target", address, "--concurrency", str(c),
           "--warmup", str(warmup_s), "--duration", str(duration_s), *map(str, image_paths)]
    res: dict[str, Any] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return res


def against_baseline(repository: Path, images: list[bytes], image_paths: list[Path], sat_c: int, rounds: int,
                     warmup_s: float, duration_s: float, out_dir: Path, cpu_runtime: str) -> dict[str, Any]:
    """The measured configuration and the baseline (ONNX Runtime everywhere), measured in turn, ``rounds`` times."""
    settings = {"measured": measured_toml(cpu_runtime), "baseline": baseline_toml()}
    in_proc: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    for r in range(rounds):
        for label in settings:
            ip = asyncio.run(in_process(repository, images, 50, duration_s, sat_c, settings[label]))
            in_proc[label].append(ip[f"saturation_c{sat_c}"])
            progress(f"pair round {r + 1} in process {label}: {in_proc[label][-1]['throughput_rps']:.1f} req/s")
    grpc_rows: dict[str, dict[int, list[dict[str, Any]]]] = {k: {1: [], sat_c: []} for k in settings}
    with ExitStack() as stack:
        addresses = {}
        for label in settings:
            cfg = out_dir / f"liveness-pair-{label}.toml"
            cfg.write_text(settings[label])
            addresses[label] = stack.enter_context(facegate_server(
                repository, ["--config", str(cfg)], out_dir / f"server-liveness-{label}.log"))
        for r in range(rounds):
            for c in (1, sat_c):
                for label, address in addresses.items():
                    res = load(address, image_paths, c, warmup_s, duration_s)
                    grpc_rows[label][c].append(res)
                    progress(f"pair round {r + 1} gRPC {label} c={c}: {res['throughput_rps']:.1f} req/s "
                             f"p50 {res['p50_ms']:.1f} ms errors {res['errors']}")
    return {
        "rounds": rounds, "cpu_runtime": cpu_runtime, "saturation_concurrency": sat_c,
        "in_process": {k: median_row(v, "throughput_rps") for k, v in in_proc.items()},
        "in_process_ratio": paired_ratios(in_proc["measured"], in_proc["baseline"], "throughput_rps"),
        "grpc": {k: {c: median_row(rows, "throughput_rps") for c, rows in by_c.items()}
                 for k, by_c in grpc_rows.items()},
        "grpc_ratios": {c: {"throughput": paired_ratios(grpc_rows["measured"][c], grpc_rows["baseline"][c],
                                                        "throughput_rps"),
                            "p50": paired_ratios(grpc_rows["measured"][c], grpc_rows["baseline"][c], "p50_ms")}
                        for c in (1, sat_c)},
    }


def pair_markdown(p: dict[str, Any]) -> list[str]:
    sat = p["saturation_concurrency"]
    ip, ratio = p["in_process"], p["in_process_ratio"]
    lines = ["", f"## Against the baseline, side by side ({p['rounds']} rounds; baseline: ONNX Runtime for every "
             f"model; measured: `{p['cpu_runtime']}`)", "",
             "| measure | baseline | measured | ratio (paired rounds) |", "|---|---|---|---|",
             f"| in process, c{sat} req/s | {ip['baseline']['throughput_rps']:.1f} | "
             f"{ip['measured']['throughput_rps']:.1f} | **{ratio[0]:.2f}** "
             f"({', '.join(f'{x:.2f}' for x in ratio[1])}) |"]
    for c, rr in p["grpc_ratios"].items():
        b, m = p["grpc"]["baseline"][c], p["grpc"]["measured"][c]
        lines += [f"| gRPC c{c} req/s | {b['throughput_rps']:.1f} | {m['throughput_rps']:.1f} | "
                  f"**{rr['throughput'][0]:.2f}** ({', '.join(f'{x:.2f}' for x in rr['throughput'][1])}) |",
                  f"| gRPC c{c} p50 ms | {b['p50_ms']:.2f} | {m['p50_ms']:.2f} | **{rr['p50'][0]:.2f}** |"]
    return lines


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# Liveness benchmark ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, ONNX Runtime {m['onnxruntime']}.",
             "Client and server share these cores; compare numbers within this file only.", "",
             "## In-process pipeline (no gRPC)", ""]
    ip = r["in_process"]
    c1 = ip["latency_c1"]
    sat_key = next(k for k in ip if k.startswith("saturation"))
    sat = ip[sat_key]
    lines += ["| measure | p50 ms | p95 ms | p99 ms | throughput req/s |", "|---|---|---|---|---|",
              f"| latency, concurrency 1 | {c1['p50_ms']:.2f} | {c1['p95_ms']:.2f} | {c1['p99_ms']:.2f} | "
              f"{c1['throughput_rps']:.1f} |",
              f"| saturation, concurrency {sat_key.removeprefix('saturation_c')} | {sat['p50_ms']:.2f} | "
              f"{sat['p95_ms']:.2f} | {sat['p99_ms']:.2f} | {sat['throughput_rps']:.1f} |", "",
              "## Raw engine throughput (items/s, one instance, 1 intra-op thread)", ""]
    sizes = list(next(iter(r["engines"].values())).keys())
    lines += ["| model | " + " | ".join(f"b={s}" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name, rows in r["engines"].items():
        lines.append(f"| {name} | " + " | ".join(f"{rows[s]['items_per_s']:.0f}" for s in sizes) + " |")
    lines += ["", "## End to end over gRPC (load generator in its own process)", "",
              "| batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | avg batch (det / v2 / v1se) |",
              "|---|---|---|---|---|---|---|---|"]
    for mode, rows in r["end_to_end"].items():
        for c, x in rows.items():
            ab = x["avg_batch"]
            lines.append(f"| {mode.split('_')[1]} | {c} | {x['throughput_rps']:.1f} | {x['p50_ms']:.2f} | "
                         f"{x['p95_ms']:.2f} | {x['p99_ms']:.2f} | {sum(x['errors'].values())} | "
                         f"{ab.get('retinaface', 0):.1f} / {ab.get('minifasnet_v2', 0):.1f} / "
                         f"{ab.get('minifasnet_v1se', 0):.1f} |")
    t = r["targets"]
    lines += ["", "## Targets", "",
              f"- Server throughput at saturation / in-process: **{t['saturation_ratio']:.2f}** (target >= 0.90)",
              f"- Server p50 latency at concurrency 1 / in-process: **{t['latency_ratio_c1']:.2f}** "
              "(target <= 1.20)", ""]
    if r.get("against_baseline"):
        lines += [*pair_markdown(r["against_baseline"]), ""]
    if r.get("stages"):
        lines += [*liveness_stages.markdown(r["stages"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, nargs="*", help="default: ../shared/samples/liveness/*.jpg")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--cpu-runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="the server's CPU runtime (onnxruntime: the configuration before OpenVINO, the baseline)")
    p.add_argument("--baseline-rounds", type=int, default=3,
                   help="rounds of the side-by-side comparison with the baseline configuration (0: none)")
    args = p.parse_args(argv)
    image_paths = args.images or sorted(Path("../shared/samples/liveness").glob("*.jpg"))
    if not image_paths:
        raise SystemExit("no images: pass --images or put the samples in ../shared/samples/liveness")
    args.out.mkdir(parents=True, exist_ok=True)
    images = [pth.read_bytes() for pth in image_paths]
    sat_c = max(args.concurrency)
    progress("in-process pipeline")
    ip = asyncio.run(in_process(args.repository, images, 150, args.duration, sat_c,
                                measured_toml(args.cpu_runtime)))
    progress(f"in-process: c1 p50 {ip['latency_c1']['p50_ms']:.2f} ms; "
             f"c{sat_c} {ip[f'saturation_c{sat_c}']['throughput_rps']:.1f} req/s")
    progress("one call's stages, one thread, baseline and measured")
    stages = liveness_stages.compare(args.repository, images[0], args.cpu_runtime)
    progress(f"stage sums (b8 engines) {stages['baseline']['total_b8_ms']:.2f} -> "
             f"{stages['measured']['total_b8_ms']:.2f} ms: best possible ratio {stages['bound_b8']:.2f}x")
    progress("raw engines")
    eng = engine_throughput(args.repository, args.batch_sizes, 1.5)
    progress("end to end")
    e2e = end_to_end(args.repository, image_paths, args.concurrency, args.warmup, args.duration, args.out,
                     args.cpu_runtime)
    pair = None
    if args.baseline_rounds > 0 and args.cpu_runtime != "onnxruntime":
        progress("against the baseline, side by side")
        pair = against_baseline(args.repository, images, image_paths, sat_c, args.baseline_rounds, args.warmup,
                                args.duration, args.out, args.cpu_runtime)
    best = max(x["throughput_rps"] for x in e2e["batching_on"].values())
    result: dict[str, Any] = {
        "machine": machine_info(),
        "in_process": ip,
        "engines": eng,
        "end_to_end": e2e,
        "targets": {
            "saturation_ratio": best / ip[f"saturation_c{sat_c}"]["throughput_rps"],
            "latency_ratio_c1": e2e["batching_on"][1]["p50_ms"] / ip["latency_c1"]["p50_ms"]
            if 1 in e2e["batching_on"] else float("nan"),
        },
    }
    result["cpu_runtime"] = args.cpu_runtime
    result["against_baseline"] = pair
    result["stages"] = stages
    write_report(args.out, "liveness" if args.cpu_runtime == "auto" else f"liveness-{args.cpu_runtime}", result,
                 markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
