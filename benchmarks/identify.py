"""``make bench-identify``: identification numbers, written to JSON and Markdown.

1. Raw SlowFast engine throughput by batch size (one ensemble member, ONNX Runtime, one instance).
2. A real server: enrol the synthetic identities (2 clips each), then IdentifyFromClip end to end with the load
   generator in its own process at concurrency 1, 4 and 16: clips/s and p50/p95/p99.
3. Where the time goes: the server's per-stage timings (decode, detect, window, SlowFast, match), averaged over
   sequential calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.engine_timing import onnxruntime_throughput
from benchmarks.machine import machine_info, write_report
from benchmarks.server_process import facegate_server
from engines.identify.ensemble import find_ensemble
from facegate_client.client import FacegateClient, clip_from_folder


def progress(msg: str) -> None:
    print(f"[bench-identify] {msg}", file=sys.stderr, flush=True)


def engine_throughput(repository: Path, member: str, batch_sizes: list[int], seconds: float) -> dict[int, Any]:
    rows = onnxruntime_throughput(repository, member, batch_sizes, seconds, unit="clips")
    for bs, r in rows.items():
        progress(f"engine {member} b{bs}: {r['clips_per_s']:.0f} clips/s")
    return rows


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
    args = p.parse_args(argv)
    ensemble = find_ensemble(args.repository)
    if ensemble is None:
        raise SystemExit("no identification ensemble: run `make identify-models` first")
    report = json.loads((args.repository / "reports" / f"{ensemble.name}.json").read_text())
    root = args.synthetic / "CASME2_RAW"

    def folder(key: str) -> Path:
        _, subject, clip = key.split("/")
        return root / subject / clip

    args.out.mkdir(parents=True, exist_ok=True)
    engine = engine_throughput(args.repository, ensemble.members[0], args.batch_sizes, 2.0)
    probes = [folder(k) for k in report["test_probes"][:: max(1, len(report["test_probes"]) // 24)]]
    e2e: dict[int, Any] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = args.out / f"identify-{args.cpu_runtime}.toml"
    # The baseline is the configuration before issue 14: ONNX Runtime and every frame decoded whole.
    reduced = "false" if args.cpu_runtime == "onnxruntime" else "true"
    cfg.write_text(f'[server]\nclip_reduced_decode = {reduced}\n[runtime]\ncpu_runtime = "{args.cpu_runtime}"\n')
    with facegate_server(args.repository, ["--log-level", "WARNING", "--config", str(cfg)],
                         args.out / "server-identify.log") as address:
        with FacegateClient(address, timeout_s=120) as client:
            coll = f"bench-{int(time.time())}"
            client.create_collection(coll)
            by_subject: dict[str, list[str]] = {}
            for key in report["enrol2_gallery"]:
                by_subject.setdefault(key.split("/")[1], []).append(key)
            for subject, keys in by_subject.items():
                client.enroll(coll, subject, [clip_from_folder(folder(k), 200.0) for k in keys])
            progress(f"enrolled {len(by_subject)} persons")
            stages: dict[str, list[float]] = {}
            for pth in probes[:12]:
                t = client.identify(coll, clip_from_folder(pth, 200.0)).timings
                for f in ("decode_ms", "detect_ms", "window_ms", "embed_ms", "match_ms", "total_ms"):
                    stages.setdefault(f, []).append(getattr(t, f))
        for c in args.concurrency:
            cmd = [sys.executable, "-m", "benchmarks.loadgen", "--target", address, "--collection", coll,
                   "--fps", "200", "--concurrency", str(c), "--warmup", str(args.warmup), "--duration",
                   str(args.duration), "--timeout", "120", *map(str, probes)]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            e2e[c] = res
            progress(f"c={c}: {res['throughput_rps']:.2f} clips/s p50 {res.get('p50_ms', 0):.0f} ms "
                     f"p99 {res.get('p99_ms', 0):.0f} ms errors {res['errors']}")
    first = clip_from_folder(probes[0], 200.0)
    result = {"machine": machine_info(), "ensemble": {"name": ensemble.name, "version": ensemble.version,
                                                      "members": list(ensemble.members)},
              "frames_per_clip": len(first.frames), "frame_size": "180x240 JPEG",
              "engine": engine, "end_to_end": e2e, "stages_ms": {k: float(np.mean(v)) for k, v in stages.items()}}
    result["cpu_runtime"] = args.cpu_runtime
    write_report(args.out, "identify" if args.cpu_runtime == "auto" else f"identify-{args.cpu_runtime}", result,
                 markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
