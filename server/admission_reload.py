"""The admission limits a reload (SIGHUP, or the ``--config`` file changed) applies to a running server.

Under an incident the first lever is admission: fewer calls in flight, a shorter wait before shedding, smaller
memory budgets. A restart to change them drains the calls in flight, closes every connection and serves nothing
until the models are warm again, so a reload applies them to the calls admitted from then on. Calls in flight keep
what they hold: a budget lowered under what they hold refuses new calls until enough of them finish. With
``--workers``, each worker applies its own share of the memory budgets (``server.workers.memory_budget_share``), as
at start, and fits them again to the memory limit (``server.memory_budgets``). The video decoders' threads stay as
many as the start's pixel budget has room for (``ClipLimits.videos_at_once``): a pixel budget raised above it admits
more videos than decode at once, and those wait for a thread, their pixels held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple

from server.admission import Budget, WaitGate
from server.config import ServerConfig
from server.memory_budgets import SETTING_NAMES, BudgetFit, budget_settings

RELOADED = frozenset({"max_inflight_calls", "max_inflight_request_bytes", "max_inflight_pixels",
                      "max_inflight_infer_bytes", "max_queue_wait_s", "admit_min_in_flight"})
"""The settings ``adjust`` applies (server.auth.reload leaves them out of what needs a restart)."""


def adjust(new: ServerConfig, calls: Budget, gates: Mapping[str, WaitGate], fit: BudgetFit) -> str:
    """Puts ``new``'s admission limits in force; says what changed ("" if nothing), for the reload's log line."""
    changed = []
    if new.max_inflight_calls != calls.capacity:
        changed.append(f"max_inflight_calls {calls.capacity} -> {new.max_inflight_calls}")
        calls.capacity = new.max_inflight_calls
    first = next(iter(gates.values()), None)  # (every gate has the same two settings)
    if first is not None and first.max_wait_s != new.max_queue_wait_s:
        changed.append(f"max_queue_wait_s {first.max_wait_s:g} -> {new.max_queue_wait_s:g}")
    if first is not None and first.min_in_flight != new.admit_min_in_flight:
        changed.append(f"admit_min_in_flight {first.min_in_flight} -> {new.admit_min_in_flight}")
    for gate in gates.values():
        gate.max_wait_s, gate.min_in_flight = new.max_queue_wait_s, new.admit_min_in_flight
    old, settings = fit.settings, budget_settings(new)
    if fit.resettle(settings):  # (fitted again to the limit, and logged, as at start)
        changed += [f"{name} {was:,} -> {now:,}" for name, was, now in zip(SETTING_NAMES, astuple(old),
                                                                          astuple(settings), strict=True)
                    if was != now]
    return ", ".join(changed)
