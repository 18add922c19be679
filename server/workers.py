"""Several serving processes on one port (``[server] workers``).

One Python process has one event loop, and under overload that loop is the limit: every call, refused or not,
costs it gRPC's own per-call work (~0.5-0.7 ms measured on the 2-core CI machine), so beyond ~1,000 calls a second
calls wait in gRPC's transport and are refused there as UNAVAILABLE instead of RESOURCE_EXHAUSTED. Workers bind the
same port with SO_REUSEPORT; the kernel spreads connections over them, and each refuses on its own loop.

The supervisor (the process started by the user) starts the workers and forwards SIGTERM/SIGINT to them, so each
drains as a single server does, and SIGHUP, so each reloads its credentials. If a worker exits on its own, the
supervisor stops the others and exits with an error: the orchestrator restarts the whole set rather than leaving a
server at a fraction of its capacity.

Each caller's own limits (``max_in_flight``, ``rate_per_s``) hold for the set, not for each worker: the supervisor
makes the table the workers count them in (``server.shared_admission``) and names it to them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, replace
from pathlib import Path
from types import FrameType

from server.auth.deployment_rates import REPLICA_ENV, replica_id
from server.config import ServerConfig
from server.memory_budgets import SETTING_NAMES, budget_floors, budget_settings
from server.shared_admission import create_table

WORKER_ENV = "FACEGATE_WORKER"
CALLER_TABLE_ENV = "FACEGATE_CALLER_TABLE"
log = logging.getLogger("facegate.workers")


def worker_index() -> int | None:
    """This process's index among the workers, or None in a single server or the supervisor."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def caller_table() -> Path | None:
    """The table of the callers' counts this worker shares with the others, or None outside a set of workers."""
    value = os.environ.get(CALLER_TABLE_ENV) if worker_index() is not None else None
    return Path(value) if value else None


def memory_budget_share(config: ServerConfig) -> ServerConfig:
    """Each worker's part of the memory budgets, which hold for the whole set: 1/workers of each, and at least
    what one largest request needs (the settings' own floors). Each worker held the whole budgets until
    2026-12-07: with two workers and load over several connections, the set reached the Deployment's 4 GiB limit
    and the kernel killed a video decoder (benchmarks/README.md, *Memory at the limits*)."""
    n = max(1, config.workers)
    pairs = zip(SETTING_NAMES, astuple(budget_settings(config)), astuple(budget_floors(config)), strict=True)
    return replace(config, **{name: max(value // n, floor) for name, value, floor in pairs})


def for_worker(config: ServerConfig, index: int) -> ServerConfig:
    """Worker ``index``'s own settings: its share of the memory budgets; metrics on metrics_port + index; and
    (past the first) its own audit file, since rotating one file from several processes would lose lines."""
    audit = config.audit
    if index > 0 and audit.path is not None:
        audit = replace(audit, path=audit.path.with_name(f"{audit.path.stem}.w{index}{audit.path.suffix}"))
    return replace(memory_budget_share(config), metrics_port=config.metrics_port + index if config.metrics_port
                   else 0, audit=audit)


def supervise(argv: list[str], config: ServerConfig) -> int:
    """Run ``config.workers`` copies of ``python -m server argv`` until a signal (forwarded to each), or until one
    exits by itself (the others are then stopped). Returns the exit status."""
    # In a directory of its own (mode 0700), removed when the set stops.
    table_dir = Path(tempfile.mkdtemp(prefix="facegate-callers-"))
    try:
        create_table(table_dir / "table")
        # (one replica id for the set: the workers share each caller's bucket, and so its share of the deployment's)
        env = {**os.environ, CALLER_TABLE_ENV: str(table_dir / "table"), REPLICA_ENV: replica_id()}
        return _run(argv, config, env)
    finally:
        shutil.rmtree(table_dir, ignore_errors=True)


def _run(argv: list[str], config: ServerConfig, env: dict[str, str]) -> int:
    """The workers, with ``env``, until a signal or until one of them exits by itself."""
    children = [subprocess.Popen([sys.executable, "-m", "server", *argv], env={**env, WORKER_ENV: str(i)})
                for i in range(config.workers)]
    log.info("%d workers on port %d (pids %s)", len(children), config.port, ", ".join(str(c.pid) for c in children))
    stopping = False

    def pass_on(signum: int, _frame: FrameType | None) -> None:  # SIGHUP: each worker reloads its credentials
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        pass_on(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, pass_on)
    while all(c.poll() is None for c in children):
        time.sleep(0.2)
    first = next(c for c in children if c.poll() is not None)
    failed = not stopping  # a worker ended without being asked to
    if failed:
        log.error("worker pid %d exited with status %s; stopping the others", first.pid, first.returncode)
        forward(signal.SIGTERM, None)
    deadline = time.monotonic() + config.drain_delay_s + config.drain_grace_s + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in time; killing it", child.pid)
            child.kill()
            child.wait()
    if failed:
        return first.returncode if first.returncode else 1
    return max((c.returncode for c in children if c.returncode and c.returncode > 0), default=0)
