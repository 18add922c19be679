"""Memory at the limits: the server's peak memory under requests each as large as its limits let through,
``make bench-memory``.

The limits bound each request (a 40 MP image, a clip's 122.9 MP, a video's frames) and the server's total (250 MP
of decoded pixels, 256 MiB of request bytes in flight). Whether those bounds fit a pod's memory is what an
operator needs to know: the Deployment sets a limit (deploy/kubernetes/base/deployment.yaml), and a pod that
passes it is killed with every call in it. Here a server with the default settings (and token auth, as
deployed) gets, from ``--concurrency`` clients that retry at once when refused (no back-off: the worst a caller
can do), one kind of call at a time and then all at once:

- ``big_image``: CheckLiveness of a 7296x5472 JPEG (39.9 MP, just under the 40 MP limit) with a face;
- ``big_frames``: IdentifyFromClip of 30 frames of 2000x2000 (120 MP, just under a request's 122.9 MP);
- ``big_video``: IdentifyFromClip of a Motion JPEG video of 360 frames of 640x480 (110.6 MP);
- ``big_infer``: ModelInfer of the detector on 3 inputs of 640x640 (its largest side; 14.7 MB of FP32, the most
  of a batch that fits a message), which the pixel budget does not cover;
- ``normal``: CheckLiveness of the sample photos.

The proportional set size (PSS) of the server and every process under it (video workers, multiprocessing's
forkserver and resource tracker) is read from /proc every 50 ms; PSS counts pages shared between them once.
Where this process may make a memory control group (root, cgroup v1 or v2), the server runs in one held to the
Deployment's limit, as in its pod: the group's working set (what the kernel kills on) is read every 50 ms too,
with the processes the kernel killed in it, and the limit the server itself reports (``facegate_memory_*``).
Writes benchmarks/results/memory_limits.json and .md. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from benchmarks.machine import machine_info, write_report
from benchmarks.memory_group import deployment_limit, limited_group, mebibytes, set_limit
from benchmarks.server_process import descendants, facegate_process, free_port, metric_samples, wait_for_metrics
from benchmarks.soak import add_inputs, clip_folders, inputs, settings
from facegate.v1 import common_pb2, identification_pb2, identification_pb2_grpc, liveness_pb2, liveness_pb2_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from server.auth.tokens import new_token
from server.memory_limit import MemoryGroup
from tests.images import encode, mjpeg_avi

KINDS = ("big_image", "big_frames", "big_video", "big_infer", "normal")


def tree_pss(pid: int) -> tuple[int, int]:
    """The PSS (bytes) of ``pid`` and its descendants, and how many processes that was."""
    total = n = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    n += 1
                    break
        except OSError:
            pass
    return total, n


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise SystemExit(f"{path}: not an image")
    return np.asarray(img)


def _jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    return encode(img, "JPEG", quality=quality)


def materials(samples: list[Path], synthetic: Path) -> dict[str, Any]:
    """The inputs, made once: each as large as the default limits admit."""
    photo = _read(samples[-1])
    frames = [_read(f) for f in sorted(clip_folders(synthetic)[0][1].iterdir())[:60]]
    small = [_jpeg(cv2.resize(f, (640, 480))) for f in frames]
    return {
        "big_image": _jpeg(cv2.resize(photo, (7296, 5472))),
        "big_frames": [_jpeg(cv2.resize(f, (2000, 2000)), 80) for f in frames[:30]],
        "big_video": mjpeg_avi(small * 6, 640, 480),
        "big_infer": np.random.default_rng(14).random((3, 3, 640, 640), np.float32).tobytes(),
        "normal": [p.read_bytes() for p in samples],
        "enrol": [_jpeg(f) for f in frames],
    }


class Sampler:
    """The tree's PSS, and its control group's working set, every ``every_s`` on a thread; ``peak()`` since the
    last ``reset()``."""

    def __init__(self, pid: int, group: MemoryGroup | None, every_s: float = 0.05) -> None:
        self._pid, self._group, self._every = pid, group, every_s
        self._peak, self._procs, self._working = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            pss, n = tree_pss(self._pid)
            self._peak, self._procs = max(self._peak, pss), max(self._procs, n)
            if self._group is not None:
                self._working = max(self._working, self._group.working_set() or 0)

    def reset(self) -> None:
        self._peak, self._procs, self._working = 0, 0, 0

    def peak(self) -> tuple[int, int]:
        return self._peak, self._procs

    def peak_working_set(self) -> int:
        return self._working

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def phase(calls: list[dict[str, Callable[[], Any]]], kinds: tuple[str, ...], concurrency: int,
                duration_s: float) -> Counter[str]:
    """``concurrency`` clients, each sending one kind (in turn over ``kinds``) again and again for
    ``duration_s`` over its channel's stubs (``calls``, in turn); the statuses they got."""
    got: Counter[str] = Counter()
    end = time.monotonic() + duration_s

    async def client(i: int) -> None:
        kind = kinds[i % len(kinds)]
        while time.monotonic() < end:
            try:
                await calls[i % len(calls)][kind]()
                got[f"{kind} OK"] += 1
            except grpc.aio.AioRpcError as err:
                got[f"{kind} {err.code().name}"] += 1

    await asyncio.gather(*[client(i) for i in range(concurrency)])
    return got


