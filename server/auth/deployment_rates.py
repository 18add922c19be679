"""Each caller's ``rate_per_s`` held for a whole deployment of replicas ([auth] ``rate_scope = "deployment"``).

Replicas behind a load balancer each count a caller's calls in a bucket of their own, so a caller whose calls are
spread over N replicas could start N times its rate. Here the replicas tell one another, through the PostgreSQL
database their gallery already shares, how much of each caller's rate they are asked for: every ``rate_sync_s``
each process writes the cost a second it was asked for per caller (admitted or not) and reads the others'. Each
replica then refills a caller's bucket at its share of the rate (``share``): what it is asked for plus an equal
part of what nobody asks for, or, when the asks add up to more than the rate, a max-min fair share (water
filling), so a replica that sees a few of the caller's calls keeps them and the busy ones split the rest.

Shares follow what replicas are *asked*, not what they admitted: splitting by what the others used would swing
between all and nothing (each replica granting what the others were refused the interval before), while the asks
do not depend on the shares.

No call waits on the database: the asks are exchanged in the background, and a call reads the share last worked
out. So the deployment's rate holds within a sync interval or two of a change of load, each replica keeps its own
``burst`` (after a quiet spell a caller may start N bursts at once), and ``max_in_flight`` stays per replica (it
protects one replica's capacity). If the database cannot be reached for ``STALE_SYNCS`` intervals, each replica
holds the whole rate again (the per-replica behaviour), says so once in its log, and takes its share again at the
next sync that succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any

from engines.errors import RateLimitedError
from server.admission import CallerAdmission

STALE_SYNCS = 3  # intervals after which a replica's asks (and this replica's shares) no longer count
REPLICA_ENV = "FACEGATE_REPLICA_ID"  # one id for a server's workers (they share one bucket per caller)
_LOCK_KEY = 7022  # pg_advisory_xact_lock key: replicas starting together create the table one at a time
log = logging.getLogger("facegate.admission")


def replica_id() -> str:
    """This server's id among the replicas: the supervisor's for its workers, else the host and a random part."""
    return os.environ.get(REPLICA_ENV) or f"{socket.gethostname()}/{uuid.uuid4().hex[:12]}"


def share(rate: float, asks: Mapping[str, float], me: str) -> float:
    """The part of ``rate`` that replica ``me`` may refill at, given what each replica is asked for a second
    (``me`` counts even when absent: its calls may just be starting).

    Under the rate, every replica gets its ask plus an equal part of what is left; over it, the max-min fair share
    (a replica asking less than an equal part keeps its ask, the others split what remains equally). Never below a
    quarter of an equal part, so that a replica whose first calls are refused before its asks are known says to
    retry after a time of the order of a sync interval, not of the whole bucket at a rate near zero."""
    wants = {**asks, me: max(0.0, asks.get(me, 0.0))}
    n, total = len(wants), sum(wants.values())
    floor = rate / (4 * n)
    if total <= rate:
        return max(floor, wants[me] + (rate - total) / n)
    left, level = rate, 0.0
    ordered = sorted(wants.values())
    for i, want in enumerate(ordered):
        if want * (n - i) > left:
            level = left / (n - i)
            break
        left -= want
    else:  # (unreachable: the asks add up to more than the rate)
        level = ordered[-1]
    return max(floor, min(wants[me], level))


class DeploymentRates:
    """The asks of this process, the shares last worked out, and the sync that exchanges them (``run``)."""

    def __init__(self, url: str, sync_s: float, replica: str, worker: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 on_sync: Callable[[str], None] | None = None) -> None:
        self._url = url
        self.sync_s = sync_s
        self.replica = replica
        self._worker = worker
        self._clock = clock
        self._on_sync = on_sync or (lambda _: None)
        self._asked: dict[str, float] = {}  # caller -> cost asked since the last sync
        self._rates: dict[str, float] = {}  # caller -> its rate_per_s as last seen (shares are worked out for it)
        self._fractions: dict[str, float] = {}  # caller -> this replica's share / its rate, from the last sync
        self._synced_at = -math.inf  # (monotonic) the last sync that succeeded
        self._counted_at = clock()
        self._failing = False
        self._conn: Any = None  # one connection, made (again) by a sync in its thread when there is none

    def rate(self, caller: str, rate_per_s: float, cost: float) -> float:
        """The rate ``caller``'s bucket refills at here for a call asking ``cost`` (counted as asked): its share of
        ``rate_per_s``, or all of it while the shares are stale. From the event loop only."""
        self._asked[caller] = self._asked.get(caller, 0.0) + cost
        self._rates[caller] = rate_per_s
        return rate_per_s * self.fraction(caller)

    def fraction(self, caller: str) -> float:
        """The part of ``caller``'s rate in force here: its share from the last sync, or 1 while that is stale."""
        fresh = self._clock() - self._synced_at <= STALE_SYNCS * self.sync_s
        return self._fractions.get(caller, 1.0) if fresh else 1.0

    @property
    def callers(self) -> list[str]:
        """The callers with a rate seen here (each has a share once a sync has run)."""
        return list(self._rates)

    def _take_asks(self) -> tuple[dict[str, float], dict[str, float]]:
        """(From the event loop) each caller's asks a second since the last call, and the callers' rates.

        Not smoothed over syncs: a replica that a caller has left must stop counting at the next sync, or the one
        it moved to stays held to part of the rate (halving the asks at each sync, a caller moved to one replica
        got 7 of its 10 calls a second there over the next 10 s, measured)."""
        now = self._clock()
        elapsed, self._counted_at = max(1e-3, now - self._counted_at), now
        asked, self._asked = self._asked, {}
        return {c: cost / elapsed for c, cost in asked.items() if cost > 0}, dict(self._rates)

    def _connection(self) -> Any:
        """The connection (autocommit), made with the table if there is none. A plain connection, not a pool:
        one sync at a time uses it, and after an outage the next sync connects at once (a pool's reconnection
        backs off, which kept the shares off for 8 s after the database was back, measured)."""
        if self._conn is None:
            import psycopg

            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=max(2, round(self.sync_s)))
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    conn.execute("CREATE TABLE IF NOT EXISTS facegate_caller_asks (replica TEXT NOT NULL, worker "
                                 "INTEGER NOT NULL, caller TEXT NOT NULL, asked_per_s DOUBLE PRECISION NOT NULL, "
                                 "updated TIMESTAMPTZ NOT NULL, PRIMARY KEY (replica, worker, caller))")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _exchange(self, wants: dict[str, float], callers: list[str]) -> dict[str, dict[str, float]]:
        """(In a thread) this process's asks written, its rows of quiet callers removed, and every fresh row of
        ``callers`` read: caller -> replica -> asks a second. Any failure drops the connection."""
        names, values = list(wants), [wants[c] for c in wants]
        stale = STALE_SYNCS * self.sync_s
        try:
            conn = self._connection()
            with conn.transaction():
                conn.execute("INSERT INTO facegate_caller_asks SELECT %s, %s, c, a, now() FROM unnest(%s::text[], "
                             "%s::float8[]) AS x(c, a) ON CONFLICT (replica, worker, caller) DO UPDATE SET "
                             "asked_per_s = EXCLUDED.asked_per_s, updated = EXCLUDED.updated",
                             (self.replica, self._worker, names, values))
                conn.execute("DELETE FROM facegate_caller_asks WHERE (replica = %s AND worker = %s AND NOT caller = "
                             "ANY(%s::text[])) OR updated < now() - make_interval(secs => %s)",
                             (self.replica, self._worker, names, max(60.0, 10 * stale)))
                rows = conn.execute("SELECT caller, replica, sum(asked_per_s) FROM facegate_caller_asks WHERE "
                                    "caller = ANY(%s::text[]) AND updated > now() - make_interval(secs => %s) "
                                    "GROUP BY caller, replica", (callers, stale)).fetchall()
        except BaseException:
            self._drop()
            raise
        out: dict[str, dict[str, float]] = {}
        for caller, replica, asked in rows:
            out.setdefault(caller, {})[replica] = float(asked)
        return out

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def sync(self, executor: Executor | None = None) -> bool:
        """One exchange with the other replicas; the shares then follow it. False (and the shares left to go
        stale) when the database could not be reached."""
        wants, rates = self._take_asks()
        if not rates:  # no caller with a rate has called: nothing to share, and no connection held for it
            self._synced_at = self._clock()
            return True
        try:
            asks = await asyncio.get_running_loop().run_in_executor(executor, self._exchange, wants, list(rates))
        except Exception as exc:  # the database: the shares go stale and the whole rate applies
            if not self._failing:
                self._failing = True
                log.warning("deployment rates: the database is unreachable (%s: %s); each replica holds callers to "
                            "their whole rate_per_s until it is back", type(exc).__name__, exc)
            self._on_sync("failed")
            return False
        self._fractions = {caller: share(rate, asks.get(caller, {}), self.replica) / rate
                           for caller, rate in rates.items() if rate > 0}
        self._synced_at = self._clock()
        if self._failing:
            self._failing = False
            log.info("deployment rates: the database is back; callers' rates are shared again")
        self._on_sync("ok")
        return True

    async def run(self, executor: Executor | None = None) -> None:
        """Syncs every ``sync_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.sync_s)
            await self.sync(executor)

    def close(self) -> None:
        """(In a thread) this process's rows removed, so the others stop counting its asks at once, and the
        connection closed."""
        if self._conn is None:
            return
        try:
            self._conn.execute("DELETE FROM facegate_caller_asks WHERE replica = %s AND worker = %s",
                               (self.replica, self._worker))
        except Exception as exc:  # (they go stale by themselves)
            log.info("deployment rates: rows left to go stale (%s)", type(exc).__name__)
        finally:
            self._drop()


class DeploymentShare:
    """A ``CallerAdmission`` whose rates are this replica's shares: ``inner`` counts the calls, with its bucket
    refilled at the share ``rates`` says (``share`` given here is ignored: the share is this class's to set)."""

    def __init__(self, inner: CallerAdmission, rates: DeploymentRates) -> None:
        self._inner = inner
        self._rates = rates

    def hold(self, caller: str, limit: int) -> AbstractContextManager[None]:
        return self._inner.hold(caller, limit)

    def take(self, caller: str, rate_per_s: float, burst: int, cost: float = 1.0, only_check: bool = False,
             share: float | None = None) -> None:
        if rate_per_s <= 0 or cost <= 0:
            return
        # (A call checked for one unit now is charged, and counted as asked, in full once its request is parsed;
        # only a refusal of that check counts now.)
        share = self._rates.rate(caller, rate_per_s, 0.0 if only_check else cost) / rate_per_s
        try:
            self._inner.take(caller, rate_per_s, burst, cost, only_check, share)
        except RateLimitedError:
            if only_check:
                self._rates.rate(caller, rate_per_s, cost)
            raise

