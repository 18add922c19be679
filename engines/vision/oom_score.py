"""The score by which the kernel picks the process to kill when memory runs out (``oom_score_adj``).

The kernel kills the process with the highest resident memory plus ``oom_score_adj`` thousandths of the limit (the
control group's, or the machine's). A video decoder offers itself first: it holds one client's video, where the
server holds every call in flight. That wins only while the server's own score leaves it room: in ``make
bench-memory`` held to 2,304 MiB (2026-12-07), the server at 0 held 2,357 MiB of resident memory (its file pages
included), and it, not the decoder at 1000 beside it (58 MiB), was killed (``server.memory_limit.describe``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

# The highest score: ahead of a process at score s unless that one holds (1000 - s) thousandths of the limit more.
FIRST = 1000


_OWN = Path("/proc/self/oom_score_adj")


def own_score() -> int | None:
    """This process's score (-1000 to 1000; the kubelet sets -997 for a Guaranteed pod, 1000 for a BestEffort one,
    and between for a Burstable one); None where there is none (not Linux)."""
    try:
        return int(_OWN.read_text())
    except (OSError, ValueError):
        return None


def volunteer() -> None:
    """Make this process the kernel's first choice (only ever upwards: no privilege needed)."""
    with contextlib.suppress(OSError):  # (not Linux, or a sandbox without /proc: the kernel's own choice holds)
        _OWN.write_text(str(FIRST))
