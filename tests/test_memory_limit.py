"""The control group's working set and memory limit: found through /proc's files as the kernel writes them, and
read from a real group the test makes with a limit (cgroup v1 or v2, where the test may make one)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks.memory_group import limited_group, run_in
from server.memory_limit import MemoryGroup, MemoryLimitCollector, describe, memory_group
from tests.bad_inputs import video
from tests.conftest import ROOT
from tests.images import gradient

MIB = 2**20
# Lines as the kernel writes them (fields: id, parent, device, root in the hierarchy, mount point, ...).
V1_HOST = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
V2 = "41 31 0:38 / {point} rw,relatime - cgroup2 cgroup2 rw\n"


def _files(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)
    return directory


def test_a_v1_group_is_found_below_its_mount_and_held_to_the_smallest_limit_above_it(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    _files(mount, memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="1\n")
    _files(mount / "pods", memory_limit_in_bytes=f"{3 * 2**30}\n")
    leaf = _files(mount / "pods" / "web", memory_limit_in_bytes="9223372036854771712\n",
                  memory_usage_in_bytes=f"{900 * MIB}\n",
                  memory_stat=f"cache 1\ninactive_file 7\ntotal_inactive_file {100 * MIB}\n")
    group = memory_group("12:cpu:/\n11:memory:/pods/web\n0::/\n",
                         V1_HOST.replace("/sys/fs/cgroup/memory", str(mount)))
    assert group == MemoryGroup(leaf, 1, mount)
    assert group.limit() == 3 * 2**30  # (its parent's: the group itself has none)
    assert group.working_set() == 800 * MIB  # (the group's and its children's inactive file pages)


def test_a_group_mounted_from_within_a_namespace_is_the_mount_itself(tmp_path: Path) -> None:
    mount = _files(tmp_path / "cg", memory_max=f"{4 * 2**30}\n", memory_current=f"{2 * 2**30}\n",
                   memory_stat=f"anon 5\ninactive_file {3 * 2**30}\n")
    # A container's own cgroup namespace: its group reads as "/", its mount's root as that group's real path.
    line = f"41 31 0:38 /kubepods/pod1/ctr {mount} rw - cgroup2 cgroup2 rw\n"
    group = memory_group("0::/\n", line)
    assert group is not None and group.path == mount and group.version == 2
    assert group.limit() == 4 * 2**30
    assert group.working_set() == 0  # (usage less more reclaimable pages than it holds: never negative)
    # Without a namespace the group reads as the mount's root, and is its mount point all the same.
    assert memory_group("0::/kubepods/pod1/ctr\n", line) == group


def test_no_limit_and_no_group_export_the_families_without_a_sample(tmp_path: Path) -> None:
    mount = _files(tmp_path / "cg", memory_max="max\n", memory_current="1000\n", memory_stat="inactive_file 10\n")
    assert memory_group("0::/\n", V2.format(point=mount)) == MemoryGroup(mount, 2, mount)
    # (lines of another form, as a future kernel might add, are passed over)
    assert memory_group("odd\n0::/\n", "1 2 3\n9 9 0:1 / /x rw - cgroup2\n" + V2.format(point=mount)) is not None
    assert memory_group("0::/\n", "") is None  # no cgroup file system mounted
    for group in (MemoryGroup(mount, 2, mount), None):
        registry = CollectorRegistry()
        registry.register(MemoryLimitCollector(group) if group else _NoGroup())
        text = generate_latest(registry).decode()
        assert "# TYPE facegate_memory_limit_bytes gauge" in text
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        assert samples == (["facegate_memory_working_set_bytes 990.0"] if group else [])


def test_files_of_another_form_give_no_sample_rather_than_a_failed_scrape(tmp_path: Path) -> None:
    mount = _files(tmp_path / "cg", memory_max="lots\n", memory_current="\n", memory_stat="inactive_file x\n",
                   memory_events="oom_kill ?\n")
    group = MemoryGroup(mount, 2, mount)
    assert (group.working_set(), group.limit(), group.oom_kills()) == (None, None, None)
    registry = CollectorRegistry()
    registry.register(MemoryLimitCollector(group))
    assert [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")] == []



def test_the_start_up_log_says_whom_an_out_of_memory_kill_takes(tmp_path: Path) -> None:
    """cgroup v2's memory.oom.group, on the group or above it (the kubelet sets it on each container's group since
    Kubernetes 1.28), makes the kernel kill every process in it together. Otherwise it kills the process of the
    highest resident memory plus its oom_score_adj in thousandths of the limit: a decoder (1000) goes before a
    server at -997 (a Guaranteed pod) until the server holds 1.997 times the limit, before one at 0 until it holds
    the limit, and before one at 953 (a Burstable pod asking 3 GiB of a 64 GiB node) only while the server holds
    under 193 MiB of a 4 GiB limit, which it never does: the operator is told so."""
    pod = _files(tmp_path / "cg" / "pod", memory_max=f"{4 * 2**30}\n", memory_oom_group="0\n")
    container = MemoryGroup(_files(pod / "ctr", memory_max="max\n", memory_current="1\n"), 2, tmp_path / "cg")
    assert not container.kills_together()
    head = f"memory: cgroup v2 {container.path}, held to 4096 MiB; an out-of-memory kill takes one process"
    assert describe(container, -997) == head + (": a video decoder before the server (oom_score_adj -997) while the "
                                                "server's resident memory is under 8180 MiB")
    assert describe(container, 0).endswith("(oom_score_adj 0) while the server's resident memory is under 4096 MiB")
    assert describe(container, 953).endswith("under 193 MiB")
    assert describe(container, None) == head
    (pod / "memory.oom.group").write_text("1\n")
    assert container.kills_together()
    assert describe(container, 0).endswith("an out-of-memory kill ends every process in it (memory.oom.group)")
    assert not MemoryGroup(container.path, 1, tmp_path / "cg").kills_together()  # (v1 has no such setting)
    assert describe(None, 0) == "no memory control group found: facegate_memory_* have no samples"


class _NoGroup(MemoryLimitCollector):
    def __init__(self) -> None:
        self._group = None


@pytest.fixture
def limited() -> Iterator[MemoryGroup]:
    """A new memory control group with a 1 GiB limit; skipped where this process may not make one (not root, no
    memory controller)."""
    with limited_group(2**30, "facegate-test") as group:
        if group is None:
            pytest.skip("no memory control group this process may make (cgroup v1 or v2, as root)")
        yield group


# Run in the group, reads the collector's samples before and after touching 300 MiB.
CHILD = """
import json
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from server.memory_limit import MemoryLimitCollector
def read():
    registry = CollectorRegistry()
    registry.register(MemoryLimitCollector())
    lines = generate_latest(registry).decode().splitlines()
    return {l.split()[0]: float(l.split()[1]) for l in lines if not l.startswith("#")}
