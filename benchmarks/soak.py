"""A long run of mixed traffic, to see that nothing in the server grows with the calls: ``make bench-soak``.

Overload and hostile input are each tested on their own; a leak shows only over many calls of every kind at once.
One server (two token callers, one of them limited to a few calls a second and to liveness; the audit log
rotating; a SQLite gallery) gets, from ``--concurrency`` closed-loop workers in this process, a seeded mix:
liveness checks of the samples and identifications of synthetic clips (each answer compared with the first one
for the same input), an enrolment of a new person and its deletion, every case of the bad-input corpus
(tests/bad_inputs.py), calls without a credential or with a wrong one, calls out of the caller's scope, calls over
its rate, calls past a 2 ms deadline, calls cancelled by the client while they run, and model and health calls.

Every ``--sample-s`` the server's resident memory (with its direct children: its workers, multiprocessing's
forkserver and resource tracker), threads and open file descriptors are read from /proc, and its C heap from its
metrics. Where this process may make a memory control group, the server runs in one held to the Deployment's
limit, and the group's working set (what the kernel kills on, and the memory alerts read) is sampled too, from
the server's own ``facegate_memory_working_set_bytes``. After the warm-up, their growth is fitted by least
squares against time and against calls.

Writes benchmarks/results/soak.json and .md. Loopback only, bounded in time (``--duration``) and count.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.machine import machine_info, write_report
from benchmarks.memory_group import limited_group, pod_limit_bytes
from benchmarks.server_process import facegate_process, free_port, metric_samples, process_tree_usage
from benchmarks.soak_report import markdown, summarize_samples
from facegate.v1 import (
    common_pb2,
    identification_pb2,
    identification_pb2_grpc,
    liveness_pb2,
    liveness_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from facegate_client.client import clip_from_folder
from inference import grpc_service_pb2_grpc as oip_grpc
from server.auth.tokens import hash_token, new_token
from tests.bad_inputs import Case, Materials, cases

Code = grpc.StatusCode
COLLECTION = "corpus"  # the bad-input corpus's own collection, where its "alice" is enrolled
ENROLLED = 4  # synthetic persons enrolled for the identifications

# What each kind of call is, its share of the calls, and the statuses it may get.
MIX: dict[str, tuple[float, tuple[grpc.StatusCode, ...]]] = {
    "liveness": (0.40, (Code.OK,)),
    "identify": (0.12, (Code.OK,)),
    "enrol_delete": (0.04, (Code.OK,)),
    "bad_input": (0.16, ()),  # each case's own codes
    "no_credential": (0.05, (Code.UNAUTHENTICATED,)),
    "out_of_scope": (0.04, (Code.PERMISSION_DENIED,)),
    "over_rate": (0.06, (Code.OK, Code.RESOURCE_EXHAUSTED)),
    "past_deadline": (0.05, (Code.DEADLINE_EXCEEDED,)),
    "cancelled": (0.03, (Code.CANCELLED, Code.OK)),
    "models_health": (0.05, (Code.OK,)),
}


@dataclass
class Tally:
    calls: int = 0
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status) -> calls
    unexpected: Counter[str] = field(default_factory=Counter)  # "kind (case): status: message" -> calls
    wrong_answers: int = 0

    def record(self, kind: str, code: grpc.StatusCode, expected: tuple[grpc.StatusCode, ...], what: str = "",
               message: str = "") -> None:
        self.calls += 1
        self.by_kind[(kind, code.name)] += 1
        if code == Code.RESOURCE_EXHAUSTED and message.startswith("server busy"):
            return  # shed under load (a pixel budget held by videos, say): the documented answer to any call
        if code not in expected:
            self.unexpected[f"{kind}{f' ({what})' if what else ''}: {code.name}: {message[:160]}"] += 1


@dataclass
class Traffic:
    """The requests, built once (the corpus's big ones too), and the channels they go out on."""

    channel: grpc.aio.Channel
    token: tuple[tuple[str, str], ...]
    limited: tuple[tuple[str, str], ...]
    images: list[bytes]
    probes: list[identification_pb2.Clip]
    enrol_clip: identification_pb2.Clip
    corpus: list[tuple[Case, object]]
    reference: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ch = self.channel
        self.live = liveness_pb2_grpc.LivenessServiceStub(ch)
        self.ident = identification_pb2_grpc.IdentificationServiceStub(ch)
        self.models = models_pb2_grpc.ModelServiceStub(ch)
        self.health = health_pb2_grpc.HealthStub(ch)
        self.infer = oip_grpc.GRPCInferenceServiceStub(ch)
        self.corpus_calls: dict[str, Callable[..., Any]] = {
            "CheckLiveness": self.live.CheckLiveness, "IdentifyFromClip": self.ident.IdentifyFromClip,
            "EnrollFromClip": self.ident.EnrollFromClip, "DeletePerson": self.ident.DeletePerson,
            "ListPersons": self.ident.ListPersons, "ModelInfer": self.infer.ModelInfer}


def _md(creds: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return (*creds, ("x-request-id", uuid.uuid4().hex))  # a new id every call: nothing may be kept per id


async def _status(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return Code.OK, "", await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", None


def _answer(resp: Any) -> object:
    if isinstance(resp, liveness_pb2.CheckLivenessResponse):
        return resp.decision
    return tuple(c.person_id for c in resp.candidates[:1])


async def one_call(kind: str, t: Traffic, rng: random.Random, tally: Tally) -> None:
    expected = MIX[kind][1]
    if kind == "liveness":
        i = rng.randrange(len(t.images))
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=t.images[i]))
        code, msg, resp = await _status(t.live.CheckLiveness(req, metadata=_md(t.token), timeout=60))
        if resp is not None and t.reference.setdefault(f"image {i}", _answer(resp)) != _answer(resp):
            tally.wrong_answers += 1
    elif kind == "identify":
        i = rng.randrange(len(t.probes))
        req_i = identification_pb2.IdentifyFromClipRequest(collection=COLLECTION, clip=t.probes[i], top_k=3)
        code, msg, resp = await _status(t.ident.IdentifyFromClip(req_i, metadata=_md(t.token), timeout=60))
        if resp is not None and t.reference.setdefault(f"clip {i}", _answer(resp)) != _answer(resp):
            tally.wrong_answers += 1
    elif kind == "enrol_delete":
        person = f"soak-{uuid.uuid4().hex[:12]}"
        code, msg, _ = await _status(t.ident.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
            collection=COLLECTION, person_id=person, clips=[t.enrol_clip], request_key=uuid.uuid4().hex),
            metadata=_md(t.token), timeout=60))
        if code == Code.OK:  # the gallery must not grow with the run: each new person goes again
            code, msg, _ = await _status(t.ident.DeletePerson(identification_pb2.DeletePersonRequest(
                collection=COLLECTION, person_id=person), metadata=_md(t.token), timeout=60))
    elif kind == "bad_input":
        case, request = t.corpus[rng.randrange(len(t.corpus))]
        code, msg, _ = await _status(t.corpus_calls[case.rpc](request, metadata=_md(t.token),
                                                              timeout=case.timeout_s))
        tally.record(kind, code, case.codes, case.name, msg)
        return
    elif kind == "no_credential":
        creds = () if rng.random() < 0.5 else (("authorization", f"Bearer {new_token()}"),)
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=t.images[0]))
        code, msg, _ = await _status(t.live.CheckLiveness(req, metadata=_md(creds), timeout=30))
    elif kind == "out_of_scope":
        req_i = identification_pb2.IdentifyFromClipRequest(collection=COLLECTION, clip=t.probes[0])
        code, msg, _ = await _status(t.ident.IdentifyFromClip(req_i, metadata=_md(t.limited), timeout=30))
    elif kind == "over_rate":
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=t.images[0]))
        code, msg, _ = await _status(t.live.CheckLiveness(req, metadata=_md(t.limited), timeout=30))
    elif kind == "past_deadline":
        req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=t.images[0]))
        code, msg, _ = await _status(t.live.CheckLiveness(req, metadata=_md(t.token), timeout=0.002))
    elif kind == "cancelled":
        req_i = identification_pb2.IdentifyFromClipRequest(collection=COLLECTION, clip=t.probes[0])
        call = t.ident.IdentifyFromClip(req_i, metadata=_md(t.token), timeout=60)
        await asyncio.sleep(rng.uniform(0.001, 0.02))  # mid-upload or mid-pipeline
        call.cancel()  # (False if it already ended: then it is answered)
        try:
            code, msg, _ = await _status(call)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this worker itself is being stopped
                raise
            code, msg = Code.CANCELLED, ""
    else:
        which = rng.randrange(3)
        if which == 0:
            code, msg, _ = await _status(t.models.ListModels(models_pb2.ListModelsRequest(), metadata=_md(t.token),
                                                             timeout=30))
        elif which == 1:
            code, msg, _ = await _status(t.models.GetModelStatistics(models_pb2.GetModelStatisticsRequest(),
                                                                     metadata=_md(t.token), timeout=30))
        else:
            code, msg, _ = await _status(t.health.Check(health_pb2.HealthCheckRequest(), timeout=30))
    tally.record(kind, code, expected, message=msg)


