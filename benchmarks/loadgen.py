"""Load generator over gRPC: closed loop (fixed concurrency) or open loop (Poisson arrivals).

Drives CheckLiveness (image files), IdentifyFromClip (``--collection`` with clip folders and ``--fps``) or raw
model inference over the Open Inference Protocol (``--model NAME``, random tensors of the model's input shape).
Reports the server-side split too (queue, compute, achieved batch size per model), from the difference of the
server's statistics before and after the run.

Runs in its own process (``python -m benchmarks.loadgen``), so the client's CPU is not the server's. Bounded:
a warm-up, then a measured window of fixed length, and at most ``max_requests`` requests; loopback only.
Prints one JSON object: throughput, latency percentiles, and errors by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks.stats import summarize
from engines.specs import DETECTOR_SPEC
from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc


@dataclass
class Recorder:
    measure_from: float
    measure_until: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_messages: dict[str, str] = field(default_factory=dict)  # the first message seen for each code
    refused_latencies: list[float] = field(default_factory=list)  # how fast RESOURCE_EXHAUSTED came back
    sent: int = 0

    wrong: int = 0  # answers that differ from the reference answer for the same request

    def record(self, start: float, end: float, error: str | None, message: str = "") -> None:
        if not self.measure_from <= start < self.measure_until:
            return  # warm-up or tail: not measured
        if error is None:
            self.latencies.append(end - start)
        else:
            self.errors[error] += 1
            self.error_messages.setdefault(error, message[:200])
            if error == "RESOURCE_EXHAUSTED":
                self.refused_latencies.append(end - start)


def check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to load {target}: benchmarks target loopback addresses only")


Request = liveness_pb2.CheckLivenessRequest | identification_pb2.IdentifyFromClipRequest | oip.ModelInferRequest


def _method(channel: grpc.aio.Channel, req: Request):  # type: ignore[no-untyped-def]
    if isinstance(req, identification_pb2.IdentifyFromClipRequest):
        return identification_pb2_grpc.IdentificationServiceStub(channel).IdentifyFromClip
    if isinstance(req, oip.ModelInferRequest):
        return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    return liveness_pb2_grpc.LivenessServiceStub(channel).CheckLiveness


def model_requests(target: str, model: str, batch: int, count: int = 8) -> list[oip.ModelInferRequest]:
    """Random tensors of the model's input shape (dynamic spatial axes: a 3:4 portrait detector input)."""
    import numpy as np

    with grpc.insecure_channel(target) as ch:
        md = oip_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(oip.ModelMetadataRequest(name=model), timeout=10)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        req = oip.ModelInferRequest(model_name=model)
        for t in md.inputs:
            spatial = dict(zip((2, 3), DETECTOR_SPEC.export_size, strict=True))
            dims = [batch] + [(spatial.get(k, 1) if d < 0 else int(d)) for k, d in enumerate(t.shape) if k]
            req.inputs.add(name=t.name, datatype=t.datatype, shape=dims)
            req.raw_input_contents.append(rng.uniform(0, 255, dims).astype(np.float32).tobytes())
        out.append(req)
    return out


def server_stats(target: str, metadata: Metadata = ()) -> dict[str, tuple[int, int, int, int]]:
    """Per model: (requests, executions, queue ns, compute ns), cumulative; empty if unavailable (or the caller
    lacks the operator scope)."""
    try:
        with grpc.insecure_channel(target) as ch:
            resp = models_pb2_grpc.ModelServiceStub(ch).GetModelStatistics(models_pb2.GetModelStatisticsRequest(),
                                                                           timeout=10, metadata=metadata)
    except grpc.RpcError:
        return {}
    return {m.model: (m.inference_count, m.execution_count, m.queue.total_ns,
                      m.compute_input.total_ns + m.compute_infer.total_ns + m.compute_output.total_ns)
            for m in resp.models}


def server_split(before: dict[str, tuple[int, int, int, int]], after: dict[str, tuple[int, int, int, int]]
                 ) -> dict[str, dict[str, float]]:
    out = {}
    for model, (req, ex, q, c) in after.items():
        r0, e0, q0, c0 = before.get(model, (0, 0, 0, 0))
        dr, de = req - r0, ex - e0
        if dr > 0:
            out[model] = {"requests": dr, "executions": de, "avg_batch": dr / max(1, de),
                          "queue_ms": (q - q0) / dr / 1e6, "compute_ms": (c - c0) / dr / 1e6}
    return out


Metadata = tuple[tuple[str, str], ...]


def answer_of(resp: object) -> object:
    """What must not change from one call of the same request to the next (the decision, the top candidate)."""
    if isinstance(resp, liveness_pb2.CheckLivenessResponse):
        return resp.decision, round(resp.live_score, 4)
    if isinstance(resp, identification_pb2.IdentifyFromClipResponse):
        return resp.decision, resp.candidates[0].person_id if resp.candidates else ""
    return None


async def _one(call, req: Request, rec: Recorder, timeout_s: float, metadata: Metadata,  # type: ignore[no-untyped-def]
               expected: object = None) -> None:
    start = time.perf_counter()
    error, message = None, ""
    try:
        resp = await call(req, timeout=timeout_s, metadata=metadata)
        if expected is not None and answer_of(resp) != expected:
            rec.wrong += 1
    except grpc.aio.AioRpcError as err:
        error, message = err.code().name, err.details() or ""
    rec.record(start, time.perf_counter(), error, message)


