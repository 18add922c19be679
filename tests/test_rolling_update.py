"""A rolling update without failed calls: three replicas behind one round_robin channel under steady open-loop
load; each replaced in turn (SIGTERM, drain, a new process on the same port). The Python client's retry on
UNAVAILABLE plus the server's drain must give zero failed calls and zero wrong answers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.server_process import free_port, terminate, wait_serving
from facegate_client.client import FacegateClient, RetryPolicy
from tests.conftest import ROOT

pytestmark = [pytest.mark.weights, pytest.mark.slow]
RATE = 15.0  # calls per second, open loop
ROUND_ROBIN_WITH_HEALTH = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                      "healthCheckConfig": {"serviceName": ""}})


def spawn(repository: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--model-repository",
                             str(repository), "--log-level", "WARNING", "--metrics-port", "0"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)


def test_replacing_every_replica_under_load_fails_no_call(repository_dir: Path, samples: Path,
                                                          tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    procs = [spawn(repository_dir, p, tmp_path / f"r{i}.log") for i, p in enumerate(ports)]
    try:
        for p in ports:
            wait_serving(f"127.0.0.1:{p}", 180)
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        # round_robin with client-side health checking: a replica that turns NOT_SERVING (the start of its drain)
        # stops getting new calls within the drain delay, before it stops accepting them.
        client = FacegateClient(target, timeout_s=20, options=[("grpc.service_config", ROUND_ROBIN_WITH_HEALTH)],
                                retry=RetryPolicy(attempts=8, initial_backoff_s=0.05, max_backoff_s=1.0))
        image = (samples / "image_T1.jpg").read_bytes()
        expected = client.check_liveness(image).decision
        results: list[tuple[float, float, str]] = []  # (start, latency, outcome)
        stop = threading.Event()
        lock = threading.Lock()

        def one() -> None:
            t0 = time.monotonic()
            try:
                outcome = "ok" if client.check_liveness(image).decision == expected else "wrong"
            except Exception as exc:  # any failure counts
                outcome = f"failed: {type(exc).__name__} {getattr(exc, 'code', lambda: '')()}"
            with lock:
                results.append((t0, time.monotonic() - t0, outcome))

        def load() -> None:
            rng = np.random.default_rng(0)
            threads = []
            while not stop.is_set():
                t = threading.Thread(target=one)
                t.start()
                threads.append(t)
                time.sleep(float(rng.exponential(1 / RATE)))
            for t in threads:
                t.join(60)

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(5)
        replace_from = time.monotonic()
        for i, port in enumerate(ports):  # one at a time, as a Deployment with maxUnavailable 0 would
            terminate(procs[i], 60)  # SIGTERM: health NOT_SERVING, keep accepting 1 s, finish in-flight calls
            procs[i] = spawn(repository_dir, port, tmp_path / f"r{i}.log")
            wait_serving(f"127.0.0.1:{port}", 180)
        replace_until = time.monotonic()
        time.sleep(3)
        stop.set()
        loader.join(120)
        client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                terminate(proc)
    failed = [outcome for _, _, outcome in results if outcome != "ok"]
    before = [lat for start, lat, _ in results if start < replace_from]
    during = [lat for start, lat, _ in results if replace_from <= start < replace_until]
    p99 = {k: float(np.percentile(v, 99)) * 1e3 for k, v in (("before", before), ("during", during))}
    print(f"rolling update: {len(results)} calls ({len(during)} during the update), {len(failed)} failed; "
          f"p99 before {p99['before']:.0f} ms, during {p99['during']:.0f} ms")
    assert len(during) > 100
    assert failed == []
