"""What security costs, and overload: ``make bench-security``.

1. Authentication overhead: CheckLiveness p50 at concurrency 1 with authentication off and with a bearer token:
   both servers up at once, short windows alternating between them (so drift of a noisy host hits both alike),
   the load generator in its own process; plus the interceptor's own cost per call, timed directly.
2. Overload: the token server's capacity (closed loop, concurrency 32), then open loops at 2x, 3x, 5x and 10x that
   rate: requests answered, refused with RESOURCE_EXHAUSTED (and how fast the refusal came back), other errors by
   code, wrong answers (each answer compared with a reference answer for the same image), and the server's resident
   memory sampled every 0.2 s. The load generator runs on the same cores as the server. Then the same against a
   server with ``--workers 2`` (two processes on the port), the load spread over 8 connections.

Writes benchmarks/results/security.json and .md. Loopback only, bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, write_report
from benchmarks.server_process import facegate_process, free_port, process_tree_usage, wait_for_metrics
from server.auth.tokens import hash_token, new_token


def loadgen(address: str, images: list[Path], token: Path | None, *mode: str, duration: float = 10.0,
            timeout: float = 30.0, channels: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--target", address, *mode, "--warmup", "2",
           "--duration", str(duration), "--timeout", str(timeout), "--channels", str(channels),
           *(str(p) for p in images)]
    if token is not None:
        cmd += ["--token-file", str(token)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the workers of a server started with --workers)."""
    return process_tree_usage(pid)["rss"]