def heap_usage(metrics_port: int | None, grouped: bool = False) -> dict[str, float]:
    """The server process's C heap in use and free (its ``facegate_heap_*`` gauges), or nothing where it has none;
    and, when the server runs in a control group of its own (``grouped``), the group's working set."""
    names = ("facegate_heap_in_use_bytes", "facegate_heap_free_bytes",
             *(("facegate_memory_working_set_bytes",) if grouped else ()))
    return {s.name.removeprefix("facegate_").removeprefix("memory_").removesuffix("_bytes"): s.value
            for s in (metric_samples(metrics_port, names) if metrics_port else [])}


async def soak(t: Traffic, pid: int, duration_s: float, concurrency: int, sample_s: float, seed: int,
               audit: Path, only: tuple[str, ...] = (), metrics_port: int | None = None,
               grouped: bool = False) -> dict[str, Any]:
    tally = Tally()
    samples: list[dict[str, Any]] = []
    kinds = [k for k in MIX if not only or k in only]
    weights = [MIX[k][0] for k in kinds]
    t0 = time.monotonic()
    end = t0 + duration_s

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            await one_call(rng.choices(kinds, weights)[0], t, rng, tally)

    def sample() -> dict[str, Any]:
        return {"t_s": time.monotonic() - t0, "calls": tally.calls, **process_tree_usage(pid),
                **heap_usage(metrics_port, grouped),
                "audit_bytes": sum(p.stat().st_size for p in audit.parent.glob(audit.name + "*"))}

    async def sampler() -> None:
        while time.monotonic() < end:
            s = await asyncio.to_thread(sample)
            samples.append(s)
            print(f"[bench-soak] {samples[-1]['t_s']:.0f} s: {tally.calls} calls, RSS {s['rss'] / 2**20:.1f} MiB, "
                  f"heap in use {s.get('heap_in_use', 0) / 2**20:.1f} MiB, {s['threads']} threads, {s['fds']} fds, "
                  f"{len(tally.unexpected)} unexpected", file=sys.stderr)
            await asyncio.sleep(sample_s)

    await asyncio.gather(sampler(), *[worker(i) for i in range(concurrency)])
    samples.append(sample())
    return {"calls": tally.calls, "wall_s": time.monotonic() - t0, "samples": samples,
            "by_kind": {f"{k} {c}": n for (k, c), n in sorted(tally.by_kind.items())},
            "unexpected": dict(tally.unexpected.most_common(20)), "unexpected_calls": sum(tally.unexpected.values()),
            "wrong_answers": tally.wrong_answers}


