"""The batch-forming rules, as a pure function."""

import pytest

from engines.batching import BatcherConfig
from server.batching.policy import QueueState, decide


def state(queued: int, waited: float = 0.0, busy: int = 0, gap: float | None = None) -> QueueState:
    return QueueState(queued=queued, oldest_wait_s=waited, busy_instances=busy, arrival_gap_s=gap)


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
