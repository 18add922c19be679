"""Download a file that is checked before use (weights, ensemble bundles): into a temporary file beside where it
will go, never more than its limit, so a wrong or hostile server can neither fill the disk nor leave half a file
where a reader would take it for whole."""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


class TooLargeError(Exception):
    """The server sent more than the limit; nothing is kept."""


def download(url: str, folder: Path, prefix: str, max_bytes: int, timeout_s: float) -> Path:
    """A new ``.part`` file in ``folder`` holding what ``url`` answers; the caller checks it, then renames or
    removes it. Reading stops one byte past ``max_bytes`` (TooLargeError). Raises OSError for a failed transfer and
    ValueError for a malformed URL, as urllib does; on any error the partial file is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".part")
    path = Path(name)
    try:
        log.info("downloading %s", url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
            received = 0
            while received <= max_bytes and (chunk := resp.read(min(1 << 20, max_bytes + 1 - received))):
                out.write(chunk)
                received += len(chunk)
        if received > max_bytes:
            raise TooLargeError(f"{url} is larger than {max_bytes} bytes")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
