"""When to run a batch and how large: a pure function of the queue's state, unit-testable without engines."""

from __future__ import annotations

from dataclasses import dataclass

from engines.batching import BatcherConfig


@dataclass(frozen=True)
class QueueState:
    queued: int  # requests waiting (all compatible with the head request)
    oldest_wait_s: float  # how long the head request has waited
    busy_instances: int  # instances executing right now
    arrival_gap_s: float | None  # expected time to the next arrival (None: unknown, e.g. idle server)


@dataclass(frozen=True)
class Decision:
    run: int  # batch size to run now; 0 = do not run yet
    wait_s: float = 0.0  # when run == 0: re-decide after this long at the latest (or on the next arrival)


def decide(cfg: BatcherConfig, s: QueueState) -> Decision:
    """Triton's rules, except that a request is never held when holding it cannot help.

    1. A full batch runs at once. 2. Else the largest preferred size that can be formed runs at once.
    3. Else the head may wait up to ``max_queue_delay_us`` - but only while waiting can help: other instances
       are busy (more requests are on their way) or arrivals are expected before the delay runs out. A lone
       request on an idle server runs immediately, unlike Triton with a queue delay set.
    """
    if s.queued <= 0:
        return Decision(0)
    if s.queued >= cfg.max_batch_size:
        return Decision(cfg.max_batch_size)
    fitting = [p for p in cfg.preferred_batch_sizes if p <= s.queued]
    if fitting:
        return Decision(max(fitting))
    remaining = cfg.max_queue_delay_us / 1e6 - s.oldest_wait_s
    if remaining <= 0:
        return Decision(s.queued)
    more_coming = s.busy_instances > 0 or (s.arrival_gap_s is not None and s.arrival_gap_s < remaining)
    if not more_coming:
        return Decision(s.queued)
    return Decision(0, remaining)
