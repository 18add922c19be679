"""Replace a file whole: readers, and other processes writing the same file, see the old content or the new."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomically(path: Path, data: str | bytes | memoryview) -> None:
    """Write ``data`` to a temporary file of this process and thread beside ``path`` (never another writer's), then
    rename it over ``path``; on failure the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