def refusals(metrics_ports: range) -> Counter[str]:
    """What stopped calls so far, from the server's metrics: each budget's refusals for room, each pipeline's
    shedding of calls that would wait too long, and each video limit's stops (``busy``: the decode kept from a CPU
    until the wall-clock limit, RESOURCE_EXHAUSTED); summed over the server's workers."""
    families = {"facegate_budget_refused_total": "budget", "facegate_admission_shed_total": "pipeline",
                "facegate_video_decodes_stopped_total": "reason"}
    counts: Counter[str] = Counter()
    for port in metrics_ports:
        counts.update({f"{families[s.name].replace('reason', 'video')} {s.labels[families[s.name]]}": int(s.value)
                       for s in metric_samples(port, families)})
    return counts


def _calls(channel: grpc.aio.Channel, m: dict[str, Any], md: tuple[tuple[str, str], ...],
           rng: random.Random) -> dict[str, Callable[[], Any]]:
    live = liveness_pb2_grpc.LivenessServiceStub(channel)
    ident = identification_pb2_grpc.IdentificationServiceStub(channel)
    infer = oip_grpc.GRPCInferenceServiceStub(channel)

    def clip(**kw: Any) -> identification_pb2.Clip:
        return identification_pb2.Clip(fps=200.0, **kw)

    return {
        "big_image": lambda: live.CheckLiveness(liveness_pb2.CheckLivenessRequest(
            image=common_pb2.Image(data=m["big_image"])), metadata=md, timeout=60),
        "big_frames": lambda: ident.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
            collection="m", clip=clip(frames=[common_pb2.Image(data=f) for f in m["big_frames"]])),
            metadata=md, timeout=60),
        "big_video": lambda: ident.IdentifyFromClip(identification_pb2.IdentifyFromClipRequest(
            collection="m", clip=clip(video=m["big_video"])), metadata=md, timeout=60),
        "big_infer": lambda: infer.ModelInfer(oip.ModelInferRequest(
            model_name="retinaface", inputs=[oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[3, 3, 640, 640])], raw_input_contents=[m["big_infer"]]),
            metadata=md, timeout=60),
        "normal": lambda: live.CheckLiveness(liveness_pb2.CheckLivenessRequest(
            image=common_pb2.Image(data=rng.choice(m["normal"]))), metadata=md, timeout=60),
    }


async def run(address: str, token: str, m: dict[str, Any], sampler: Sampler, concurrency: int,
              duration_s: float, metrics_ports: range, group: MemoryGroup | None,
              phases: list[tuple[str, ...]], resize: tuple[float, int] | None = None) -> list[dict[str, Any]]:
    md = (("authorization", f"Bearer {token}"),)
    # One channel, or with several workers one a client: the kernel spreads connections, not calls, over the
    # workers. (A pool of its own for each, or gRPC would share one connection among channels alike.)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options)
                for _ in range(concurrency if len(metrics_ports) > 1 else 1)]
    ident = identification_pb2_grpc.IdentificationServiceStub(channels[0])
    await ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection="m"), metadata=md)
    await ident.EnrollFromClip(identification_pb2.EnrollFromClipRequest(collection="m", person_id="p", clips=[
        identification_pb2.Clip(fps=200.0, frames=[common_pb2.Image(data=f) for f in m["enrol"]])]), metadata=md)
    rng = random.Random(14)
    calls = [_calls(channel, m, md, rng) for channel in channels]
    out = []
    resizing = None
    if resize is not None and group is not None:  # the group's limit changed under the serving server, as a
        after_s, to = resize                       # Kubernetes in-place resize changes a running pod's

        async def resized() -> None:
            await asyncio.sleep(after_s)
            set_limit(group, to)
            print(f"[bench-memory] the group's limit set to {to / 2**20:.0f} MiB", file=sys.stderr)

        resizing = asyncio.get_running_loop().create_task(resized())
    for kinds in phases:
        await asyncio.sleep(2)  # (what the last phase left in flight ends)
        sampler.reset()
        before = refusals(metrics_ports)
        kills = group.oom_kills() if group is not None else None
        got = await phase(calls, kinds, concurrency, duration_s)
        peak, procs = sampler.peak()
        stopped = +(refusals(metrics_ports) - before)  # (+: only what rose)
        out.append({"kinds": list(kinds), "peak_pss_mib": peak / 2**20, "processes": procs,
                    "statuses": dict(sorted(got.items())), "stopped_by": dict(sorted(stopped.items())),
                    "budgets_at_end": _worker_figures(metrics_ports[0])[1],  # (worker 0's, as the phase ended)
                    **({"peak_working_set_mib": sampler.peak_working_set() / 2**20,
                        "limit_mib_at_end": (group.limit() or 0) / 2**20,
                        "oom_kills": (group.oom_kills() or 0) - (kills or 0)} if group is not None else {})})
        print(f"[bench-memory] {'+'.join(kinds)}: peak {peak / 2**20:.0f} MiB (working set "
              f"{sampler.peak_working_set() / 2**20:.0f} MiB), {dict(got)}, stopped by {dict(stopped)}",
              file=sys.stderr)
    if resizing is not None:
        resizing.cancel()
    for channel in channels:
        await channel.close()
    return out


