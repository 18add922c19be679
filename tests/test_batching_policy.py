"""The batch-forming rules, as a pure function."""

import pytest

from engines.batching import BatcherConfig
from server.batching.policy import QueueState, decide


def state(queued: int, waited: float = 0.0, busy: int = 0, gap: float | None = None, idle: int = 1) -> QueueState:
    return QueueState(queued=queued, oldest_wait_s=waited, busy_instances=busy, arrival_gap_s=gap,
                      idle_instances=idle)


CFG = BatcherConfig(max_batch_size=8, max_queue_delay_us=5000)


def test_empty_queue_runs_nothing() -> None:
    assert decide(CFG, state(0)).run == 0


def test_full_batch_runs_at_once() -> None:
    assert decide(CFG, state(8)).run == 8
    assert decide(CFG, state(20, busy=1)).run == 8


def test_lone_request_on_idle_server_does_not_wait() -> None:
    assert decide(CFG, state(1, gap=None)).run == 1
    # Arrivals are rarer than the delay: waiting cannot help either.
    assert decide(CFG, state(1, gap=0.5)).run == 1


def test_waits_while_busy_or_arrivals_expected() -> None:
    d = decide(CFG, state(3, waited=0.001, busy=1))
    assert d.run == 0 and d.wait_s == pytest.approx(0.004)
    d = decide(CFG, state(3, waited=0.001, gap=0.0005))
    assert d.run == 0


def test_a_burst_on_an_idle_server_is_spread_over_the_idle_instances() -> None:
    cfg = BatcherConfig(max_batch_size=16, max_queue_delay_us=1000, instances=2)
    d = decide(cfg, state(5, idle=2))
    assert (d.run, d.batches) == (3, 2)  # 3 + 2, not 5 on one instance while the other idles
    d = decide(cfg, state(7, idle=3))
    assert (d.run, d.batches) == (3, 3)  # 3 + 3 + 1
    assert (decide(cfg, state(1, idle=2)).run, decide(cfg, state(1, idle=2)).batches) == (1, 1)
    assert decide(cfg, state(5, idle=1)).batches == 1
    # Full batches and instances already busy are left as they were: that is load, where batching pays.
    assert decide(cfg, state(16, idle=2)).batches == 1
    assert decide(cfg, state(5, waited=0.0002, busy=1, idle=1)).run == 0
    d = decide(cfg, state(5, waited=0.002, gap=1e-6, idle=2))  # the burst's delay is over: spread, too
    assert (d.run, d.batches) == (3, 2)


def test_delay_expired_runs_what_is_there() -> None:
    assert decide(CFG, state(3, waited=0.006, busy=1)).run == 3


def test_no_delay_never_waits() -> None:
    cfg = BatcherConfig(max_batch_size=8, max_queue_delay_us=0)
    assert decide(cfg, state(3, busy=2, gap=1e-6)).run == 3


def test_largest_preferred_size_that_fits_runs_at_once() -> None:
    cfg = BatcherConfig(max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay_us=10_000)
    assert decide(cfg, state(9, busy=1)).run == 8
    assert decide(cfg, state(5, busy=1)).run == 4
    assert decide(cfg, state(3, busy=1)).run == 0  # below every preferred size: may wait for one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (8,)}, "preferred batch size 8"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"instances": 0}, "instances"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**kwargs)
