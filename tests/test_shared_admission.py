"""Each caller's own limits held across workers (``server.shared_admission``): two views of one table count as one,
on a stepped clock; processes counting at once lose no update; a full table falls back to per-process limits."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.errors import RateLimitedError, ResourceExhaustedError
from server import shared_admission
from server.shared_admission import SLOT, SharedCallerState, create_table
from tests.conftest import ROOT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "table"
    create_table(path)
    return path


@pytest.fixture
def views(table: Path) -> Iterator[tuple[SharedCallerState, SharedCallerState, Clock]]:
    clock = Clock()
    a, b = SharedCallerState(table, clock), SharedCallerState(table, clock)
    yield a, b, clock
    a.close()
    b.close()


def admitted(take: object, *args: object) -> bool:
    try:
        take(*args)  # type: ignore[operator]
    except RateLimitedError:
        return False
    return True


def test_the_table_is_its_owners_alone(table: Path) -> None:
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    assert table.stat().st_size == SLOT.size * shared_admission.SLOTS


def test_a_callers_rate_is_one_bucket_whichever_worker_it_calls(views) -> None:  # type: ignore[no-untyped-def]
    a, b, clock = views
    # 2 a second, bursts of 3, alternating between the two workers: 3 admitted in all, not 3 on each.
    got = [admitted((a if i % 2 else b).take, "desk", 2.0, 3) for i in range(6)]
    assert got == [True, True, True, False, False, False]
    with pytest.raises(RateLimitedError) as err:
        a.take("desk", 2.0, 3)
    assert err.value.retry_after_s == pytest.approx(0.5)
    assert "caller 'desk' is over its rate_per_s = 2 (burst 3); retry in 0.50 s" in str(err.value)
    assert admitted(b.take, "other", 2.0, 3)  # another caller has its own bucket
    clock.now += 0.5  # one token back, taken on the other worker
    assert admitted(b.take, "desk", 2.0, 3) and not admitted(a.take, "desk", 2.0, 3)
    clock.now += 60.0  # a quiet minute refills to the burst and no further
    assert [admitted(a.take, "desk", 2.0, 3) for _ in range(4)] == [True, True, True, False]


def test_a_costly_call_takes_its_cost_on_any_worker(views) -> None:  # type: ignore[no-untyped-def]
    a, b, clock = views
    a.take("desk", 1.0, 5, 4.0)
    with pytest.raises(RateLimitedError, match="this call costs 4") as err:
        b.take("desk", 1.0, 5, 4.0)
    assert err.value.retry_after_s == pytest.approx(3.0)
    b.take("desk", 1.0, 5)  # the last token
    clock.now += 4.0
    b.take("desk", 1.0, 5, 4.0)


def test_a_check_for_one_unit_takes_nothing_on_any_worker(views) -> None:  # type: ignore[no-untyped-def]
    a, b, clock = views
    for view in (a, b, a):
        view.take("desk", 1.0, 3, 2.0, only_check=True)
    b.take("desk", 1.0, 3, 3.0)  # the whole bucket is still there
    with pytest.raises(RateLimitedError, match="this call costs 2") as err:
        a.take("desk", 1.0, 3, 2.0, only_check=True)
    assert err.value.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    a.take("desk", 1.0, 3, 2.0, only_check=True)
    b.take("desk", 1.0, 3, 2.0)


def test_a_callers_calls_in_flight_count_on_every_worker(views) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = views
    with a.hold("desk", 2), b.hold("desk", 2):
        for view in (a, b):
            with pytest.raises(ResourceExhaustedError, match="caller 'desk' has 2 calls in flight"), \
                    view.hold("desk", 2):
                pass
        with a.hold("other", 2):  # another caller is counted apart
            pass
    with a.hold("desk", 2), b.hold("desk", 2):  # both ended: the caller may have two again
        pass
    with a.hold("desk", 0), b.hold("desk", 0), a.hold("desk", 0):  # 0: no limit of its own
        pass


def test_a_full_table_falls_back_to_limits_per_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shared_admission, "SLOTS", 4)
    create_table(tmp_path / "small")
    clock = Clock()
    a, b = SharedCallerState(tmp_path / "small", clock), SharedCallerState(tmp_path / "small", clock)
    for i in range(4):
        assert admitted(a.take, f"c{i}", 1.0, 1)
    # The fifth caller has no slot: each worker holds it to its rate alone (and says so, once).
    assert admitted(a.take, "c4", 1.0, 1) and admitted(b.take, "c4", 1.0, 1)
    assert not admitted(a.take, "c4", 1.0, 1)
    assert "table of callers is full (4)" in caplog.text
    assert not admitted(b.take, "c0", 1.0, 1)  # the four with slots are still shared


COUNTER = """
import sys
from pathlib import Path
from engines.errors import RateLimitedError
from server.shared_admission import SharedCallerState

state = SharedCallerState(Path(sys.argv[1]))
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
admitted = 0
for _ in range(20000):
    try:
        state.take("desk", 1e-6, 40000)
        admitted += 1
    except RateLimitedError:
        pass
    with state.hold("desk", 1 << 30):
        pass
print(admitted)
"""


def test_processes_counting_at_once_lose_no_update(table: Path) -> None:
    """Four processes try 20,000 tokens each from a bucket of 40,000 (refilled at one in 11 days), and hold and end
    20,000 calls each, all at once: exactly 40,000 are admitted, and no call is left counted."""
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, str(table)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:  # started together, once all have mapped the table
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(counts) == 40000, counts
    view = SharedCallerState(table)
    offset = view._offset("desk")
    assert offset is not None and view._read(offset)[1] == 0  # calls in flight: none
    view.close()
