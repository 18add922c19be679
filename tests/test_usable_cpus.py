"""The thread pools and the machine class follow the CPUs the process may use, not the node's: a cpuset (taskset,
Kubernetes' static CPU manager) and a CPU quota (a container's CPU limit) each lower ``usable_cpus``. Both run in a
child process restricted for real: an affinity mask, and a cgroup with a CPU quota that the child sees as its own
root, as a container does (a cgroup and mount namespace)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What the child reports: the count, the machine class's last word, the threads each member of a 3-model ensemble
# gets, and the server's default decoding pool.
REPORT = """
import json
from engines.machine import machine_class, usable_cpus
from engines.runtime.factory import engine_threads
from server.config import ServerConfig
print(json.dumps({"usable": usable_cpus(), "class": machine_class().rsplit(" ", 1)[1],
                  "member_threads": engine_threads(1, 3), "cpu_workers": ServerConfig().cpu_workers}))
"""
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def report(prefix: list[str] | None = None, preexec: Callable[[], None] | None = None) -> dict[str, object]:
    out = subprocess.run([*(prefix or []), sys.executable, "-c", REPORT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, preexec_fn=preexec, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 CPUs to restrict the child to fewer")
def test_a_cpuset_sizes_the_pools_and_names_the_class() -> None:
    every = report()
    assert every["usable"] == len(os.sched_getaffinity(0))
    assert every["class"] == f"x{every['usable']}"
    one_cpu = min(os.sched_getaffinity(0))
    pinned = report(preexec=lambda: os.sched_setaffinity(0, {one_cpu}))
    # os.cpu_count() still says every CPU here; the pools and the class follow the one CPU the child may use.
    assert pinned == {"usable": 1, "class": "x1", "member_threads": 1, "cpu_workers": 2}
    if every["usable"] == 2:  # the 3 members outnumber 2 CPUs: a thread per CPU each (engine_threads)
        assert every["member_threads"] == 2


@functools.cache
def _cgroup_v1_quota_possible() -> str | None:
    """Why a CPU quota cannot be set up here, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux to make a cgroup"
    if not (CGROUP_V1_CPU / "cpu.cfs_quota_us").is_file() or not os.access(CGROUP_V1_CPU, os.W_OK):
        return "needs a writable cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux) for a cgroup namespace"
    probe = subprocess.run(["unshare", "--cgroup", "--mount", "true"], capture_output=True, text=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        return f"cannot make a cgroup and mount namespace here: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_cgroup_v1_quota_possible() is not None, reason=str(_cgroup_v1_quota_possible()))
@pytest.mark.parametrize(("quota_us", "expected"), [(50_000, 1), (150_000, 2)])
def test_a_cpu_limit_sizes_the_pools(quota_us: int, expected: int) -> None:
    """A quota of half a CPU per 100 ms period counts as 1 CPU, one and a half as 2 (rounded up, as a
    Kubernetes limit of 500m or 1500m). The child runs in a cgroup of its own with that quota, in a cgroup and
    mount namespace where that cgroup is the hierarchy's root, which is how a container sees its limit."""
    if expected > len(os.sched_getaffinity(0)):
        pytest.skip(f"needs {expected} CPUs")
    group = CGROUP_V1_CPU / f"facegate-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {CGROUP_V1_CPU}: {exc}")
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        inner = (f"mount --make-rprivate / && umount {CGROUP_V1_CPU} && mount -t cgroup -o cpu cgroup {CGROUP_V1_CPU}"
                 ' && exec "$@"')
        outer = f"echo $$ > {group}/tasks && exec unshare --cgroup --mount sh -c '{inner}' _ \"$@\""
        limited = report(["sh", "-c", outer, "_"])
    finally:
        group.rmdir()
    # The 3 members outnumber the CPUs either way: a thread per usable CPU each.
    assert limited == {"usable": expected, "class": f"x{expected}", "member_threads": expected, "cpu_workers": 2}


def test_a_mistyped_cpu_override_is_a_clear_configuration_error(tmp_path: Path) -> None:
    """``LOKY_MAX_CPU_COUNT`` (the documented way to lower the count) that is not a whole number stops the server
    before it starts anything, naming the variable, as a bad setting in the TOML does (exit 2)."""
    out = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--model-repository", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "LOKY_MAX_CPU_COUNT": "two"})
    assert out.returncode == 2
    assert "bad configuration: LOKY_MAX_CPU_COUNT='two' must be a whole number of CPUs" in out.stderr
