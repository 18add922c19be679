"""``make bench-metrics``: what Prometheus metrics cost CheckLiveness at saturation. Two servers, metrics on (a
port, the interceptor counting every call, a scraper reading /metrics every second) and off, loaded alternately
at concurrency 32 by the load generator in its own process. Writes benchmarks/results/metrics.json and .md."""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, write_report
from benchmarks.security import loadgen
from benchmarks.server_process import facegate_process, free_port


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. CheckLiveness, concurrency 32.", "",
             "| metrics | round | req/s | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {x['metrics']} | {x['round']} | {x['throughput_rps']:.1f} | {x['p99_ms']:.0f} |" for x in r["runs"]]
    lines += ["", f"- Throughput with metrics / without (median of per-round ratios): **{r['ratio']:.3f}** "
              f"(target >= 0.97)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    a = p.parse_args(argv)
    images = sorted(Path("../shared/samples/liveness").glob("*.jpg"))
    a.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(1.0):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

    runs = []
    with facegate_process(a.repository, ["--metrics-port", str(port)], a.out / "server-metrics-on.log") as (on, _), \
            facegate_process(a.repository, [], a.out / "server-metrics-off.log") as (off, _):
        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        for rnd in range(1, a.rounds + 1):
            for label, address in (("off", off), ("on", on)):
                r = loadgen(address, images, None, "--concurrency", "32", duration=a.duration)
                runs.append({"metrics": label, "round": rnd, "throughput_rps": r["throughput_rps"],
                             "p99_ms": r["p99_ms"]})
                print(f"[bench-metrics] {label} round {rnd}: {r['throughput_rps']:.1f} req/s", file=sys.stderr)
        stop.set()
    ratios = [on_["throughput_rps"] / off_["throughput_rps"] for off_, on_ in zip(runs[::2], runs[1::2], strict=True)]
    write_report(a.out, "metrics", {"machine": machine_info(), "runs": runs, "round_ratios": ratios,
                                    "ratio": statistics.median(ratios)}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