def _worker_figures(port: int) -> tuple[dict[str, float], dict[str, int]]:
    """One worker's unlabelled figures (its memory limit, resident memory) and its three memory budgets."""
    scraped = metric_samples(port, {"facegate_memory_limit_bytes", "process_resident_memory_bytes",
                                    "facegate_budget_capacity"})
    budgets = {s.labels["budget"]: int(s.value) for s in scraped if s.name == "facegate_budget_capacity"
               and s.labels["budget"] in ("decoded_pixels", "request_bytes", "infer_input_bytes")}
    return {s.name: s.value for s in scraped if not s.labels}, budgets


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    limit = f"{r['deployment_limit']} ({r['deployment_limit_mib']:.0f} MiB)" if r["deployment_limit"] else "none"
    changed = ", ".join(f"`{kv}`" for kv in r.get("settings", []))
    limits = f"default limits but {changed}" if changed else "default limits"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['date']}. One server (`--workers "
             f"{r.get('workers', 1)}`), {limits}, token auth; "
             f"{r['concurrency']} clients retrying at once, {r['duration_s']:.0f} s a phase. The memory limit "
             f"({r.get('limit_from', 'Deployment')}): {limit}"
             + (f", set to {r['resize']['to_mib']:.0f} MiB {r['resize']['after_s']:.0f} s into the phases while the "
                "server served (an in-place resize)" if r.get("resize") else "") + ". Before the first phase: "
             f"**{r['base_pss_mib']:.0f} MiB** (PSS of the server and the processes under it). The phases run in "
             "this order in one server, so a phase's peak includes what the allocator kept from those before it. "
             + " ".join(f"Worker {i}'s memory budgets: "
                        + (", ".join(f"{k} {v:,}" for k, v in w["budgets"].items()) or "not read")
                        + f"; its resident memory at the start: {w['resident_mib']:.0f} MiB."
                        for i, w in enumerate(r.get("workers_at_start", []))), "",
             "", "*Stopped by*: the server's own count of what refused or stopped the calls: a budget without room "
             "(`facegate_budget_refused_total`), a pipeline shedding calls that would wait too long "
             "(`facegate_admission_shed_total`), or a video decode's limit (`facegate_video_decodes_stopped_total`: "
             "`busy` and `memory`, a decoder the kernel killed, are RESOURCE_EXHAUSTED, `cpu` and `stalled` "
             "INVALID_ARGUMENT).", "", _group_line(r), "",
             "| sent | peak PSS | over the start | share of the limit | peak working set (its group), OOM kills | "
             "processes | statuses | stopped by | worker 0's budgets at its end: pixels, request bytes, ModelInfer "
             "bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in r["phases"]:
        held = p.get("limit_mib_at_end") or r["deployment_limit_mib"]  # (what the group was held to, resized or not)
        share = f"{p['peak_pss_mib'] / held:.0%}" if r["deployment_limit"] else "-"
        working = (f"{p['peak_working_set_mib']:.0f} MiB ({p['peak_working_set_mib'] / held:.0%}"
                   f"), {p['oom_kills']}") if "oom_kills" in p else "-"
        statuses = ", ".join(f"{k} {v}" for k, v in p["statuses"].items())
        stopped = ", ".join(f"{k} {v}" for k, v in p.get("stopped_by", {}).items()) or "-"
        lines.append(f"| {' + '.join(p['kinds'])} | {p['peak_pss_mib']:.0f} MiB | "
                     f"+{p['peak_pss_mib'] - r['base_pss_mib']:.0f} MiB | {share} | {working} | {p['processes']} | "
                     f"{statuses} | {stopped} | {_budgets_text(p.get('budgets_at_end', {}))} |")
    return "\n".join(lines) + "\n"


