"""``make bench-compare``: the same liveness ONNX model served by facegate and by NVIDIA Triton (PyTriton), both
driven by perf_analyzer over gRPC at the same concurrency sweep, plus facegate with batching off; one run.

Writes ``compare.json``, ``compare.md`` and plots (``compare-throughput-latency.png``,
``compare-percentiles.png``, ``compare-batch-sizes.png``) under --out. Everything binds to 127.0.0.1; each
perf_analyzer run is bounded by its measurement windows and a timeout.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc

from benchmarks.machine import machine_info, write_report
from benchmarks.server_process import facegate_server, free_ports, terminate
from benchmarks.stats import median_row, paired_ratios
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def progress(msg: str) -> None:
    print(f"[bench-compare] {msg}", file=sys.stderr, flush=True)


def bench_env(venv: Path) -> dict[str, str]:
    """perf_analyzer needs the CUDA runtime library on the path even on CPU; Triton's Python-backend stub needs
    the interpreter's libpython when Python is not the system one."""
    env = dict(os.environ)
    site = next((venv / "lib").glob("python3*/site-packages"))
    libs = [str(site / "nvidia" / "cuda_runtime" / "lib"), str(Path(sys.base_prefix) / "lib")]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


class PeerExitedError(RuntimeError):
    """The peer's process ended before its model was ready."""


def wait_ready(address: str, model: str, timeout_s: float = 120,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise PeerExitedError(f"the peer for {address} exited with {proc.returncode} before {model} was ready")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} never had {model} ready within {timeout_s:.0f} s")


def log_tail(log: Path, chars: int = 2000) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text[-chars:]


