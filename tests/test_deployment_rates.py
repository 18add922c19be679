"""A caller's rate held for a deployment of replicas ([auth] rate_scope = "deployment"): the shares on their own,
two processes' worth of shares exchanged through a real PostgreSQL on a stepped clock, the database going away,
and two server processes on one database answering a caller spread over both (and then pinned to one)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from benchmarks.server_process import free_port, terminate, wait_for_metrics, wait_serving
from engines.errors import RateLimitedError
from facegate.v1 import models_pb2, models_pb2_grpc
from server.admission import PerCaller
from server.auth.deployment_rates import DeploymentRates, DeploymentShare, share
from server.auth.tokens import hash_token, new_token
from server.config import load_config
from tests.conftest import ROOT, scrape, wait_until


def test_under_the_rate_each_replica_keeps_its_ask_and_an_equal_part_of_what_is_left() -> None:
    assert share(10.0, {"a": 3.0, "b": 1.0}, "a") == pytest.approx(6.0)
    assert share(10.0, {"a": 3.0, "b": 1.0}, "b") == pytest.approx(4.0)
    assert share(10.0, {"a": 3.0}, "b") == pytest.approx(3.5)  # b's calls are just starting: it counts
    assert share(10.0, {}, "a") == pytest.approx(10.0)  # alone


def test_over_the_rate_the_shares_are_max_min_fair_and_add_up_to_it() -> None:
    asks = {"a": 20.0, "b": 20.0}
    assert share(10.0, asks, "a") == share(10.0, asks, "b") == pytest.approx(5.0)
    asks = {"a": 2.0, "b": 30.0, "c": 30.0}  # a small ask is kept whole; the busy ones split the rest
    assert [share(10.0, asks, r) for r in "abc"] == pytest.approx([2.0, 4.0, 4.0])
    assert share(10.0, {"a": 50.0}, "a") == pytest.approx(10.0)  # pinned to one replica: all of it there
    # A replica that asks nothing while another is over the rate keeps a floor (a quarter of an equal part).
    assert share(10.0, {"a": 50.0}, "b") == pytest.approx(10.0 / 8)


# (Each test below has a caller of its own: the database counts rows fresh by its own clock, and the rows of the
# test before are still fresh for a few seconds.)
@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


def rates_on(url: str, replica: str, clock: list[float], outcomes: list[str] | None = None) -> DeploymentRates:
    return DeploymentRates(url, 1.0, replica, clock=lambda: clock[0],
                           on_sync=outcomes.append if outcomes is not None else None)


def ask(rates: DeploymentRates, caller: str, per_s: float, clock: list[float]) -> None:
    """``per_s`` calls of cost 1 from ``caller`` asked over the next second."""
    for _ in range(int(per_s)):
        rates.rate(caller, 10.0, 1.0)
    clock[0] += 1.0


@pytest.mark.weights
def test_two_replicas_split_a_callers_rate_through_postgresql_and_one_alone_gets_it_all(
        postgres: Any, clock: list[float]) -> None:
    a, b = rates_on(postgres.url, "replica-a", clock), rates_on(postgres.url, "replica-b", clock)
    try:
        for _ in range(3):  # both asked for 20 a second: each refills at 5
            ask(a, "desk", 20, clock)
            ask(b, "desk", 20, clock)
            assert asyncio.run(a.sync()) and asyncio.run(b.sync())
        assert a.rate("desk", 10.0, 0.0) == pytest.approx(5.0)
        assert b.rate("desk", 10.0, 0.0) == pytest.approx(5.0)
        assert a.rate("other", 10.0, 0.0) == 10.0  # another caller's rate is its own
        for _ in range(12):  # the caller's calls now go to a alone: b's asks fade, and a takes all of the rate
            ask(a, "desk", 20, clock)
            assert asyncio.run(a.sync()) and asyncio.run(b.sync())
        assert a.rate("desk", 10.0, 0.0) == pytest.approx(10.0, rel=0.01)
        # A reload's new rate applies at once, at the same share.
        assert a.rate("desk", 20.0, 0.0) == pytest.approx(20.0, rel=0.01)
        ask(b, "desk", 1, clock)  # (b quiet since: it kept no row; now one)
        assert asyncio.run(b.sync())
        a.close()  # a replica that stops takes its rows with it
        with psycopg.connect(postgres.url) as conn:
            rows = conn.execute("SELECT replica, count(*) FROM facegate_caller_asks WHERE replica LIKE 'replica-%' "
                                "GROUP BY replica").fetchall()
        assert dict(rows) == {"replica-b": 1}
    finally:
        a.close()
        b.close()


@pytest.mark.weights
def test_a_share_refills_the_callers_bucket_and_the_refusal_says_whose_rate_it_is(
        postgres: Any, clock: list[float]) -> None:
    a, b = rates_on(postgres.url, "bucket-a", clock), rates_on(postgres.url, "bucket-b", clock)
    admission = DeploymentShare(PerCaller(clock=lambda: clock[0]), a)
    try:
        for _ in range(3):
            ask(a, "desk-2", 20, clock)
            ask(b, "desk-2", 20, clock)
            assert asyncio.run(a.sync()) and asyncio.run(b.sync())
        admitted = 0
        for _ in range(25):  # 2.5 s at 10 tries a second: a full bucket of 4, then 5 a second (half of 10)
            try:
                admission.take("desk-2", 10.0, 4)
                admitted += 1
            except RateLimitedError as exc:
                assert ("over its share on this replica (5 a second now) of its rate_per_s = 10 for the "
                        "deployment (burst 4)") in str(exc)
                assert exc.retry_after_s is not None and 0 < exc.retry_after_s <= 0.2 + 1e-9
            clock[0] += 0.1
        assert 4 + 11 <= admitted <= 4 + 13  # (its whole rate would have admitted all 25)
    finally:
        a.close()
        b.close()


def test_an_unreachable_database_leaves_each_replica_the_whole_rate(tmp_path: Path, clock: list[float]) -> None:
    outcomes: list[str] = []
    rates = rates_on(f"postgresql://nobody@/facegate?host={tmp_path}", "lonely", clock, outcomes)
    assert asyncio.run(rates.sync()) and outcomes == []  # no caller with a rate yet: the database is not asked
    ask(rates, "desk", 20, clock)
    assert not asyncio.run(rates.sync())
    assert outcomes == ["failed"]
    assert rates.rate("desk", 10.0, 0.0) == 10.0


@pytest.mark.weights
def test_shares_go_stale_when_the_database_goes_away(postgres: Any, clock: list[float]) -> None:
    a, b = rates_on(postgres.url, "stale-a", clock), rates_on(postgres.url, "stale-b", clock)
    try:
        for _ in range(3):
            ask(a, "desk-3", 20, clock)
            ask(b, "desk-3", 20, clock)
            assert asyncio.run(a.sync()) and asyncio.run(b.sync())
        assert a.rate("desk-3", 10.0, 0.0) == pytest.approx(5.0)
        postgres.stop()
        try:
            clock[0] += 1.0
            assert not asyncio.run(a.sync())
            assert a.rate("desk-3", 10.0, 0.0) == pytest.approx(5.0)  # (one missed sync: the share holds)
            clock[0] += 2.5
            assert a.rate("desk-3", 10.0, 0.0) == 10.0  # 3 intervals without one: the whole rate
        finally:
            postgres.start()
        # Back: the pools reconnect (within a few syncs), and the rate is shared again.
        assert wait_until(lambda: asyncio.run(a.sync()) and asyncio.run(b.sync()), 20)
        for _ in range(4):
            ask(a, "desk-3", 20, clock)
            ask(b, "desk-3", 20, clock)
            assert asyncio.run(a.sync()) and asyncio.run(b.sync())
        assert a.rate("desk-3", 10.0, 0.0) == pytest.approx(5.0, rel=0.1)
    finally:
        a.close()
        b.close()


def test_deployment_scope_needs_a_postgresql_gallery_and_a_sane_interval(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[auth]\nrate_scope = "deployment"\n')
    with pytest.raises(ValueError, match="postgresql://"):
        load_config(config, gallery_url="sqlite:///x.sqlite")
    assert load_config(config, gallery_url="postgresql://u@h/db").shared_rates_url == "postgresql://u@h/db"
    for bad in ('rate_scope = "cluster"', "rate_sync_s = 0.0", "rate_sync_s = nan"):
        config.write_text(f"[auth]\n{bad}\n")
        with pytest.raises(ValueError, match=r"rate_scope|rate_sync_s"):
            load_config(config)


TOKEN = new_token()
CALLER = f"""
[auth]
rate_scope = "deployment"
rate_sync_s = 0.2

