"""``make bench-identify``: identification numbers, written to JSON and Markdown.

1. Raw SlowFast engine throughput by batch size (one ensemble member, ONNX Runtime, one instance).
2. A real server: enrol the synthetic identities (2 clips each), then IdentifyFromClip end to end with the load
   generator in its own process at concurrency 1, 4 and 16: clips/s and p50/p95/p99.
3. Where the time goes: the server's per-stage timings (decode, detect, window, SlowFast, match), averaged over
   sequential calls.
4. Decoding 80 frames of 360x480 (the synthetic clips upscaled twice, JPEG quality 95): the server's decode stage
   on them, and what libjpeg needs per frame at each DCT scale on this machine (the floor any decoder faces).
5. Against the baseline (``--baseline-rounds``, default 3): a second server in the configuration before issue 14
   (ONNX Runtime, every frame decoded whole) runs beside the measured one with the same gallery content, and the
   two are loaded in turn at each concurrency, round after round; the end-to-end table is the medians of those
   runs and the ratios are medians of the rounds' paired ratios (the host's speed drifts within minutes).
6. CPU per clip in process, both configurations, before any server starts (``benchmarks.identify_cpu``): what a
   clip costs every thread together, and so the highest saturation ratio those costs allow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import identify_cpu
from benchmarks.baseline import baseline_toml, measured_toml
from benchmarks.engine_timing import onnxruntime_throughput
from benchmarks.machine import machine_info, write_report
from benchmarks.server_process import facegate_server
from benchmarks.stats import median_row, paired_ratios
from engines.identify.ensemble import find_ensemble, report_path
from facegate.v1 import common_pb2, identification_pb2
from facegate_client.client import FacegateClient, clip_from_folder
from server.servicers.identification import clip_from_proto


def progress(msg: str) -> None:
    print(f"[bench-identify] {msg}", file=sys.stderr, flush=True)


def engine_throughput(repository: Path, member: str, batch_sizes: list[int], seconds: float) -> dict[int, Any]:
    rows = onnxruntime_throughput(repository, member, batch_sizes, seconds, unit="clips")
    for bs, r in rows.items():
        progress(f"engine {member} b{bs}: {r['clips_per_s']:.0f} clips/s")
    return rows


def upscaled(clip: identification_pb2.Clip, factor: int = 2) -> identification_pb2.Clip:
    """The clip at ``factor`` times its size, re-encoded as JPEG quality 95 (180x240 -> a 360x480 capture)."""
    import cv2

    frames = []
    for f in clip.frames:
        img = cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None, "a synthetic frame that does not decode"
        big = cv2.resize(img, (img.shape[1] * factor, img.shape[0] * factor), interpolation=cv2.INTER_CUBIC)
        frames.append(common_pb2.Image(data=cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()))
    return identification_pb2.Clip(frames=frames, fps=clip.fps)


def decode_floor(clip: identification_pb2.Clip, rounds: int = 5) -> dict[str, float]:
    """Milliseconds to decode every frame of ``clip`` at each JPEG DCT scale with OpenCV (libjpeg-turbo), on one
    thread and split over two (best of ``rounds``)."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
    data = [np.frombuffer(f.data, np.uint8) for f in clip.frames]
    out: dict[str, float] = {}
    with ThreadPoolExecutor(2) as pool:
        for k, flag in flags.items():
            def part(chunk: list[np.ndarray], flag: int = flag) -> None:
                for d in chunk:
                    cv2.imdecode(d, flag)

            for threads in (1, 2):
                best = float("inf")
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    list(pool.map(part, [data[i::threads] for i in range(threads)]))
                    best = min(best, time.perf_counter() - t0)
                out[f"1/{k} x{threads}"] = best * 1e3
    return out


