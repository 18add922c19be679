"""Compute threads placed on the cores, one CPU each, each thread pool spread over them.

Why not leave it to the OS: the compute threads run at nice 19 (``server.priority``) beside the event loop at nice
0, and Linux balances its runqueues by weight. A nice-0 thread weighs as much as ~68 nice-19 ones, so the balancer
counts the core the loop last ran on as full and stacks the compute threads on the other core's runqueue; when the
loop then sleeps (most of the time), its core idles while they wait. Measured on the 2-core Zen 4 EPYC, CheckLiveness
at c32 (``auto``): 15-17 % of the cores idle while the compute threads spent 35-49 % of their time runnable but
waiting for a CPU, and 54-62 voluntary context switches a request. With every compute thread on a CPU of its own the
cores were 8-9 % idle, 39-41 switches a request, and in 3 rounds side by side with the unplaced server:
CheckLiveness c32 1.20x req/s, c1 p50 0.93x; IdentifyFromClip c16 1.20x clips/s, c1 p50 0.82x (benchmarks/README.md).
The cost: under heavy overload the loop has less spare time, so refusals come back later (README, *Security*).

A thread placed on one CPU still shares it: the event loop (unplaced) preempts it there as before, and a runtime's own
worker threads (OpenVINO's, ONNX Runtime's intra-op pool) are made when the model is compiled, by an unplaced thread,
so they keep every CPU (checked: a 2-thread OpenVINO SlowFast member runs as fast from a placed caller). Linux only;
elsewhere, or with a single CPU, nothing is placed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

_TOPOLOGY = Path("/sys/devices/system/cpu")


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset), or none where unknown."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def cores_first(cpus: Iterable[int], topology: Path = _TOPOLOGY) -> list[int]:
    """``cpus`` ordered so that consecutive ones sit on different physical cores where they can: one hardware
    thread of every core, then the second of every core, ... (SMT siblings share a core's arithmetic units)."""
    seen: dict[tuple[str, str], int] = {}
    keyed = []
    for cpu in sorted(cpus):
        try:
            core = ((topology / f"cpu{cpu}/topology/physical_package_id").read_text().strip(),
                    (topology / f"cpu{cpu}/topology/core_id").read_text().strip())
        except OSError:  # no topology (a container without /sys, another OS): every CPU its own core
            core = ("", str(cpu))
        sibling = seen.get(core, 0)
        seen[core] = sibling + 1
        keyed.append((sibling, cpu))
    return [cpu for _, cpu in sorted(keyed)]


def _pin_this_thread(cpu: int) -> None:
    with contextlib.suppress(OSError):  # the CPU left the cpuset meanwhile: the thread stays where it may run
        os.sched_setaffinity(0, {cpu})  # 0: the calling thread (affinity is per thread on Linux)


def _nothing() -> None:
    return None


class CpuPlacement:
    """Hands out thread-pool initializers: pool k's i-th thread runs on ``cpus[(start + k + i) % n]``, so a pool's
    threads spread over the CPUs and successive pools begin one CPU further on (two single-thread pools, such as the
    two liveness classifiers, land on different CPUs)."""

    def __init__(self, enabled: bool = True, cpus: Iterable[int] | None = None, start: int = 0) -> None:
        given = allowed_cpus() if cpus is None else list(cpus)
        self.enabled = enabled and hasattr(os, "sched_setaffinity") and len(given) > 1
        self.cpus = cores_first(given) if self.enabled else sorted(given)  # the topology is read only when used
        self._next_pool = start
        self._lock = threading.Lock()

    def pool(self) -> Callable[[], None]:
        """The initializer for one thread pool's threads (a no-op when placement is off)."""
        if not self.enabled:
            return _nothing
        with self._lock:
            base = self._next_pool
            self._next_pool += 1
        order = itertools.count()  # next() on a count is atomic under the GIL: threads starting together differ

        def place() -> None:
            _pin_this_thread(self.cpus[(base + next(order)) % len(self.cpus)])

        return place
