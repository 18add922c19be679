"""Compute threads placed on CPUs (server/placement.py): the order of the CPUs and where a pool's threads land."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.placement import CpuPlacement, allowed_cpus, cores_first

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(allowed_cpus()) < 2,
                                    reason="needs Linux thread affinity and at least 2 CPUs")


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_smt_siblings_come_after_one_thread_of_every_core(tmp_path: Path) -> None:
    # Siblings numbered next to each other (0-1 on core 0, 2-3 on core 1), as some firmware does.
    adjacent = _topology(tmp_path / "a", {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)})
    assert cores_first([0, 1, 2, 3], adjacent) == [0, 2, 1, 3]
    # Siblings numbered a core count apart (Linux's usual x86 order), on two packages with the same core ids.
    apart = _topology(tmp_path / "b", {0: (0, 0), 1: (1, 0), 2: (0, 0), 3: (1, 0)})
    assert cores_first([3, 2, 1, 0], apart) == [0, 1, 2, 3]


def test_without_a_topology_every_cpu_counts_as_its_own_core(tmp_path: Path) -> None:
    assert cores_first([5, 1, 3], tmp_path) == [1, 3, 5]


def test_a_single_cpu_or_off_places_nothing() -> None:
    assert not CpuPlacement(cpus=[0]).enabled
    assert not CpuPlacement(enabled=False, cpus=[0, 1]).enabled


def _cpus_of_threads(executor: ThreadPoolExecutor, threads: int) -> list[set[int]]:
    """Each of ``threads`` worker threads' own affinity (a barrier makes the pool start that many)."""
    barrier = threading.Barrier(threads)

    def affinity() -> tuple[int, set[int]]:
        barrier.wait(10)
        return threading.get_native_id(), os.sched_getaffinity(0)

    got = dict(f.result() for f in [executor.submit(affinity) for _ in range(threads)])
    return list(got.values())


@needs_affinity
def test_a_pools_threads_spread_over_the_cpus_and_the_next_pool_starts_one_further() -> None:
    placement = CpuPlacement()
    cpus = placement.cpus
    with ThreadPoolExecutor(2, initializer=placement.pool()) as first, \
            ThreadPoolExecutor(1, initializer=placement.pool()) as second, \
            ThreadPoolExecutor(1, initializer=placement.pool()) as third:
        two = _cpus_of_threads(first, 2)
        assert all(len(s) == 1 for s in two)
        assert set().union(*two) == {cpus[0], cpus[1]}  # two threads of one pool, two CPUs
        # Two single-thread pools made one after the other (the two liveness classifiers) never share a CPU.
        assert _cpus_of_threads(second, 1) == [{cpus[1 % len(cpus)]}]
        assert _cpus_of_threads(third, 1) == [{cpus[2 % len(cpus)]}]
    # The threads that made the pools keep every CPU.
    assert os.sched_getaffinity(0) == set(allowed_cpus())


@needs_affinity
def test_placement_off_leaves_threads_on_every_cpu() -> None:
    with ThreadPoolExecutor(2, initializer=CpuPlacement(enabled=False).pool()) as pool:
        assert all(s == set(allowed_cpus()) for s in _cpus_of_threads(pool, 2))
