"""Start a facegate server in its own process for a benchmark, and stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from benchmarks.memory_group import run_in
from server.memory_limit import MemoryGroup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int, tries: int = 50) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that are all free now, for a server that takes a
    block of them (Triton: gRPC, HTTP and metrics). Another process may still take one before the server binds
    it, so a caller retries a start that fails."""
    for _ in range(tries):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        with ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise OSError(f"no {count} consecutive free ports on 127.0.0.1 in {tries} tries")


def wait_serving(address: str, timeout_s: float = 120) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} did not become SERVING within {timeout_s}s")


def metrics_text(port: int) -> str | None:
    """The /metrics page on 127.0.0.1:``port``, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def metric_samples(port: int, names: Collection[str]) -> list[Sample]:
    """The samples of the series ``names`` on the /metrics page on 127.0.0.1:``port`` (none while nothing answers)."""
    text = metrics_text(port) or ""
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name in names]


def wait_for_metrics(port: int, timeout_s: float = 180) -> None:
    """Until a /metrics page answers on ``port``: a worker after the first listens only once its models are warm,
    and its metrics port opens then."""
    deadline = time.monotonic() + timeout_s
    while metrics_text(port) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no /metrics on port {port} within {timeout_s}s")
        time.sleep(0.5)


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (the workers of a server started with --workers): those each of its
    threads started, from /proc (no ``ps`` run at each sample)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # (ended meanwhile)
        return []
    out: list[int] = []
    for task in tasks:
        with suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it: its children, theirs, and so on (a server's video workers are its
    forkserver's children)."""
    out, i = [pid], 0
    while i < len(out):
        out += children_of(out[i])
        i += 1
    return out


def process_tree_usage(pid: int) -> dict[str, int]:
    """Resident memory (bytes), threads and open descriptors of ``pid`` and its children (a server's workers)."""
    rss = threads = fds = 0
    for p in (pid, *children_of(pid)):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except FileNotFoundError:  # a worker may end between the listing and here
            continue
        fields = {ln.split(":")[0]: ln.split()[1] for ln in status if ":" in ln and len(ln.split()) > 1}
        rss += int(fields.get("VmRSS", 0)) * 1024
        threads += int(fields.get("Threads", 0))
    return {"rss": rss, "threads": threads, "fds": fds}


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM (servers drain on it), then SIGKILL if the process outlives the timeout."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def facegate_server(repository: Path, extra_args: list[str] | None = None,
                    log_path: Path | None = None) -> Iterator[str]:
    """Yield the address of a SERVING facegate server on 127.0.0.1; SIGTERM it afterwards."""
    with facegate_process(repository, extra_args, log_path) as (address, _):
        yield address


@contextmanager
def facegate_process(repository: Path, extra_args: list[str] | None = None, log_path: Path | None = None,
                     group: MemoryGroup | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like ``facegate_server``, also yielding the process (for its pid: memory, signals); run in the memory
    control ``group`` when one is given."""
    port = free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(run_in(group, [
        sys.executable, "-m", "server", "--port", str(port), "--model-repository", str(repository),
        "--log-level", "WARNING",
        # Several servers may run at once here: metrics only where the caller asks for a port.
        *([] if "--metrics-port" in (extra_args or []) else ["--metrics-port", "0"]), *(extra_args or [])]),
        stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address)
        yield address, proc
    finally:
        terminate(proc)
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