async def reference_answers(call, requests: list[Request], metadata: Metadata) -> list[object]:  # type: ignore[no-untyped-def]
    """One answer per distinct request, before the load: what every later answer must equal."""
    return [answer_of(await call(r, timeout=60, metadata=metadata)) for r in requests]


_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


@contextlib.asynccontextmanager
async def _stubs(target: str, requests: list[Request], n: int):  # type: ignore[no-untyped-def]
    """``n`` stubs, each on a channel of its own: a distinct channel argument keeps gRPC from sharing one
    connection between them, so a server with several workers on one port (SO_REUSEPORT) sees several
    connections, as it would from several callers."""
    async with contextlib.AsyncExitStack() as stack:
        chans = [await stack.enter_async_context(grpc.aio.insecure_channel(
            target, options=[*_OPTIONS, ("grpc.facegate_loadgen_channel", i)])) for i in range(n)]
        yield [_method(ch, requests[0]) for ch in chans]


async def closed_loop(target: str, requests: list[Request], concurrency: int,
                      warmup_s: float, duration_s: float, max_requests: int, timeout_s: float,
                      metadata: Metadata = (), channels: int = 1) -> Recorder:
    async with _stubs(target, requests, channels) as stubs:
        refs = await reference_answers(stubs[0], requests, metadata)
        t0 = time.perf_counter()
        rec = Recorder(t0 + warmup_s, t0 + warmup_s + duration_s)

        async def worker(i: int) -> None:
            k, stub = i, stubs[i % len(stubs)]
            while time.perf_counter() < rec.measure_until and rec.sent < max_requests:
                rec.sent += 1
                await _one(stub, requests[k % len(requests)], rec, timeout_s, metadata, refs[k % len(requests)])
                k += concurrency

        await asyncio.gather(*[worker(i) for i in range(concurrency)])
    return rec


async def open_loop(target: str, requests: list[Request], rate_rps: float,
                    warmup_s: float, duration_s: float, max_requests: int, timeout_s: float,
                    seed: int = 0, metadata: Metadata = (), channels: int = 1) -> Recorder:
    rng = random.Random(seed)
    async with _stubs(target, requests, channels) as stubs:
        refs = await reference_answers(stubs[0], requests, metadata)
        t0 = time.perf_counter()
        rec = Recorder(t0 + warmup_s, t0 + warmup_s + duration_s)
        tasks: set[asyncio.Task[None]] = set()
        next_at = t0
        k = 0
        while next_at < rec.measure_until and rec.sent < max_requests:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec.sent += 1
            i = k % len(requests)
            task = asyncio.create_task(_one(stubs[k % len(stubs)], requests[i], rec, timeout_s, metadata, refs[i]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
            next_at += rng.expovariate(rate_rps)
        if tasks:
            await asyncio.gather(*tasks)
    return rec


def load_requests(paths: list[Path], collection: str = "", fps: float = 0.0) -> list[Request]:
    """CheckLiveness requests from image files, or IdentifyFromClip requests from clip folders."""
    if collection:
        from facegate_client.client import clip_from_folder

        return [identification_pb2.IdentifyFromClipRequest(collection=collection, clip=clip_from_folder(p, fps))
                for p in paths]
    return [liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=p.read_bytes())) for p in paths]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", type=Path, help="image files, or clip folders with --collection")
    p.add_argument("--collection", help="drive IdentifyFromClip against this collection")
    p.add_argument("--model", help="drive raw ModelInfer on this model (inputs are then ignored)")
    p.add_argument("--batch", type=int, default=1, help="batch size of each raw ModelInfer request")
    p.add_argument("--fps", type=float, default=200.0, help="capture fps of the clip folders")
    p.add_argument("--target", default="127.0.0.1:50051")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=1)
    g.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request")
    p.add_argument("--token-file", type=Path, help="bearer token sent with every request")
    p.add_argument("--channels", type=int, default=1, help="connections to spread the calls over")
    args = p.parse_args(argv)
    if args.channels < 1:
        p.error(f"--channels must be >= 1, got {args.channels}")
    check_loopback(args.target)
    md: Metadata = ()
    if args.token_file:
        md = (("authorization", f"Bearer {args.token_file.read_text().strip()}"),)
    if args.model:
        requests: list[Request] = list(model_requests(args.target, args.model, args.batch))
    elif args.inputs:
        requests = load_requests(args.inputs, args.collection or "", args.fps)
    else:
        p.error("give image files, clip folders with --collection, or --model")
    before = server_stats(args.target, md)
    if args.rate:
        rec = asyncio.run(open_loop(args.target, requests, args.rate, args.warmup, args.duration,
                                    args.max_requests, args.timeout, metadata=md, channels=args.channels))
        mode = {"mode": "open", "rate_rps": args.rate}
    else:
        rec = asyncio.run(closed_loop(args.target, requests, args.concurrency, args.warmup, args.duration,
                                      args.max_requests, args.timeout, metadata=md, channels=args.channels))
        mode = {"mode": "closed", "concurrency": args.concurrency}
    refused = summarize(rec.refused_latencies, args.duration)  # no p50 when none was refused
    out = {**mode, **summarize(rec.latencies, args.duration), "errors": dict(rec.errors),
           "error_messages": rec.error_messages, "wrong_answers": rec.wrong,
           "refused_p50_ms": refused.get("p50_ms"), "refused_p99_ms": refused.get("p99_ms"),
           "sent": rec.sent, "server": server_split(before, server_stats(args.target, md))}
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