def _budgets_text(b: dict[str, int]) -> str:
    if not b:
        return "-"
    return (f"{b.get('decoded_pixels', 0) / 1e6:.1f} MP, {b.get('request_bytes', 0) / 2**20:.0f} MiB, "
            f"{b.get('infer_input_bytes', 0) / 2**20:.0f} MiB")


def _group_line(r: dict[str, Any]) -> str:
    g = r.get("memory_group")
    if not g:
        return ("The server ran without a memory limit: this process could not make a memory control group (it "
                "needs root and cgroup v1 or v2).")
    return (f"The server ran in a memory control group (cgroup v{g['version']}) held to {g['limit_mib']:.0f} MiB "
            f"({r.get('limit_from', 'Deployment')}), as in its pod; the limit the server itself reported "
            f"(`facegate_memory_limit_bytes`): {g['reported_limit_mib']:.0f} MiB. *Working set*: the group's usage "
            "less its inactive file pages, what the kernel kills on; *OOM kills*: processes the kernel killed in it.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_inputs(p)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--limit", help="the memory limit to hold the server to, as a Kubernetes quantity (e.g. 2560Mi): "
                   "a tighter one shows what happens at the limit (default: the Deployment's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [server] setting for the server, as TOML (e.g. max_inflight_pixels=125000000; repeatable)")
    p.add_argument("--resize-to", help="a memory limit to set on the server's group while it serves, as a Kubernetes "
                   "in-place resize does (e.g. 2560Mi), --resize-after seconds into the phases")
    p.add_argument("--resize-after", type=float, default=20.0)
    p.add_argument("--only", action="append", choices=KINDS, help="run only this kind's phase (repeatable; "
                   "default: each kind alone, then all at once)")
    a = p.parse_args(argv)
    if not 0 < a.duration <= 600 or not 1 <= a.concurrency <= 64 or not 1 <= a.workers <= 8:
        p.error("--duration in (0, 600], --concurrency in [1, 64], --workers in [1, 8]")
    samples, work = inputs(a, "memory-work")
    token = new_token()
    config = settings(work, token, new_token(), 5.0, a.set)  # (the server refuses a key it does not know)
    m = materials(samples, a.synthetic)
    metrics_port = free_port()
    limit = a.limit or deployment_limit()
    held_to = int(mebibytes(limit) * 2**20) if limit else 1 << 62  # (without a limit: a group all the same)
    with (limited_group(held_to) as group,
          facegate_process(a.repository, ["--config", str(config), "--metrics-port", str(metrics_port),
                                           "--workers", str(a.workers)], work / "server.log", group)
          as (address, proc)):
        ports = range(metrics_port, metrics_port + a.workers)  # (worker i serves its metrics on port + i)
        for port in ports:
            wait_for_metrics(port)
        time.sleep(2)
        base = tree_pss(proc.pid)[0] / 2**20
        # Each worker's memory budgets (their settings, or lowered to fit the limit: each fits its own, from what
        # it holds when warm) and resident memory, warm: what server/memory_budgets.py's estimate starts from.
        at_start = [_worker_figures(port) for port in ports]
        reported = at_start[0][0]
        sampler = Sampler(proc.pid, group)
        try:
            phases = asyncio.run(run(address, token, m, sampler, a.concurrency, a.duration, ports, group,
                                     [(k,) for k in a.only] if a.only else [(k,) for k in KINDS] + [KINDS],
                                     (a.resize_after, int(mebibytes(a.resize_to) * 2**20)) if a.resize_to else None))
        finally:
            sampler.stop()
        held = {"version": group.version, "limit_mib": (group.limit() or 0) / 2**20,
                "reported_limit_mib": reported.get("facegate_memory_limit_bytes", 0) / 2**20} if group else None
    result = {"machine": machine_info(), "duration_s": a.duration, "concurrency": a.concurrency, "workers": a.workers,
              "base_pss_mib": base, "deployment_limit": limit, "settings": a.set, "budgets": at_start[0][1],
              "resident_mib_at_start": reported.get("process_resident_memory_bytes", 0) / 2**20,  # (worker 0's)
              "workers_at_start": [{"budgets": budgets, "resident_mib": scraped.get("process_resident_memory_bytes",
                                                                                    0) / 2**20}
                                   for scraped, budgets in at_start],
              "limit_from": "--limit" if a.limit else "Deployment",
              "resize": {"to_mib": mebibytes(a.resize_to), "after_s": a.resize_after} if a.resize_to else None,
              "deployment_limit_mib": mebibytes(limit) if limit else None, "memory_group": held, "phases": phases,
              "inputs_bytes": {k: len(v) if isinstance(v, bytes) else sum(map(len, v)) for k, v in m.items()}}
    write_report(a.out, "memory_limits", result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
