"""The server as a user runs it: a separate process, the command-line client, and draining on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.server_process import free_port, wait_serving
from facegate.v1 import common_pb2, liveness_pb2, liveness_pb2_grpc
from tests.conftest import ROOT

pytestmark = [pytest.mark.weights, pytest.mark.slow]


@pytest.fixture
def server_process(repository_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--model-repository", str(repository_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address)
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_cli_prints_one_line_per_image(server_process, samples: Path) -> None:  # type: ignore[no-untyped-def]
    _, address = server_process
    images = [samples / n for n in ("image_F1.jpg", "image_F2.jpg", "image_T1.jpg")]
    out = subprocess.run(
        [sys.executable, "-m", "facegate_client.cli", "--target", address, *map(str, images)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    assert len(out) == 3
    decision, score = out[0].split("\t")[1:3]
    # The upstream reference 0.0723, within the 0.01 every reference test allows (bf16 classifiers give 0.068).
    assert decision == "SPOOF" and abs(float(score.removeprefix("live_score=")) - 0.0723) <= 0.01
    assert out[1].split("\t")[1] == "SPOOF" and out[2].split("\t")[1] == "LIVE"


def test_compute_threads_yield_to_the_event_loop(server_process) -> None:  # type: ignore[no-untyped-def]
    """The loop that admits and sheds calls, and gRPC's I/O threads, keep nice 0; inference and decoding threads
    (the runtimes' own pools included) run at compute_nice (19)."""
    proc, _ = server_process
    nice: dict[str, list[int]] = {}
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        nice.setdefault(comm, []).append(int(fields[16]))  # field 19 of stat, counted after "(comm)"
    main = int((Path(f"/proc/{proc.pid}/task/{proc.pid}/stat")).read_text().rsplit(")", 1)[1].split()[16])
    assert main == 0  # the event loop runs on the main thread
    # ... and grpc.aio's poller, a Python thread too (its OS name is the interpreter's), hands it every completion.
    python_at_0 = [v for comm, vs in nice.items() if comm.startswith("python") for v in vs if v == 0]
    assert len(python_at_0) >= 2, nice
    assert all(v == 0 for comm, vs in nice.items() if comm.startswith("event_engine") for v in vs)
    lowered = [v for comm, vs in nice.items() for v in vs if v == 19]
    assert len(lowered) >= 4, nice  # engine threads, the CPU pool, the runtimes' pools


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinity and at least 2 CPUs")
def test_compute_threads_are_spread_over_the_cpus_one_each(server_process) -> None:  # type: ignore[no-untyped-def]
    """Engine threads (warmed up, so started) each run on one CPU, together on more than one; the event loop and
    gRPC's I/O threads keep every CPU the process may use (server/placement.py)."""
    proc, _ = server_process
    every = len(os.sched_getaffinity(proc.pid))
    cpus: dict[int, set[int]] = {}
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        cpus[int(task.name)] = os.sched_getaffinity(int(task.name))
    placed = [s for s in cpus.values() if len(s) == 1]
    assert len(cpus[proc.pid]) == every  # the event loop
    assert len(placed) >= 4, cpus  # RetinaFace's two instances and the two classifiers at least
    assert len(set().union(*placed)) >= 2, cpus
    assert len(placed) < len(cpus), cpus  # gRPC's and the runtimes' own threads are not placed


def test_sigterm_drains_in_flight_requests_then_exits(server_process, samples: Path) -> None:  # type: ignore[no-untyped-def]
    proc, address = server_process
    stub = liveness_pb2_grpc.LivenessServiceStub(grpc.insecure_channel(address))
    req = liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=(samples / "image_T1.jpg").read_bytes()))
    calls = 100
    in_flight = [stub.CheckLiveness.future(req, timeout=30) for _ in range(calls)]
    # SIGTERM once the server is answering, while most calls are still queued or running. A fixed pause does not
    # fit every host: on an AMX Xeon 40 calls had all been answered 0.2 s after they were sent. 100 calls take
    # 0.3 s where CheckLiveness runs at ~300/s and a few seconds on a slow host, inside the 10 s grace; any not yet
    # received are inside the 1 s the server goes on accepting (drain_delay_s).
    started = time.monotonic()
    while not any(f.done() for f in in_flight):
        assert time.monotonic() - started < 30, "no call was answered"
        time.sleep(0.001)
    assert sum(f.done() for f in in_flight) < calls
    proc.send_signal(signal.SIGTERM)
    assert [f.result().decision for f in in_flight] == [liveness_pb2.DECISION_LIVE] * calls
    assert proc.wait(30) == 0
    with pytest.raises(grpc.RpcError) as info:  # and nothing is accepted after the drain
        stub.CheckLiveness(req, timeout=2)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    log = proc.stdout.read() if proc.stdout else ""
    assert "draining" in log and "stopped" in log
