"""Several workers on one port (``--workers``): both serve, a caller's own rate holds for the set (not for each
worker), a signal drains them all (SIGHUP reaches each), and a worker that dies takes the set down (so the
orchestrator restarts it) instead of leaving a server at half its capacity."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.server_process import children_of, free_port, metrics_text, wait_for_metrics, wait_serving
from facegate.v1 import liveness_pb2, liveness_pb2_grpc, models_pb2, models_pb2_grpc
from server.auth.tokens import hash_token, new_token
from server.workers import for_worker
from tests.conftest import ROOT, scrape, wait_until

pytestmark = [pytest.mark.weights, pytest.mark.slow]
TOKENS = {"lister": new_token(), "paced": new_token()}
# "paced" may start 3 calls, then one every 1,000 s.
CALLERS = f"""
[[auth.callers]]
name = "lister"
scopes = ["operator"]
token_hashes = ["{hash_token(TOKENS['lister'])}"]

[[auth.callers]]
name = "paced"
scopes = ["liveness"]
token_hashes = ["{hash_token(TOKENS['paced'])}"]
rate_per_s = 0.001
burst = 3
"""


def as_caller(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def calls(metrics_port: int, method: str, caller: str) -> float:
    """The calls of ``method`` one worker counted under ``caller``, whatever their status."""
    return sum(value for (name, pairs), value in scrape(metrics_port).items() if name == "facegate_requests_total"
               and (labels := dict(pairs))["method"].endswith(f"/{method}") and labels["caller"] == caller)


@pytest.fixture
def workers(repository_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, int, Path]]:
    port, metrics = free_port(), free_port()
    while metrics + 1 == port:  # worker 1 serves metrics on metrics + 1
        metrics = free_port()
    audit = tmp_path / "audit.jsonl"
    (tmp_path / "callers.toml").write_text(CALLERS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--model-repository", str(repository_dir),
         "--config", str(tmp_path / "callers.toml"), "--workers", "2", "--metrics-port", str(metrics),
         "--audit-log", str(audit), "--log-level", "WARNING"],
        # (TMPDIR: the supervisor's table of callers, left behind if the test kills it, goes with tmp_path)
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address)
        wait_for_metrics(metrics + 1)  # the second worker listens once its models are warm
        assert proc.poll() is None
        yield proc, address, metrics, audit
    finally:
        kids = children_of(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_both_workers_serve_and_sigterm_stops_them_all(workers) -> None:  # type: ignore[no-untyped-def]
    proc, address, metrics, audit = workers
    kids = children_of(proc.pid)
    assert len(kids) == 2
    # Separate connections (a distinct channel argument each): the kernel spreads them over the two workers.
    for i in range(24):
        with grpc.insecure_channel(address, options=[("grpc.test_connection", i)]) as ch:
            models_pb2_grpc.ModelServiceStub(ch).ListModels(models_pb2.ListModelsRequest(), metadata=as_caller(
                "lister"), timeout=10)
    listed = [calls(metrics + i, "ListModels", "lister") for i in (0, 1)]
    assert sum(listed) == 24 and min(listed) > 0, listed  # chance of all 24 on one worker: 2**-23
    # The paced caller's 3 calls are 3 for the set: of 16 calls over 16 connections, 3 are admitted (empty
    # requests: INVALID_ARGUMENT) and 13 refused for its rate, though both workers took some of them.
    codes = []
    for i in range(16):
        with grpc.insecure_channel(address, options=[("grpc.test_connection", 100 + i)]) as ch:
            try:
                liveness_pb2_grpc.LivenessServiceStub(ch).CheckLiveness(
                    liveness_pb2.CheckLivenessRequest(), metadata=as_caller("paced"), timeout=10)
            except grpc.RpcError as err:
                codes.append(err.code())
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 3, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 13, codes

    def paced() -> list[float]:
        return [calls(metrics + i, "CheckLiveness", "paced") for i in (0, 1)]

    assert wait_until(lambda: sum(paced()) == 16)  # (a refused call is counted a moment after its answer)
    assert min(paced()) > 0, paced()  # chance of all 16 on one worker: 2**-15
    # SIGHUP to the supervisor reaches every worker (each reloads its credentials) and stops nothing.
    proc.send_signal(signal.SIGHUP)
    reloaded = 'facegate_credential_reloads_total{outcome="applied"} 1.0'
    assert wait_until(lambda: all(reloaded in (metrics_text(metrics + i) or "") for i in (0, 1)))
    assert proc.poll() is None and len(children_of(proc.pid)) == 2
    tables = list(audit.parent.glob("facegate-callers-*/table"))
    assert len(tables) == 1 and tables[0].stat().st_size == 131072
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not list(audit.parent.glob("facegate-callers-*"))  # removed with the set
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in kids)


def test_a_worker_that_dies_takes_the_set_down(workers) -> None:  # type: ignore[no-untyped-def]
    proc, _, _, _ = workers
    kids = children_of(proc.pid)
    os.kill(kids[1], signal.SIGKILL)
    assert proc.wait(60) != 0  # the orchestrator restarts the whole server
    time.sleep(0.5)
    assert not Path(f"/proc/{kids[0]}").exists() or "zombie" in Path(f"/proc/{kids[0]}/status").read_text()


def test_each_worker_has_its_own_metrics_port_and_audit_file(tmp_path: Path) -> None:
    from server.audit import AuditConfig
    from server.config import ServerConfig

    base = ServerConfig(port=50051, workers=3, metrics_port=8002, audit=AuditConfig(path=tmp_path / "a.jsonl"))
    first, third = for_worker(base, 0), for_worker(base, 2)
    assert (first.metrics_port, third.metrics_port) == (8002, 8004)
    assert (first.audit.path, third.audit.path) == (tmp_path / "a.jsonl", tmp_path / "a.w2.jsonl")
    with pytest.raises(ValueError, match="workers > 1 needs a fixed port"):
        ServerConfig(port=0, workers=2)


def test_the_memory_budgets_hold_for_the_set_of_workers() -> None:
    """Each of N workers gets 1/N of each memory budget, and never less than one largest request needs; one
    worker keeps the whole budgets."""
    from server.config import ServerConfig

    one = ServerConfig(port=50051)
    assert for_worker(one, 0).max_inflight_pixels == one.max_inflight_pixels == 250_000_000
    two = [for_worker(ServerConfig(port=50051, workers=2), i) for i in (0, 1)]
    assert all((w.max_inflight_pixels, w.max_inflight_request_bytes, w.max_inflight_infer_bytes)
               == (125_000_000, 128 << 20, 32 << 20) for w in two)
    # Three: a third of the pixels (83 MP) would refuse every largest clip (122.9 MP), so each holds one.
    three = for_worker(ServerConfig(port=50051, workers=3), 2)
    assert three.max_inflight_pixels == three.clip_limits.max_request_pixels == 122_880_000
    assert (three.max_inflight_request_bytes, three.max_inflight_infer_bytes) == ((256 << 20) // 3, (64 << 20) // 3)