[[auth.callers]]
name = "lister"
scopes = ["operator"]
token_hashes = ["{hash_token(TOKEN)}"]
rate_per_s = 10
burst = 5
"""


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        terminate(proc)


@pytest.fixture(scope="module")
def two_replicas(repository_dir: Path, postgres: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[list[tuple[str, int]]]:
    folder = tmp_path_factory.mktemp("deployment-rates")
    (folder / "callers.toml").write_text(CALLER)
    with ExitStack() as stack:
        started = []
        for i in range(2):
            port, metrics = free_port(), free_port()
            log = stack.enter_context(open(folder / f"r{i}.log", "w"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "server", "--port", str(port), "--model-repository", str(repository_dir),
                 "--gallery-url", postgres.url, "--config", str(folder / "callers.toml"), "--metrics-port",
                 str(metrics), "--audit-log", str(folder / f"r{i}-audit.jsonl"), "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            stack.callback(stop, proc)
            started.append((f"127.0.0.1:{port}", metrics))
        for address, _ in started:
            wait_serving(address, 180)
        yield started


def admitted_over(stubs: list[models_pb2_grpc.ModelServiceStub], seconds: float, per_s: float = 100.0) -> int:
    """Calls sent at ``per_s``, taking turns over ``stubs``; how many were admitted."""
    admitted, start, n = 0, time.monotonic(), 0
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    while (now := time.monotonic()) - start < seconds:
        try:
            stubs[n % len(stubs)].ListModels(models_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
            admitted += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        n += 1
        time.sleep(max(0.0, start + n / per_s - now))
    return admitted


@pytest.mark.weights
@pytest.mark.slow
def test_two_servers_hold_a_caller_spread_over_both_to_one_rate(two_replicas: list[tuple[str, int]]) -> None:
    stubs = [models_pb2_grpc.ModelServiceStub(grpc.insecure_channel(a)) for a, _ in two_replicas]
    # 4 s over both at 100 a second: at rate 10 (burst 5 each) about 50; each on its own would admit about 90.
    spread = admitted_over(stubs, 4.0)
    assert 35 <= spread <= 65, spread
    # Then 4 s on the first alone: its share grows back to the whole rate (about 40; half would be about 20).
    pinned = admitted_over(stubs[:1], 4.0)
    assert 28 <= pinned <= 50, pinned
    shares = []
    for _, metrics in two_replicas:
        samples = scrape(metrics)
        synced = sum(v for (name, labels), v in samples.items()
                     if name == "facegate_deployment_rate_syncs_total" and dict(labels)["outcome"] == "ok")
        assert synced >= 10
        shares.append(samples[("facegate_caller_rate_share", (("caller", "lister"),))])
    # The first holds (about) all of the rate, the other the floor (a quarter of an equal part of two).
    assert shares[0] >= 0.9 and shares[1] == pytest.approx(0.125), shares


@pytest.mark.weights
@pytest.mark.slow
def test_the_workers_of_one_server_count_as_one_replica(repository_dir: Path, postgres: Any, tmp_path: Path) -> None:
    """``--workers 2``: both workers write their asks under the supervisor's one replica id, so the server holds
    the whole rate (a worker counted as a replica of its own would hold half of it)."""
    (tmp_path / "callers.toml").write_text(CALLER)
    port, metrics = free_port(), free_port()
    while metrics + 1 == port:  # worker 1 serves metrics on metrics + 1
        metrics = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--model-repository", str(repository_dir),
         "--gallery-url", postgres.url, "--config", str(tmp_path / "callers.toml"), "--workers", "2",
         "--metrics-port", str(metrics), "--audit-log", str(tmp_path / "audit.jsonl"), "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        wait_serving(f"127.0.0.1:{port}", 180)
        wait_for_metrics(metrics + 1)  # the second worker listens once its models are warm
        # Separate connections (a distinct channel argument each): the kernel spreads them over both workers.
        stubs = [models_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.test_connection", i)])) for i in range(8)]
        admitted = admitted_over(stubs, 4.0)
        with psycopg.connect(postgres.url) as conn:
            rows = conn.execute("SELECT replica, worker FROM facegate_caller_asks WHERE caller = 'lister' "
                                "ORDER BY worker").fetchall()
    finally:
        stop(proc)
    assert len({replica for replica, _ in rows}) == 1 and [w for _, w in rows] == [0, 1], rows
    assert 35 <= admitted <= 60, admitted  # the rate for 4 s and a burst: about 45; half the rate: about 25