def rss_sampler(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set() and Path(f"/proc/{pid}").exists():
        samples.append(rss_bytes(pid))
        time.sleep(0.2)


def interceptor_cost_us(token: str, callers: int, n: int = 20_000) -> float:
    """Microseconds of the interceptor's own work for one call: find the caller of a token among ``callers``
    configured ones (the last one matches: the worst case), check its scope, take and give back request bytes."""
    from server.admission import Budget
    from server.auth.callers import AuthConfig, Authenticator, CallerConfig
    from server.auth.scopes import grants, required_scope

    others = [CallerConfig(f"svc-{i}", ("liveness",), (hash_token(new_token()),)) for i in range(callers - 1)]
    auth = Authenticator(AuthConfig(callers=(*others, CallerConfig("me", ("liveness",), (hash_token(token),)))))
    budget = Budget("bytes", 1 << 30, "bytes")

    t0 = time.perf_counter()
    for _ in range(n):
        caller = auth.from_token(token)
        assert caller is not None and grants(caller.scopes, str(required_scope(
            "/facegate.v1.LivenessService/CheckLiveness")))
        with budget.hold(50_000):
            pass
    return (time.perf_counter() - t0) / n * 1e6


def _ms(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.0f}"


def overload(address: str, pid: int, images: list[Path], token: Path, duration: float,
             multiples: list[float], workers: int = 1, channels: int = 1) -> dict[str, Any]:
    cap = loadgen(address, images, token, "--concurrency", "32", duration=duration, channels=channels)
    before = rss_bytes(pid)
    runs, messages = [], {}
    for k in multiples:
        rate = k * cap["throughput_rps"]
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=rss_sampler, args=(pid, stop, samples), daemon=True)
        sampler.start()
        over = loadgen(address, images, token, "--rate", f"{rate:.1f}", "--max-requests",
                       str(int(rate * (duration + 2) * 1.2)), duration=duration, timeout=5.0, channels=channels)
        stop.set()
        sampler.join()
        errors = dict(over["errors"])
        messages.update(over.get("error_messages", {}))
        runs.append({"multiple": k, "rate_rps": rate, "sent": over["sent"], "ok": over["count"],
                     "resource_exhausted": errors.pop("RESOURCE_EXHAUSTED", 0), "errors": errors,
                     "refused_p50_ms": over.get("refused_p50_ms"), "refused_p99_ms": over.get("refused_p99_ms"),
                     "wrong_answers": over["wrong_answers"], "p50_ms": over.get("p50_ms", float("nan")),
                     "p99_ms": over.get("p99_ms", float("nan")),
                     "rss_peak_mib": max(samples, default=before) / 2**20})
        print(f"[bench-security] workers={workers} {k:g}x: {runs[-1]}", file=sys.stderr)
        time.sleep(2)  # let the server drain between rates
    return {"capacity_rps": cap["throughput_rps"], "duration_s": duration, "runs": runs, "workers": workers,
            "channels": channels, "rss_before_mib": before / 2**20, "messages": messages}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    a = r["auth"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. CheckLiveness on the three samples.", "",
             "| authentication | run | p50 ms | p99 ms | req/s |", "|---|---|---|---|---|"]
    for row in a["runs"]:
        lines.append(f"| {row['auth']} | {row['round']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['throughput_rps']:.1f} |")
    lines += ["", f"- Token authentication / none, p50 at concurrency 1 (median of the per-round ratios): "
              f"**{a['p50_ratio']:.3f}** (target <= 1.05); median p50 {a['p50_median_ms']['none']:.2f} ms without, "
              f"{a['p50_median_ms']['token']:.2f} ms with.",
              f"- The interceptor's own work per call (identify the token among {a['callers']} callers, check the "
              f"scope, hold request bytes), timed directly: **{a['interceptor_us']:.1f} us** "
              f"({a['interceptor_us'] / 10 / a['p50_median_ms']['none']:.2f} % of the p50).", "",
              ]
    for o in (r["overload"], *r.get("overload_workers", [])):
        lines += [f"Overload, {o.get('workers', 1)} worker(s), load over {o.get('channels', 1)} connection(s): "
                  f"capacity {o['capacity_rps']:.1f} req/s (closed loop, concurrency 32), then open loops "
                  f"(Poisson arrivals) at multiples of it for {o['duration_s']:.0f} s each, 5 s deadline; the load "
                  f"generator shares the {m['cores']} cores.", "",
                  "| offered | req/s | answered OK | RESOURCE_EXHAUSTED | refused in p50 / p99 ms | other errors | "
                  "wrong answers | OK p50 / p99 ms | server RSS peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for run in o["runs"]:
            other = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "0"
            lines.append(
                f"| {run['multiple']:g}x | {run['rate_rps']:.0f} | {run['ok']} | {run['resource_exhausted']} | "
                f"{_ms(run['refused_p50_ms'])} / {_ms(run['refused_p99_ms'])} | {other} | {run['wrong_answers']} | "
                f"{_ms(run['p50_ms'])} / {_ms(run['p99_ms'])} | {run['rss_peak_mib']:.0f} |")
        lines += ["", f"Server RSS before the overload runs: {o['rss_before_mib']:.0f} MiB. Messages seen: "
                  + "; ".join(f"{k}: {v!r}" for k, v in sorted(o["messages"].items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--images", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--multiples", type=float, nargs="+", default=[2.0, 3.0, 5.0, 10.0],
                   help="offered open-loop rates, as multiples of the measured capacity")
    p.add_argument("--workers", type=int, nargs="*", default=[2],
                   help="also run the overload against servers with these --workers counts")
    a = p.parse_args(argv)
    images = a.images or sorted(Path("../shared/samples/liveness").glob("*.jpg"))
    if not images:
        raise SystemExit("no images: pass --images or put the samples in ../shared/samples/liveness")
    work = a.out / "security-work"
    work.mkdir(parents=True, exist_ok=True)
    token = new_token()
    token_file = work / "token"
    token_file.write_text(token)
    config = work / "auth.toml"
    config.write_text(f'[[auth.callers]]\nname = "bench"\nscopes = ["liveness", "operator"]\n'
                      f'token_hashes = ["{hash_token(token)}"]\n[audit]\npath = "{work / "audit.jsonl"}"\n')
    plain = work / "plain.toml"
    plain.write_text(f'[audit]\npath = "{work / "audit-plain.jsonl"}"\n')
    runs = []
    with facegate_process(a.repository, ["--config", str(plain)], work / "server-none.log") as (off, _), \
            facegate_process(a.repository, ["--config", str(config)], work / "server-token.log") as (on, _):
        for rnd in range(1, a.rounds + 1):
            for auth, addr, tok in (("none", off, None), ("token", on, token_file)):
                r = loadgen(addr, images, tok, "--concurrency", "1", duration=a.duration)
                runs.append({"auth": auth, "round": rnd,
                             **{k: r[k] for k in ("p50_ms", "p99_ms", "throughput_rps")}, "errors": r["errors"]})
                print(f"[bench-security] auth={auth} round {rnd}: p50 {r['p50_ms']:.2f} ms", file=sys.stderr)
    med = {k: statistics.median(r["p50_ms"] for r in runs if r["auth"] == k) for k in ("none", "token")}
    ratios = [t["p50_ms"] / n["p50_ms"] for n, t in zip(runs[::2], runs[1::2], strict=True)]
    callers = 8
    interceptor_us = interceptor_cost_us(token, callers)
    with facegate_process(a.repository, ["--config", str(config)], work / "server-overload.log") as (addr, proc):
        over = overload(addr, proc.pid, images, token_file, a.duration, a.multiples)
    # The same with several workers on the port, the load spread over several connections (as from several
    # callers; one connection always lands on one worker).
    over_workers = []
    for workers in a.workers:
        metrics = free_port()
        with facegate_process(a.repository, ["--config", str(config), "--workers", str(workers), "--metrics-port",
                                             str(metrics)], work / f"server-overload-w{workers}.log") as (addr, proc):
            wait_for_metrics(metrics + workers - 1)  # the last worker listens once its models are warm
            over_workers.append(overload(addr, proc.pid, images, token_file, a.duration, a.multiples, workers,
                                         channels=4 * workers))
    result = {
        "machine": machine_info(),
        "auth": {"runs": runs, "p50_median_ms": med, "round_ratios": ratios, "p50_ratio": statistics.median(ratios),
                 "interceptor_us": interceptor_us, "callers": callers},
        "overload": over,
        "overload_workers": over_workers,
    }
    write_report(a.out, "security", result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
