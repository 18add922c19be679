"""The admission limits a reload applies to a running server: calls in flight, the wait before shedding and the
memory budgets, for the calls admitted from then on; settings that would not hold with the start's are refused whole.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.server_process import facegate_process, free_port
from engines.errors import ResourceExhaustedError
from server.admission import Budget, WaitGate
from server.admission_reload import adjust
from server.auth.reload import CredentialReloader, restart_needed
from server.config import ServerConfig
from server.memory_budgets import BudgetFit, Budgets, budget_floors
from tests.conftest import scrape, wait_until

MIB = 2**20
DEFAULTS = ServerConfig()


def _limits(config: ServerConfig) -> tuple[Budget, dict[str, WaitGate], BudgetFit]:
    calls = Budget("calls in flight", config.max_inflight_calls, "calls")
    gates = {name: WaitGate(name, config.max_queue_wait_s, config.admit_min_in_flight)
             for name in ("liveness", "identification")}
    budgets = (Budget("decoded pixels", config.max_inflight_pixels, "pixels"),
               Budget("in-flight request bytes", config.max_inflight_request_bytes, "bytes"),
               Budget("ModelInfer input bytes", config.max_inflight_infer_bytes, "bytes"))
    fit = BudgetFit(budgets, budget_floors(config), None, True, 1)  # (no memory limit: the settings hold as set)
    fit.start(900 * MIB)
    return calls, gates, fit


def test_a_reload_puts_the_new_admission_limits_in_force_and_says_which_changed() -> None:
    calls, gates, fit = _limits(DEFAULTS)
    assert adjust(DEFAULTS, calls, gates, fit) == ""  # (the same settings: nothing to say)
    new = replace(DEFAULTS, max_inflight_calls=64, max_queue_wait_s=0.25, admit_min_in_flight=8,
                  max_inflight_pixels=200_000_000, max_inflight_request_bytes=128 * MIB)
    assert adjust(new, calls, gates, fit) == (
        f"max_inflight_calls {DEFAULTS.max_inflight_calls} -> 64, max_queue_wait_s 0.5 -> 0.25, "
        "admit_min_in_flight 32 -> 8, max_inflight_pixels 250,000,000 -> 200,000,000, "
        "max_inflight_request_bytes 268,435,456 -> 134,217,728")
    assert calls.capacity == 64
    assert {(g.max_wait_s, g.min_in_flight) for g in gates.values()} == {(0.25, 8)}
    assert fit.settings == Budgets(200_000_000, 128 * MIB, DEFAULTS.max_inflight_infer_bytes)
    assert adjust(new, calls, gates, fit) == ""


def test_calls_in_flight_over_a_lowered_limit_finish_and_new_ones_wait_for_room() -> None:
    calls, gates, fit = _limits(DEFAULTS)
    with calls.hold(100):
        adjust(replace(DEFAULTS, max_inflight_calls=64), calls, gates, fit)
        with pytest.raises(ResourceExhaustedError, match="calls in flight budget in use"), calls.hold(1):
            pass
    with calls.hold(64):
        pass


def test_settings_that_would_not_hold_with_the_starts_are_refused_whole() -> None:
    """max_inflight_calls raised with max_concurrent_rpcs: valid in the file, but the port's gRPC limit is the
    start's, and more calls than it leaves would be refused by gRPC before the server could say why."""
    started = DEFAULTS
    wider = replace(started, max_concurrent_rpcs=4096, max_inflight_calls=2048)
    outcomes: list[str] = []
    reloader = CredentialReloader(started, lambda _: None, lambda: wider, on_outcome=outcomes.append)
    with pytest.raises(ValueError, match=rf"max_inflight_calls \(2048\) at most max_concurrent_rpcs "
                                         rf"\({started.max_concurrent_rpcs}\)"):
        reloader.prepare()
    assert restart_needed(started, wider) == ["max_concurrent_rpcs"]  # (and max_inflight_calls is applied)
    narrower = replace(started, max_inflight_calls=128)
    assert CredentialReloader(started, lambda _: None, lambda: narrower).prepare().config == narrower


@pytest.mark.weights
@pytest.mark.slow
def test_a_running_server_applies_reloaded_limits_and_refuses_ones_that_cannot_hold(repository_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """The real server, SIGHUP: the calls budget, the gates' wait and a memory budget change in its metrics and its
    log; then settings that would not hold with the start's are refused, and the limits in force stay."""
    config = tmp_path / "facegate.toml"
    # (the budgets as set, whatever memory limit this runs under: fitting them is tests/test_memory_budgets.py's)
    gallery = f'gallery_path = "{tmp_path / "gallery.sqlite"}"\nfit_memory_budgets = false\n'
    config.write_text(f"[server]\n{gallery}[auth]\nreload_poll_s = 0.0\n")
    port, log = free_port(), tmp_path / "server.log"
    with facegate_process(repository_dir, ["--config", str(config), "--metrics-port", str(port), "--log-level",
                                           "INFO"], log) as (_, proc):
        before = _limits_in_force(port)
        config.write_text(f"[server]\n{gallery}max_inflight_calls = 64\nmax_queue_wait_s = 0.25\n"
                          f"max_inflight_request_bytes = {128 * MIB}\n[auth]\nreload_poll_s = 0.0\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(port, "applied") == 1), log.read_text()[-2000:]
        after = _limits_in_force(port)
        config.write_text(f"[server]\n{gallery}max_concurrent_rpcs = 4096\nmax_inflight_calls = 2048\n"
                          "[auth]\nreload_poll_s = 0.0\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(port, "refused") == 1), log.read_text()[-2000:]
        kept = _limits_in_force(port)
    text = log.read_text()
    assert before == (DEFAULTS.max_inflight_calls, DEFAULTS.max_queue_wait_s, DEFAULTS.max_inflight_request_bytes)
    assert after == kept == (64, 0.25, 128 * MIB)
    assert (f"admission: max_inflight_calls {DEFAULTS.max_inflight_calls} -> 64, max_queue_wait_s 0.5 -> 0.25, "
            "max_inflight_request_bytes 268,435,456 -> 134,217,728") in text
    assert "refused, the credentials in force are kept: max_health_and_stream_calls" in text


def _limits_in_force(port: int) -> tuple[float, float, float]:
    found = {(name, dict(labels).get("budget") or dict(labels).get("pipeline")): value
             for (name, labels), value in scrape(port).items()}
    waits = {found[("facegate_admission_max_wait_seconds", p)] for p in ("liveness", "identification")}
    assert len(waits) == 1, waits
    return (found[("facegate_budget_capacity", "calls")], waits.pop(),
            found[("facegate_budget_capacity", "request_bytes")])


def _reloads(port: int, outcome: str) -> float:
    return scrape(port).get(("facegate_credential_reloads_total", (("outcome", outcome),)), 0.0)
