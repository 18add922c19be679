"""One process at a time across the processes that share a model repository (``--workers``, replicas on one
volume): an advisory lock on a file beside what they would otherwise all do at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` (made if missing) until the block ends; the kernel releases it if the holder dies. Yields
    whether it is held: where the file cannot be made (a read-only repository, a missing directory) nothing can be
    written either, so each process goes ahead on its own."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # (closing releases the lock)
