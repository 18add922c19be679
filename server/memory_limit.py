"""The memory the server's control group uses, against the limit it runs under, for the metrics endpoint.

The kernel kills the container when its control group's memory reaches the limit (a Deployment's
``resources.limits.memory``, ``docker run --memory``, systemd's ``MemoryMax``), not when one process's resident
memory does: the group also holds the video workers, the other serving workers and the page cache. The reading is
the group's *working set*, its usage less the file pages the kernel reclaims first (``inactive_file``), which is
how cAdvisor and the kubelet measure it, so that the alerts read the number the kubelet evicts on. The server
exports it itself so that a deployment without cAdvisor, or one scraping only facegate, can still see how close
it is to being killed.

The limit is the smallest one on the way from the server's group to the root of the hierarchy it can see: a group
without its own limit is held to its parent's. No limit found (none set, or no cgroup file system, as outside
Linux): the limit's family is exported without a sample. Read at scrape time, a few small files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.vision.oom_score import FIRST

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; v2 writes "max".
_UNLIMITED_V1 = 1 << 62


def _number(text: str | None) -> int | None:
    """A count as the kernel writes it; None for a missing file or anything else (a scrape must not fail on it:
    one collector raising makes the whole /metrics page an error)."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _counts(text: str) -> dict[str, int | None]:
    return {k: _number(v) for k, v in (line.split(maxsplit=1) for line in text.splitlines() if " " in line)}


