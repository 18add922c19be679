"""A memory control group with a limit, for a benchmark's server to run under as it would in its pod.

Made under the root of the hierarchy this process sees (cgroup v1's memory controller, or v2 with the memory
controller enabled for the root's children), where this process may write there: as root on a machine or VM, not
in an unprivileged container. Elsewhere ``limited_group`` yields None and the caller runs without a limit. The
limit the benchmarks use is the Deployment's (deploy/kubernetes/base/deployment.yaml).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from server.memory_limit import MemoryGroup, own_memory_group

DEPLOYMENT = Path("deploy/kubernetes/base/deployment.yaml")


def deployment_limit(path: Path = DEPLOYMENT) -> str | None:
    """The facegate container's memory limit in the Deployment (as written there, e.g. "4Gi")."""
    doc = yaml.safe_load(path.read_text())
    for c in doc["spec"]["template"]["spec"]["containers"]:
        if c["name"] == "facegate":
            return c.get("resources", {}).get("limits", {}).get("memory")
    return None


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "Ti": 1024.0 ** 2}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    return float(quantity) / 2**20


def pod_limit_bytes() -> int | None:
    """The Deployment's memory limit in bytes (None when it sets none)."""
    limit = deployment_limit()
    return int(mebibytes(limit) * 2**20) if limit else None


def _parent() -> tuple[Path, int] | None:
    group = own_memory_group()
    if group is None:
        return None
    if group.version == 2:
        control = group.root / "cgroup.subtree_control"
        try:
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
        except OSError:
            return None
    return group.root, group.version


def set_limit(group: MemoryGroup, limit_bytes: int) -> None:
    """Holds ``group`` to ``limit_bytes``, as at its making or as an in-place resize does to a running pod's."""
    limit = group.path / group.limit_file
    # No swap beyond it, as in a pod: past the limit the kernel kills, rather than swapping out. (v1's memory and
    # swap limit may never be under its memory limit: raised first when the limit rises, lowered after it falls.)
    swap = group.path / ("memory.swap.max" if group.version == 2 else "memory.memsw.limit_in_bytes")
    rising = group.version == 1 and int(limit.read_text()) < limit_bytes  # (v1 writes a number even for none)
    if swap.exists() and rising:
        swap.write_text(str(limit_bytes))
    limit.write_text(str(limit_bytes))
    if swap.exists() and not rising:
        swap.write_text("0" if group.version == 2 else str(limit_bytes))


@contextmanager
def limited_group(limit_bytes: int, name: str = "facegate-bench") -> Iterator[MemoryGroup | None]:
    """A new group held to ``limit_bytes``, removed once its processes have ended; None where none can be made."""
    parent = _parent()
    if parent is None:
        yield None
        return
    root, version = parent
    path = root / f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError:
        yield None
        return
    try:
        try:
            made = MemoryGroup(path, version, root)
            set_limit(made, limit_bytes)
        except OSError:  # (a group made, but its limit refused: run without one rather than fail)
            yield None
        else:
            yield made
    finally:
        for _ in range(50):  # (a process that was in it may take a moment to be reaped)
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_in(group: MemoryGroup | None, command: list[str]) -> list[str]:
    """``command``, made to join ``group`` first (the shell writes its own pid, then becomes the command: what it
    and its children allocate from the start is charged to the group)."""
    if group is None:
        return command
    return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(group.path), *command]