before = read()
block = np.ones(300 * 2**20, dtype=np.uint8)
print(json.dumps([before, read()]))
"""


def test_a_real_group_shows_its_limit_and_what_its_process_touches(limited: MemoryGroup) -> None:
    run = subprocess.run(run_in(limited, [sys.executable, "-c", CHILD]), cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    before, after = json.loads(run.stdout)
    assert before["facegate_memory_limit_bytes"] == after["facegate_memory_limit_bytes"] == limited.limit() == 2**30
    assert before["facegate_memory_oom_kills_total"] == 0
    # The group holds only the child: its interpreter and libraries charged since it joined, then the block.
    assert before["facegate_memory_working_set_bytes"] < 200 * MIB
    grown = after["facegate_memory_working_set_bytes"] - before["facegate_memory_working_set_bytes"]
    assert 295 * MIB <= grown < 320 * MIB


def test_a_process_killed_at_the_limit_is_counted() -> None:
    """A process that touches more than its group's limit is killed by the kernel (SIGKILL), and the group's count
    of such kills, which the server exports, rises by one."""
    with limited_group(128 * MIB, "facegate-test") as group:
        if group is None:
            pytest.skip("no memory control group this process may make (cgroup v1 or v2, as root)")
        assert group.oom_kills() == 0
        touch = "import numpy; numpy.ones(2**28, numpy.uint8)"  # 256 MiB
        run = subprocess.run(run_in(group, [sys.executable, "-c", touch]), timeout=60)
        assert run.returncode == -9
        assert group.oom_kills() == 1


# Run in a group too small for the big video's frames: decodes it, then a small one, in one process.
DECODER = """
import json, sys
from engines.vision.video import VideoLimits, decode_video
from engines.vision.video_watch import STOPS, Stop
from server.memory_limit import own_memory_group
big, small = (open(p, "rb").read() for p in sys.argv[1:3])
out = {}
try:
    out["big"] = len(decode_video(big, VideoLimits(), "clip"))
except Exception as exc:
    out["big"] = [type(exc).__name__, str(exc), getattr(exc, "retry_after_s", None)]
out["small"] = len(decode_video(small, VideoLimits(), "clip"))
out["memory_stops"] = STOPS.snapshot()[Stop.MEMORY]
out["kills"] = own_memory_group().oom_kills()
print(json.dumps(out))
"""


def test_a_decoder_killed_for_memory_is_resource_exhausted_and_the_next_video_decodes(tmp_path: Path) -> None:
    """A video decoder the kernel kills when the server's group reaches its limit (it offers itself first) makes
    its call RESOURCE_EXHAUSTED, which a caller may send again. Until 2026-12-07 it was INVALID_ARGUMENT, "could
    not be decoded", as if the video were bad (seen in ``make bench-memory --workers 2``). Here 400 frames of
    640x480 (352 MiB) cannot fit in a 256 MiB group beside the interpreter."""
    big = video(tmp_path / "big.avi", [gradient(640, 480)], repeat=400)
    video(tmp_path / "small.avi", [gradient(640, 480)], repeat=10)
    with limited_group(256 * MIB, "facegate-test") as group:
        if group is None:
            pytest.skip("no memory control group this process may make (cgroup v1 or v2, as root)")
        command = [sys.executable, "-c", DECODER, str(tmp_path / "big.avi"), str(tmp_path / "small.avi")]
        run = subprocess.run(run_in(group, command), cwd=ROOT, capture_output=True, text=True, timeout=120,
                             check=True)
    got = json.loads(run.stdout)
    assert got["big"] == ["ResourceExhaustedError", "clip.video: the server ran short of memory to decode it", 1.0]
    assert got["small"] == 10  # the process that asked was spared, and decodes the next video
    assert got["memory_stops"] == 1  # facegate_video_decodes_stopped_total{reason="memory"}
    assert got["kills"] >= 1
    assert len(big) < 2 * MIB  # (the frames, not the file, are what the group cannot hold)