@dataclass(frozen=True)
class MemoryGroup:
    """One process's memory control group: its directory, and the cgroup version it is of."""

    path: Path
    version: int  # 1 or 2
    root: Path  # the hierarchy's mount point: limits are looked for up to it

    def _read(self, name: str, directory: Path | None = None) -> str | None:
        try:
            return ((directory or self.path) / name).read_text()
        except OSError:
            return None

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    def usage(self) -> int | None:
        return _number(self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes"))

    def working_set(self) -> int | None:
        """Usage less the inactive file pages (cAdvisor's container_memory_working_set_bytes), at least 0."""
        usage = self.usage()
        stat = self._read("memory.stat")
        if usage is None or stat is None:
            return None
        key = "inactive_file" if self.version == 2 else "total_inactive_file"  # (v1: this group and its children)
        return max(0, usage - (_counts(stat).get(key) or 0))

    def oom_kills(self) -> int | None:
        """Processes the kernel killed in this group for want of memory (a video decoder, a serving worker)."""
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control")
        if text is None:
            return None
        return _counts(text).get("oom_kill")

    def kills_together(self) -> bool:
        """Whether an out-of-memory kill in this group ends all its processes at once: cgroup v2's
        ``memory.oom.group`` set on it or a group above it, as the kubelet sets it on every container's group since
        Kubernetes 1.28 (unless its ``singleProcessOOMKill`` is on). Then a video decoder offering itself first
        (``oom_score_adj``) does not spare the server: the whole container restarts."""
        if self.version != 2:
            return False  # (v1 kills one process, the one with the highest score)
        return any(_number(self._read("memory.oom.group", d)) == 1 for d in self._upwards())

    def limit(self) -> int | None:
        """The smallest memory limit set on this group or a group above it, in bytes; None when none is."""
        values = (_number(self._read(self.limit_file, d)) for d in self._upwards())  # (v2's "max": None, no limit)
        return min((v for v in values if v is not None and v < _UNLIMITED_V1), default=None)

    def _upwards(self) -> Iterator[Path]:
        """This group's directory, then each above it up to the hierarchy's mount point."""
        directory = self.path
        while True:
            yield directory
            if directory == self.root or directory.parent == directory:
                return
            directory = directory.parent


def memory_group(cgroup: str, mountinfo: str) -> MemoryGroup | None:
    """The memory control group that ``cgroup`` (the text of /proc/<pid>/cgroup) names, found through the mounts
    in ``mountinfo`` (/proc/<pid>/mountinfo): a v1 hierarchy with the memory controller, else the v2 one. A group
    mounted from within (a container's namespace: the mount's root is the group itself) is found as well."""
    v1: str | None = None
    v2: str | None = None
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    mounts: dict[str, tuple[str, str]] = {}  # kind -> (the mount's root in the hierarchy, its mount point)
    for line in mountinfo.splitlines():
        fields = line.split()
        after = line.split(" - ", 1)[1].split() if " - " in line else []  # file system type, source, options
        if len(fields) < 5 or len(after) < 3:
            continue
        kind, options = after[0], after[2]
        if kind == "cgroup" and "memory" in options.split(","):
            mounts.setdefault("v1", (fields[3], fields[4]))
        elif kind == "cgroup2":
            mounts.setdefault("v2", (fields[3], fields[4]))
    for version, group in ((1, v1), (2, v2)):
        mount = mounts.get(f"v{version}")
        if group is None or mount is None:
            continue
        root, point = mount
        relative = group[len(root):] if group.startswith(root) else group
        found = MemoryGroup(Path(point) / relative.lstrip("/"), version, Path(point))
        if found.usage() is not None:  # (none where the memory controller is not enabled for the group)
            return found
    return None


def own_memory_group() -> MemoryGroup | None:
    try:
        return memory_group(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None


def describe(group: MemoryGroup | None, own_score: int | None) -> str:
    """The group the server's memory is counted in, and whom an out-of-memory kill in it takes, as the start-up log
    says it. The kernel kills the process of the highest resident memory plus ``oom_score_adj`` thousandths of the
    limit: a video decoder (``oom_score.FIRST``, 1000) goes before the server only while the server holds
    less than (1000 - its own score) thousandths of the limit. The kubelet gives a Guaranteed pod -997, and a
    Burstable one, as the shipped Deployment is, 1000 - 1000 x its memory request / the node's memory: 813 for 3 GiB
    of 16 GiB, so a server holding more than 766 MiB of a 4 GiB limit goes first."""
    if group is None:
        return "no memory control group found: facegate_memory_* have no samples"
    limit = group.limit()
    held = f"held to {limit / 2**20:.0f} MiB" if limit is not None else "no limit"
    if group.kills_together():
        kill = "an out-of-memory kill ends every process in it (memory.oom.group)"
    elif limit is None or own_score is None:
        kill = "an out-of-memory kill takes one process"
    else:
        spared = max(0, FIRST - own_score) / 1000 * limit
        kill = (f"an out-of-memory kill takes one process: a video decoder before the server (oom_score_adj "
                f"{own_score}) while the server's resident memory is under {spared / 2**20:.0f} MiB")
    return f"memory: cgroup v{group.version} {group.path}, {held}; {kill}"


class MemoryLimitCollector(Collector):
    def __init__(self, group: MemoryGroup | None = None) -> None:
        self._group = group if group is not None else own_memory_group()

    def collect(self) -> Iterable[Any]:
        working = GaugeMetricFamily("facegate_memory_working_set_bytes", "Memory the server's control group uses "
                                    "(the server, its workers and video decoders, page cache) less the file pages "
                                    "the kernel reclaims first: what the kernel's OOM kill and the kubelet's "
                                    "eviction compare with the limit")
        limit = GaugeMetricFamily("facegate_memory_limit_bytes", "The memory limit the server's control group runs "
                                  "under (the smallest set on it or a group above it); no sample when none is")
        if self._group is not None:
            if (used := self._group.working_set()) is not None:
                working.add_metric([], used)
            if (most := self._group.limit()) is not None:
                limit.add_metric([], most)
        kills = CounterMetricFamily("facegate_memory_oom_kills", "Processes of the server's control group the "
                                    "kernel killed for want of memory (a video decoder, a serving worker)")
        if self._group is not None and (killed := self._group.oom_kills()) is not None:
            kills.add_metric([], killed)
        yield from (working, limit, kills)