def clip_folders(synthetic: Path) -> list[list[Path]]:
    """The clip folders of the first ``ENROLLED`` synthetic persons: the first of each is enrolled, the second
    identified."""
    subjects = sorted(p for p in synthetic.iterdir() if p.is_dir())[:ENROLLED]
    return [sorted(p for p in s.iterdir() if p.is_dir()) for s in subjects]


async def prepare(address: str, token: str, limited: str, images: list[bytes], clips: list[list[Path]],
                  work: Path) -> Traffic:
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                          ("grpc.max_receive_message_length", 64 << 20)])
    m = Materials(work, images[-1], [f.data for f in clip_from_folder(clips[0][0], 200.0).frames],
                  collection=COLLECTION)
    corpus = [(c, c.build(m)) for c in cases(work)]
    t = Traffic(channel, (("authorization", f"Bearer {token}"),), (("authorization", f"Bearer {limited}"),),
                images, [clip_from_folder(c[1], 200.0) for c in clips], clip_from_folder(clips[0][0], 200.0), corpus)
    md = _md(t.token)
    await t.ident.CreateCollection(identification_pb2.CreateCollectionRequest(collection=COLLECTION), metadata=md)
    await t.ident.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
        collection=COLLECTION, person_id=m.enrolled, clips=[clip_from_folder(clips[0][0], 200.0)]), metadata=md)
    for c in clips:
        await t.ident.EnrollFromClip(identification_pb2.EnrollFromClipRequest(
            collection=COLLECTION, person_id=c[0].parent.name, clips=[clip_from_folder(c[0], 200.0)]), metadata=md)
    return t