def _over_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One concurrency's load-generator results over the rounds: medians, and the errors of all rounds."""
    errors: dict[str, int] = {}
    for r in rows:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + int(v)
    return {**median_row(rows, "throughput_rps"), "errors": errors}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# Identification benchmark ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; ONNX Runtime {m['onnxruntime']}. Ensemble "
             f"{r['ensemble']['name']} ({len(r['ensemble']['members'])} members, CPU preset), synthetic clips of "
             f"{r['frames_per_clip']} frames at 200 fps ({r['frame_size']}).", "",
             "## Raw SlowFast engine (one member, one instance)", "",
             "| batch | clips/s | ms/batch |", "|---|---|---|"]
    for bs, x in r["engine"].items():
        lines.append(f"| {bs} | {x['clips_per_s']:.1f} | {x['ms_per_batch']:.1f} |")
    lines += ["", "## IdentifyFromClip end to end (load generator in its own process)", "",
              "| concurrency | clips/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for c, x in r["end_to_end"].items():
        lines.append(f"| {c} | {x['throughput_rps']:.2f} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
                     f"{x['p99_ms']:.1f} | {sum(x['errors'].values())} |")
    s = r["stages_ms"]
    lines += ["", "## Where the time goes (server timings, mean of sequential calls, ms)", "",
              "| decode | detect | window | SlowFast ensemble | match | total |", "|---|---|---|---|---|---|",
              f"| {s['decode_ms']:.1f} | {s['detect_ms']:.1f} | {s['window_ms']:.1f} | {s['embed_ms']:.1f} | "
              f"{s['match_ms']:.2f} | {s['total_ms']:.1f} |", ""]
    pair = r.get("against_baseline")
    if pair:
        lines += [f"## Against the baseline, side by side ({pair['rounds']} rounds; baseline: ONNX Runtime, every "
                  "frame decoded whole)", "",
                  "| concurrency | baseline clips/s | baseline p50 ms | clips/s | p50 ms | clips/s ratio | "
                  "p50 ratio |", "|---|---|---|---|---|---|---|"]
        for c, x in pair["ratios"].items():
            b, e = pair["baseline"][c], r["end_to_end"][c]
            lines.append(f"| {c} | {b['throughput_rps']:.2f} | {b['p50_ms']:.1f} | {e['throughput_rps']:.2f} | "
                         f"{e['p50_ms']:.1f} | **{x['throughput']:.2f}** | **{x['p50']:.2f}** |")
        sb = pair["baseline_stages_ms"]
        lines += ["", f"Baseline stages (ms, same calls): decode {sb['decode_ms']:.1f}, detect {sb['detect_ms']:.1f}, "
                  f"window {sb['window_ms']:.1f}, SlowFast ensemble {sb['embed_ms']:.1f}, total {sb['total_ms']:.1f}.",
                  ""]
    big = r.get("decode_360x480")
    if big:
        floor = big["floor_ms"]
        lines += [f"## Decoding {big['frames']} frames of 360x480 (server decode stage, mean of "
                  f"{big['calls']} sequential calls: **{big['decode_ms']:.1f} ms**, "
                  f"reduced decoding {'on' if big['reduced'] else 'off'}; "
                  f"**{big.get('decode_apex_named_ms', float('nan')):.1f} ms** with the apex named)", "",
                  "Every frame decoded by OpenCV at each DCT scale, ms for the clip (best of 5):", "",
                  "| threads | " + " | ".join(k.split()[0] for k in floor if k.endswith("x1")) + " |",
                  "|---|" + "---|" * sum(1 for k in floor if k.endswith("x1"))]
        for t in ("x1", "x2"):
            lines.append(f"| {t[1:]} | " + " | ".join(f"{v:.1f}" for k, v in floor.items() if k.endswith(t)) + " |")
        lines.append("")
    if r.get("cpu_per_clip"):
        lines += [*identify_cpu.markdown(r["cpu_per_clip"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--synthetic", type=Path, default=Path(".cache/synthetic/motion"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--cpu-runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="the server's CPU runtime (onnxruntime: the baseline, also decoding every frame whole)")
    p.add_argument("--baseline-rounds", type=int, default=3,
                   help="rounds of the side-by-side comparison with the baseline configuration (0: none)")
    args = p.parse_args(argv)
    ensemble = find_ensemble(args.repository)
    if ensemble is None:
        raise SystemExit("no identification ensemble: run `make identify-models` first")
    report = json.loads(report_path(args.repository, ensemble.name).read_text())
    root = args.synthetic / "CASME2_RAW"

    def folder(key: str) -> Path:
        _, subject, clip = key.split("/")
        return root / subject / clip

    args.out.mkdir(parents=True, exist_ok=True)
    engine = engine_throughput(args.repository, ensemble.members[0], args.batch_sizes, 2.0)
    probes = [folder(k) for k in report["test_probes"][:: max(1, len(report["test_probes"]) // 24)]]
    cpu = None
    if args.cpu_runtime != "onnxruntime" and args.baseline_rounds > 0:  # on an idle machine, before any server
        cpu = identify_cpu.compare(args.repository, measured_toml(args.cpu_runtime), baseline_toml(),
                                   [clip_from_proto(clip_from_folder(p, 200.0)) for p in probes[:12]],
                                   args.baseline_rounds)
        progress(f"CPU per clip in process: baseline {cpu['cpu_ms_per_clip']['baseline']:.1f} ms, measured "
                 f"{cpu['cpu_ms_per_clip']['measured']:.1f} ms (ceiling {cpu['ceiling_ratio']:.2f}x)")

    def config(runtime: str) -> Path:
        cfg = args.out / f"identify-{runtime}.toml"
        cfg.write_text(baseline_toml() if runtime == "onnxruntime" else measured_toml(runtime))
        return cfg

    def enrol(client: FacegateClient) -> str:
        coll = f"bench-{int(time.time())}"
        client.create_collection(coll)
        by_subject: dict[str, list[str]] = {}
        for key in report["enrol2_gallery"]:
            by_subject.setdefault(key.split("/")[1], []).append(key)
        for subject, keys in by_subject.items():
            client.enroll(coll, subject, [clip_from_folder(folder(k), 200.0) for k in keys])
        progress(f"enrolled {len(by_subject)} persons")
        return coll

    def stage_means(client: FacegateClient, coll: str) -> dict[str, float]:
        stages: dict[str, list[float]] = {}
        for pth in probes[:12]:
            t = client.identify(coll, clip_from_folder(pth, 200.0)).timings
            for f in ("decode_ms", "detect_ms", "window_ms", "embed_ms", "match_ms", "total_ms"):
                stages.setdefault(f, []).append(getattr(t, f))
        return {k: float(np.mean(v)) for k, v in stages.items()}

    def load(address: str, coll: str, c: int) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--target", address, "--collection", coll,
               "--fps", "200", "--concurrency", str(c), "--warmup", str(args.warmup), "--duration",
               str(args.duration), "--timeout", "120", *map(str, probes)]
        res: dict[str, Any] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        return res

    reduced = args.cpu_runtime != "onnxruntime"
    rounds = args.baseline_rounds if args.cpu_runtime != "onnxruntime" else 0
    pair: dict[str, Any] | None = None
    with ExitStack() as stack:
        address = stack.enter_context(facegate_server(
            args.repository, ["--log-level", "WARNING", "--config", str(config(args.cpu_runtime))],
            args.out / "server-identify.log"))
        client = stack.enter_context(FacegateClient(address, timeout_s=120))
        coll = enrol(client)
        stages = stage_means(client, coll)
        bigger = [upscaled(clip_from_folder(pth, 200.0)) for pth in probes[:8]]
        big_decode = [client.identify(coll, c).timings.decode_ms for c in bigger]
        for c in bigger:  # the client names the apex (as an annotated dataset does): no spotter pass
            c.apex_frame = len(c.frames) // 2
        big_hinted = [client.identify(coll, c).timings.decode_ms for c in bigger]
        progress(f"360x480: decode {np.mean(big_decode):.1f} ms, {np.mean(big_hinted):.1f} ms with the apex named")
        targets: dict[str, Callable[[int], dict[str, Any]]] = {"measured": lambda c: load(address, coll, c)}
        baseline_stages: dict[str, float] = {}
        if rounds > 0:
            (args.out / "identify-baseline.sqlite").unlink(missing_ok=True)  # a fresh gallery each run
            base_address = stack.enter_context(facegate_server(
                args.repository, ["--log-level", "WARNING", "--config", str(config("onnxruntime")),
                                  "--gallery-url", f"sqlite:///{(args.out / 'identify-baseline.sqlite').resolve()}"],
                args.out / "server-identify-baseline.log"))
            base_client = stack.enter_context(FacegateClient(base_address, timeout_s=120))
            base_coll = enrol(base_client)
            baseline_stages = stage_means(base_client, base_coll)
            targets["baseline"] = lambda c: load(base_address, base_coll, c)
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in args.concurrency} for k in targets}
        for r in range(max(1, rounds)):
            for c in args.concurrency:
                for label, run in targets.items():
                    res = run(c)
                    runs[label][c].append(res)
                    name = label if label == "baseline" else args.cpu_runtime
                    progress(f"round {r + 1} {name} c={c}: {res['throughput_rps']:.2f} clips/s p50 "
                             f"{res.get('p50_ms', 0):.0f} ms p99 {res.get('p99_ms', 0):.0f} ms errors {res['errors']}")
    e2e = {c: _over_rounds(rows) for c, rows in runs["measured"].items()}
    if rounds > 0:
        pair = {"rounds": rounds, "baseline_stages_ms": baseline_stages,
                "baseline": {c: _over_rounds(rows) for c, rows in runs["baseline"].items()},
                "samples": {k: {str(c): v for c, v in by_c.items()} for k, by_c in runs.items()},
                "ratios": {c: {"throughput": paired_ratios(runs["measured"][c], runs["baseline"][c],
                                                           "throughput_rps")[0],
                               "p50": paired_ratios(runs["measured"][c], runs["baseline"][c], "p50_ms")[0]}
                           for c in args.concurrency}}
    first = clip_from_folder(probes[0], 200.0)
    result = {"machine": machine_info(), "ensemble": {"name": ensemble.name, "version": ensemble.version,
                                                      "members": list(ensemble.members)},
              "frames_per_clip": len(first.frames), "frame_size": "180x240 JPEG",
              "engine": engine, "end_to_end": e2e, "stages_ms": stages, "against_baseline": pair}
    result["cpu_runtime"] = args.cpu_runtime
    result["cpu_per_clip"] = cpu
    result["decode_360x480"] = {"frames": len(bigger[0].frames), "calls": len(big_decode),
                                "decode_ms": float(np.mean(big_decode)), "reduced": reduced,
                                "decode_apex_named_ms": float(np.mean(big_hinted)),
                                "floor_ms": decode_floor(bigger[0])}
    write_report(args.out, "identify" if args.cpu_runtime == "auto" else f"identify-{args.cpu_runtime}", result,
                 markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
