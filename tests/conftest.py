"""Shared fixtures: the real weights and model repository (required in CI), and a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SAMPLES = SHARED / "samples" / "liveness"

# Reference results of the upstream pipeline (the weights folder's README, e.g. ../shared/models/README.md).
REFERENCE = {
    "image_F1.jpg": ("SPOOF", 0.072, (178, 136, 223, 225), 0.9924),
    "image_F2.jpg": ("SPOOF", 0.18, (120, 252, 252, 256), 0.9913),
    "image_T1.jpg": ("LIVE", 0.9936, (106, 147, 207, 213), 0.9842),
}


def run_together(script: str, *args: str, copies: int = 2, timeout_s: float = 600) -> list[str]:
    """Start ``copies`` Python processes running ``script`` with ``args`` at once, as workers or replicas starting
    together on one repository do; each one's stdout, once all have exited with status 0."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for _ in range(copies)]
    outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * copies
    return outputs


def wait_until(ok: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    """Whether ``ok()`` comes true within ``timeout_s`` (asked every 0.1 s): for what a server does a moment later."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if ok():
            return True
        time.sleep(0.1)
    return ok()


Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted label pairs)


def scrape(port: int) -> dict[Sample, float]:
    """Every sample on /metrics at 127.0.0.1:``port``, read as a scraper reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    from benchmarks.server_process import metrics_text

    text = metrics_text(port)
    assert text is not None, f"nothing answers on metrics port {port}"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def promtool() -> str:
    """Debian's promtool, unpacked by `make test` (k8s-deps) without installing the Prometheus server."""
    for candidate in (ROOT / ".cache" / "prometheus" / "usr" / "bin" / "promtool", shutil.which("promtool")):
        if candidate is not None and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("promtool is not there (make test unpacks Debian's prometheus package into .cache/prometheus)")


def image_python(folder: Path) -> str:
    """A ``python3`` in ``folder`` that runs this interpreter, as the image's entrypoint calls it; the PATH to use."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (folder / "python3").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def start_entrypoint(work: Path, env: dict[str, str], until: str = "models warm; SERVING"
                     ) -> tuple[subprocess.Popen[str], str]:
    """Run docker/entrypoint.sh in ``work`` (the image's WORKDIR) until its stderr says ``until`` or ends; the
    process (still running: the caller stops it) and its stderr up to then."""
    proc = subprocess.Popen(["bash", str(ROOT / "docker" / "entrypoint.sh")], cwd=work, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stderr is not None
    for _ in range(5000):
        line = proc.stderr.readline()
        lines.append(line)
        if until in line or not line:
            break
    return proc, "".join(lines)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the request lines would fill the test output
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``folder`` (a weights mirror); its base URL."""
    handler = functools.partial(_QuietFiles, directory=str(folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        finally:
            httpd.shutdown()
            thread.join(10)


def _need(what: str) -> None:
    """Tests that need real weights fail loudly in CI (CI=true) and skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing in CI: run `make models` with FACEGATE_WEIGHTS_DIR set", pytrace=False)
    pytest.skip(f"{what} is missing (run `make models` with FACEGATE_WEIGHTS_DIR set)")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    d = Path(os.environ.get("FACEGATE_WEIGHTS_DIR") or SHARED / "models")
    if not (d / "silent-face" / "deploy.prototxt").is_file():
        _need(f"the weights directory {d}")
    return d


@pytest.fixture(scope="session")
def repository_dir() -> Path:
    d = Path(os.environ.get("FACEGATE_MODEL_REPOSITORY") or ROOT / "model_repository")
    if not (d / "retinaface" / "metadata.json").is_file():
        _need(f"the prepared model repository {d}")
    return d


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "image_F1.jpg").is_file():
        _need(f"the sample images in {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="session")
def trained(repository_dir: Path) -> dict[str, Any]:
    """The trained ensemble's evaluation report (``make identify-models``), with where its synthetic clips are."""
    import json

    reports = sorted((repository_dir / "reports").glob("*.json"))
    if not reports or not (repository_dir / "ensembles").is_dir():
        _need(f"a trained identification ensemble in {repository_dir} (make identify-models)")
    report: dict[str, Any] = json.loads(reports[0].read_text())
    synth = Path(os.environ.get("FACEGATE_SYNTHETIC_DIR") or ROOT / ".cache" / "synthetic" / "motion")
    if not (synth / "CASME2-coding.csv").is_file():
        _need(f"the synthetic clips in {synth} (make identify-models)")
    report["synthetic_dir"] = synth
    return report


def clip_dir(report: dict[str, Any], key: str) -> Path:
    """The folder of frames of a clip the report names (``casme2/subNN/EPxx_yy``)."""
    _, subject, clip = key.split("/")
    return Path(report["synthetic_dir"]) / "CASME2_RAW" / subject / clip


@dataclass
class RunningServer:
    address: str
    server: object  # server.app.FacegateServer
    loop: asyncio.AbstractEventLoop

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 << 20)])


@functools.cache
def _audit_root() -> str:
    """One directory for the test servers' audit logs, removed when the run ends."""
    root = tempfile.mkdtemp(prefix="facegate-audit-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def start_server(repository: Path, **overrides: Any) -> tuple[RunningServer, threading.Thread]:
    """Start a FacegateServer on an event loop in a background thread; return once it is SERVING."""
    from server.app import FacegateServer
    from server.audit import AuditConfig
    from server.config import ServerConfig

    audit_dir = tempfile.mkdtemp(prefix="server-", dir=_audit_root())
    overrides.setdefault("audit", AuditConfig(path=Path(audit_dir) / "audit.jsonl"))
    overrides.setdefault("metrics_port", 0)  # several test servers share this process: metrics only when asked
    # The server shares this process with the test's clients: lowering "every other thread" would lower those too,
    # for good (raising a nice value back needs privilege). Subprocess servers test the priorities.
    overrides.setdefault("compute_nice", 0)
    config = replace(ServerConfig(port=0, model_repository=repository, drain_grace_s=1.0), **overrides)
    loop = asyncio.new_event_loop()
    holder: list[FacegateServer] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            try:
                srv = FacegateServer(config)  # grpc.aio objects bind to the loop they are made on
                holder.append(srv)
                await srv.start()
                await srv.load()
            except BaseException as exc:  # surfaced to the test thread
                failure.append(exc)
                raise
            finally:
                ready.set()

        loop.run_until_complete(main())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(120)
    if failure:
        raise failure[0]
    srv = holder[0]
    return RunningServer(f"127.0.0.1:{srv.port}", srv, loop), thread


def stop_server(running: RunningServer, thread: threading.Thread) -> None:
    fut = asyncio.run_coroutine_threadsafe(running.server.stop(0.5, 0), running.loop)  # type: ignore[attr-defined]
    fut.result(30)
    running.loop.call_soon_threadsafe(running.loop.stop)
    thread.join(30)


@pytest.fixture(scope="session")
def live_server(repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    gallery = tmp_path_factory.mktemp("live-gallery") / "gallery.sqlite"
    running, thread = start_server(repository_dir, gallery_path=gallery)
    yield running
    stop_server(running, thread)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL for the session (benchmarks/pg_cluster.py)."""
    from benchmarks.pg_cluster import PgCluster

    cluster = PgCluster()
    yield cluster
    cluster.remove()


# Lines for the end of the test output (e.g. each real TensorRT-RTX engine built, with its size and build time).
ENGINE_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ENGINE_LINES:
        terminalreporter.section("engines built")
        for line in ENGINE_LINES:
            terminalreporter.write_line(line)