def add_inputs(p: argparse.ArgumentParser) -> None:
    """The arguments of a long run against a server process (this one and bench-memory's): the model repository,
    the synthetic clips, the sample images and where the results go."""
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--synthetic", type=Path, default=Path(".cache/synthetic/motion/CASME2_RAW"))
    p.add_argument("--images", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def inputs(a: argparse.Namespace, work_name: str) -> tuple[list[Path], Path]:
    """The sample images (``--images``, or ../shared's) and a work directory under ``--out`` without the last
    run's audit log and gallery; exits saying what is missing."""
    paths = a.images or sorted(Path("../shared/samples/liveness").glob("*.jpg"))
    if not paths or not a.synthetic.is_dir():
        raise SystemExit("needs the sample images (--images) and the synthetic clips (make identify-models)")
    work = a.out / work_name
    work.mkdir(parents=True, exist_ok=True)
    for old in (*work.glob("audit.jsonl*"), *work.glob("gallery.sqlite*")):
        old.unlink()
    return paths, work


def settings(work: Path, token: str, limited: str, rate_per_s: float, server: Sequence[str] = ()) -> Path:
    """The server's settings file; ``server``: more ``[server]`` lines (``key = value``, as TOML)."""
    config = work / "soak.toml"
    config.write_text(
        f'[server]\ngallery_path = "{work / "gallery.sqlite"}"\n' + "".join(f"{line}\n" for line in server) +
        f'[audit]\npath = "{work / "audit.jsonl"}"\nmax_bytes = 4194304\nbackups = 2\n'
        f'[[auth.callers]]\nname = "soak"\nscopes = ["liveness", "identify", "enrol", "operator"]\n'
        f'token_hashes = ["{hash_token(token)}"]\n'
        f'[[auth.callers]]\nname = "limited"\nscopes = ["liveness"]\ntoken_hashes = ["{hash_token(limited)}"]\n'
        f"rate_per_s = {rate_per_s}\nburst = {max(1, int(rate_per_s))}\n")
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_inputs(p)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=0.25, help="share of the run left out of the growth fit")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=5.0, help="the limited caller's rate_per_s")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--stem", default="soak", help="name of the result files")
    p.add_argument("--kinds", nargs="+", choices=list(MIX), default=[],
                   help="send only these kinds of call (to find which one makes something grow)")
    a = p.parse_args(argv)
    if not 0 < a.duration <= 24 * 3600 or not 1 <= a.concurrency <= 64 or not 0 <= a.warmup < 1:
        p.error("--duration in (0, 86400], --concurrency in [1, 64], --warmup in [0, 1)")
    paths, work = inputs(a, f"{a.stem}-work")
    token, limited = new_token(), new_token()
    config = settings(work, token, limited, a.rate)

    images = [q.read_bytes() for q in paths]

    async def run(address: str, pid: int, grouped: bool) -> dict[str, Any]:
        t = await prepare(address, token, limited, images, clip_folders(a.synthetic), work)
        try:
            res = await soak(t, pid, a.duration, a.concurrency, a.sample_s, a.seed, work / "audit.jsonl",
                             tuple(a.kinds), metrics_port, grouped)
            # ... and the server still answers, correctly.
            code, _, resp = await _status(t.live.CheckLiveness(liveness_pb2.CheckLivenessRequest(
                image=common_pb2.Image(data=t.images[0])), metadata=_md(t.token), timeout=30))
            res["answers_after"] = code == Code.OK and _answer(resp) == t.reference.get("image 0", _answer(resp))
            res["corpus_cases"] = len(t.corpus)
            return res
        finally:
            await t.channel.close()

    metrics_port = free_port()  # (the heap counts are read from the server's metrics)
    with (limited_group(pod_limit_bytes() or 1 << 62, "facegate-soak") as group,
          facegate_process(a.repository, ["--config", str(config), "--workers", str(a.workers),
                                          "--metrics-port", str(metrics_port)], work / "server.log", group)
          as (address, proc)):
        result = asyncio.run(run(address, proc.pid, group is not None))
    result.update({"machine": machine_info(), "duration_s": a.duration, "concurrency": a.concurrency,
                   "workers": a.workers, "warmup": a.warmup,
                   "mix": {k: w for k, (w, _) in MIX.items() if not a.kinds or k in a.kinds},
                   "growth": summarize_samples(result["samples"], a.warmup)})
    write_report(a.out, a.stem, result, markdown)
    print(markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
