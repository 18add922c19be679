"""One process at a time across the processes that share a model repository (``--workers``, replicas on one
volume): an advisory lock on a file beside what they would otherwise all do at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` (made if missing, with its directory) until the block ends; the kernel releases it if the
    holder dies. Yields whether it is held: where the file cannot be made (a read-only repository) nothing can be
    written either, so each process goes ahead on its own."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # (closing releases the lock)


def once(lock: Path, find: Callable[[], T | None], make: Callable[[], T]) -> T:
    """What ``find`` returns, else what ``make`` returns, made by one process at a time: a process that finds
    nothing takes its turn at ``lock`` and looks again, so those that waited use what the first one made."""
    found = find()
    if found is not None:
        return found
    with exclusive(lock):
        found = find()
        return found if found is not None else make()