@contextmanager
def triton_server(venv: Path, onnx: Path, model: str, max_batch: int, delay_us: int, threads: int,
                  log: Path, engine: str = "onnxruntime") -> Iterator[str]:
    """A PyTriton peer on 127.0.0.1, ready. It binds three ports (gRPC, HTTP, metrics); one of them can be taken
    between choosing and binding, and Triton then exits, so a peer that exits before it is ready is started once
    more on other ports. A failure to start raises with the end of the peer's log."""
    for attempt in (1, 2):
        port = free_ports(3)
        address = f"127.0.0.1:{port}"
        with log.open("w" if attempt == 1 else "a") as out:
            proc = subprocess.Popen(
                [str(venv / "bin" / "python"), "-m", "benchmarks.triton_peer", "--onnx", str(onnx), "--model", model,
                 "--port", str(port), "--max-batch-size", str(max_batch), "--max-queue-delay-us", str(delay_us),
                 "--intra-op-threads", str(threads), "--engine", engine],
                cwd=ROOT, env=bench_env(venv), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(address, model, proc=proc)
        except PeerExitedError as exc:
            terminate(proc)
            if attempt == 2:
                raise PeerExitedError(f"{exc} (twice); the end of {log}:\n{log_tail(log)}") from None
            progress(f"{exc}; starting it again on other ports")
            continue
        except TimeoutError as exc:
            terminate(proc)
            raise TimeoutError(f"{exc}; the end of {log}:\n{log_tail(log)}") from None
        try:
            yield address
        finally:
            terminate(proc)
        return


def perf_analyzer(venv: Path, address: str, model: str, concurrency: list[int], interval_ms: int,
                  out_csv: Path) -> dict[int, dict[str, float]]:
    """One sweep; per concurrency: throughput, client p50/p90/p95/p99 (ms), server queue/compute (ms) and the
    achieved average batch (inference count / execution count)."""
    rows: dict[int, dict[str, float]] = {}
    for c in concurrency:
        csv_path = out_csv.with_name(f"{out_csv.stem}-c{c}.csv")
        cmd = [str(venv / "bin" / "perf_analyzer"), "-m", model, "-i", "grpc", "-u", address,
               "--concurrency-range", str(c), "--measurement-interval", str(interval_ms),
               "--stability-percentage", "50", "--max-trials", "6", "-f", str(csv_path)]
        res = subprocess.run(cmd, env=bench_env(venv), capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not csv_path.is_file():
            raise RuntimeError(f"perf_analyzer failed at concurrency {c}: {res.stdout[-800:]} {res.stderr[-400:]}")
        row = next(csv.DictReader(io.StringIO(csv_path.read_text())))
        inf = re.search(r"Inference count: (\d+)\s+Execution count: (\d+)", res.stdout)
        rows[c] = {
            "throughput": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1e3, "p90_ms": float(row["p90 latency"]) / 1e3,
            "p95_ms": float(row["p95 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3,
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": (float(row["Server Compute Input"]) + float(row["Server Compute Infer"])
                                  + float(row["Server Compute Output"])) / 1e3,
            "avg_batch": int(inf.group(1)) / max(1, int(inf.group(2))) if inf else float("nan"),
        }
        progress(f"{address} c={c}: {rows[c]['throughput']:.1f} infer/s p50 {rows[c]['p50_ms']:.1f} ms "
                 f"p99 {rows[c]['p99_ms']:.1f} ms avg batch {rows[c]['avg_batch']:.1f}")
    return rows


LABELS = ("facegate", "triton", "facegate-no-batching")


def facegate_vs_triton(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> dict[str, Any]:
    """facegate / Triton per round, and their median, for throughput and p99."""
    tp, tp_rounds = paired_ratios(ours, theirs, "throughput")
    p99, p99_rounds = paired_ratios(ours, theirs, "p99_ms")
    return {"throughput": tp, "p99": p99, "throughput_rounds": tp_rounds, "p99_rounds": p99_rounds}


def plots(result: dict[str, Any], out: Path, tag: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        xs = [rows[c]["throughput"] for c in sorted(rows, key=int)]
        ys = [rows[c]["p99_ms"] for c in sorted(rows, key=int)]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"{result['model']}: latency vs throughput (concurrency sweep)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"compare-throughput-latency{tag}.png", dpi=110)
    names.append(f"compare-throughput-latency{tag}.png")
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.5), sharey=True)
    for ax, (label, rows) in zip(axes, runs.items(), strict=True):
        cs = sorted(rows, key=int)
        for q in ("p50_ms", "p90_ms", "p95_ms", "p99_ms"):
            ax.plot([int(c) for c in cs], [rows[c][q] for c in cs], marker="o", label=q.split("_")[0])
        ax.set_title(label)
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / f"compare-percentiles{tag}.png", dpi=110)
    names.append(f"compare-percentiles{tag}.png")
    hist = result.get("facegate_batch_histogram", {})
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sizes = sorted(hist, key=int)
        ax.bar([str(s) for s in sizes], [hist[s] for s in sizes])
        ax.set_xlabel("executed batch size")
        ax.set_ylabel("executions")
        ax.set_title("facegate (batching on): batch sizes over the sweep")
        fig.tight_layout()
        fig.savefig(out / f"compare-batch-sizes{tag}.png", dpi=110)
        names.append(f"compare-batch-sizes{tag}.png")
    plt.close("all")
    return names


def batch_histogram(address: str, model: str) -> dict[int, int]:
    with grpc.insecure_channel(address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=model),
                                                                     timeout=10)
    s = stats.model_stats[0]
    hist = {}
    for b in s.batch_stats:
        hist[int(b.batch_size)] = int(b.compute_infer.count)
    return hist


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# facegate vs Triton ({m['date']})", "",
             f"Model `{r['model']}` (the same ONNX file), CPU only: {m['cpu']}, {m['cores']} cores shared by client "
             "and servers. perf_analyzer 2.51 over gRPC, batch 1 requests, closed loop. Engines: facegate "
             f"{r.get('engine', 'onnxruntime')}, Triton {r.get('triton_engine', r.get('engine', 'onnxruntime'))}, "
             f"each with {r['intra_op_threads']} thread(s), one model instance, facegate's compute threads at nice "
             f"{r.get('facegate_compute_nice', 19)}, "
             "dynamic batching with max batch "
             f"{r['max_batch_size']} and a {r['max_queue_delay_us']} us queue delay; Triton runs the model in its "
             "Python backend (PyTriton). The three servers run side by side and are measured in turn at each "
             f"concurrency, {r.get('rounds', 1)} round(s): each cell is the median over the rounds (the throughput's "
             "range in brackets); the ratios are the medians of the rounds' paired ratios.", "",
             "| concurrency | facegate infer/s | p50 ms | p99 ms | Triton infer/s | p50 ms | p99 ms | "
             "facegate no batching infer/s | p99 ms | throughput facegate/Triton | p99 facegate/Triton |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f, t, nb = r["runs"]["facegate"], r["runs"]["triton"], r["runs"]["facegate-no-batching"]

    def tput(row: dict[str, float]) -> str:
        lo, hi = row.get("throughput_min"), row.get("throughput_max")
        return f"{row['throughput']:.1f}" + (f" ({lo:.0f}-{hi:.0f})" if lo is not None and hi is not None else "")

    for c in sorted(f, key=int):
        ratio = r["ratios"][c]
        lines.append(
            f"| {c} | {tput(f[c])} | {f[c]['p50_ms']:.1f} | {f[c]['p99_ms']:.1f} | "
            f"{tput(t[c])} | {t[c]['p50_ms']:.1f} | {t[c]['p99_ms']:.1f} | {tput(nb[c])} | "
            f"{nb[c]['p99_ms']:.1f} | **{ratio['throughput']:.2f}** | {ratio['p99']:.2f} |")
    lines += ["", "Server-side split (ms per request, from perf_analyzer's server section):", "",
              "| concurrency | facegate queue | facegate compute | facegate avg batch | Triton queue | "
              "Triton compute | Triton avg batch |", "|---|---|---|---|---|---|---|"]
    for c in sorted(f, key=int):
        lines.append(f"| {c} | {f[c]['server_queue_ms']:.1f} | {f[c]['server_compute_ms']:.1f} | "
                     f"{f[c]['avg_batch']:.1f} | {t[c]['server_queue_ms']:.1f} | {t[c]['server_compute_ms']:.1f} | "
                     f"{t[c]['avg_batch']:.1f} |")
    lines += ["", *[f"![{p}]({p})" for p in r.get("plots", [])], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="minifasnet_v2")
    p.add_argument("--bench-venv", type=Path, default=Path(".venv-bench"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--interval-ms", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3, help="measurements of each server at each concurrency")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--intra-op-threads", type=int, default=1, help="engine threads, the same for both servers")
    p.add_argument("--engine", choices=["onnxruntime", "openvino", "auto"], default="onnxruntime",
                   help="the CPU engine both servers run (facegate forced to it, PyTriton calling it); auto: "
                        "facegate's own choice (its best engine and gated precision here; needs --triton-engine)")
    p.add_argument("--triton-engine", choices=["onnxruntime", "openvino"],
                   help="a different engine for Triton (e.g. facegate's best against Triton's ONNX Runtime)")
    p.add_argument("--compute-nice", type=int, default=0, choices=range(20), metavar="0..19",
                   help="facegate's compute_nice for the run (default 0: the same priority as the load generator)")
    a = p.parse_args(argv)
    if a.engine == "auto" and a.triton_engine is None:
        p.error("--engine auto needs --triton-engine (Triton has no auto)")
    if not (a.bench_venv / "bin" / "perf_analyzer").exists():
        raise SystemExit(f"no perf_analyzer in {a.bench_venv}: run `make bench-env`")
    a.out.mkdir(parents=True, exist_ok=True)
    from server.config import ServerConfig

    batching = ServerConfig().batcher_for(a.model)
    cfg = a.out / f"facegate-{a.engine}-threads{a.intra_op_threads}.toml"
    # compute_nice = 0: here the load generator shares the server's two cores at nice 0, and at the default nice
    # 19 facegate's engine thread yields the CPU to perf_analyzer (measured: 5-10 % of the throughput at c16), a
    # neighbour no deployment has inside the server's own CPU share; Triton runs every thread at 0.
    cfg.write_text(f'[server]\ncompute_nice = {a.compute_nice}\n'
                   f'[runtime]\nintra_op_threads = {a.intra_op_threads}\ncpu_runtime = "{a.engine}"\n')
    triton_engine = a.triton_engine or a.engine
    tag = (f"-t{a.intra_op_threads}" if a.intra_op_threads != 1 else "") + \
        (f"-{a.engine}" if a.engine != "onnxruntime" else "") + \
        (f"-vs-{triton_engine}" if triton_engine != a.engine else "")
    # All three servers run at once and are measured in turn, concurrency by concurrency, for --rounds rounds: the
    # host's speed drifts by +-15 % within minutes here, so servers measured minutes apart are not comparable.
    # Each cell is the median over the rounds; a ratio is the median of the rounds' paired ratios.
    samples: dict[str, dict[int, list[dict[str, float]]]] = {k: {c: [] for c in a.concurrency} for k in LABELS}
    with ExitStack() as stack:
        progress("starting facegate, facegate without batching and Triton")
        addresses = {
            "facegate": stack.enter_context(facegate_server(
                a.repository, ["--config", str(cfg)], a.out / "server-facegate.log")),
            "facegate-no-batching": stack.enter_context(facegate_server(
                a.repository, ["--config", str(cfg), "--no-batching"], a.out / "server-facegate-no-batching.log")),
            "triton": stack.enter_context(triton_server(
                a.bench_venv, a.repository / a.model / "model.onnx", a.model, batching.max_batch_size,
                batching.max_queue_delay_us, a.intra_op_threads, a.out / "server-triton.log", triton_engine)),
        }
        for r in range(a.rounds):
            for c in a.concurrency:
                for label in LABELS:
                    row = perf_analyzer(a.bench_venv, addresses[label], a.model, [c], a.interval_ms,
                                        a.out / f"pa-{label}-r{r}.csv")[c]
                    samples[label][c].append(row)
        hist = batch_histogram(addresses["facegate"], a.model)
    runs = {label: {c: median_row(rows) for c, rows in by_c.items()} for label, by_c in samples.items()}
    result: dict[str, Any] = {
        "machine": machine_info(), "model": a.model, "max_batch_size": batching.max_batch_size,
        "max_queue_delay_us": batching.max_queue_delay_us, "intra_op_threads": a.intra_op_threads,
        "engine": a.engine, "triton_engine": triton_engine, "facegate_compute_nice": a.compute_nice,
        "rounds": a.rounds,
        "runs": {k: {str(c): v for c, v in rows.items()} for k, rows in runs.items()},
        "samples": {k: {str(c): v for c, v in rows.items()} for k, rows in samples.items()},
        "facegate_batch_histogram": {str(k): v for k, v in sorted(hist.items())},
    }
    result["plots"] = plots(result, a.out, tag)
    result["ratios"] = {str(c): facegate_vs_triton(samples["facegate"][c], samples["triton"][c])
                        for c in a.concurrency}
    write_report(a.out, f"compare{tag}", result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
