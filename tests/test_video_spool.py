"""A client's video must not outlive its decode on disk, whether the worker finished, failed or was killed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from engines.errors import InvalidArgumentError
from engines.vision import video as video_mod
from engines.vision.video import VideoLimits, decode_video
from tests.bad_inputs import video


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 255, (48, 64, 3), np.uint8) for _ in range(n)]


def _files_holding(root: Path, payloads: list[bytes]) -> list[Path]:
    """Regular files directly under root, or one directory below it, whose bytes equal one of the payloads."""
    sizes = {len(p) for p in payloads}
    found = []
    for path in [*root.glob("*"), *root.glob("*/*")]:
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size in sizes \
                    and path.read_bytes() in payloads:
                found.append(path)
        except OSError:  # another process's file, gone or unreadable
            continue
    return found


def test_no_decode_leaves_the_video_in_the_temporary_directory(tmp_path: Path) -> None:
    avi = video(tmp_path / "c.avi", _frames(12))
    mp4 = video(tmp_path / "c.mp4", _frames(12), fourcc="mp4v")
    truncated = avi[: len(avi) // 2]
    endless = video(tmp_path / "long.avi", _frames(4), repeat=800)  # 3,200 frames: over the frame limit
    payloads = [avi, mp4, truncated, endless]
    for p in tmp_path.glob("*"):
        p.unlink()  # only the server's copies may be found now
    root = Path(tempfile.gettempdir())
    assert not _files_holding(root, payloads)

    outcomes: list[int | str] = []
    for _ in range(4):
        for data, limits in ((avi, VideoLimits()), (mp4, VideoLimits()), (truncated, VideoLimits()),
                             (endless, VideoLimits()), (endless, VideoLimits(max_frames=10_000, timeout_s=0.3))):
            try:
                outcomes.append(len(decode_video(data, limits, "clip")))
            except InvalidArgumentError as exc:
                outcomes.append(exc.violations[0].description)
    assert outcomes[0] == outcomes[1] == 12  # served as before
    assert any("did not decode within" in str(o) for o in outcomes)  # the killed worker is among them
    assert not _files_holding(root, payloads)  # before 2026-12-04 about half of these decodes left a copy
    assert not [d for d in root.glob("facegate-video-*") if any(d.iterdir())]


def test_the_video_goes_to_a_memory_file_and_else_to_the_parents_directory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"RIFF....AVI " + bytes(range(256)) * 40
    if hasattr(os, "memfd_create"):
        with video_mod._spooled(data, str(tmp_path)) as path:
            assert path.startswith("/proc/self/fd/")
            assert Path(path).read_bytes() == data
            assert not list(tmp_path.iterdir())  # nothing written to a directory
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with video_mod._spooled(data, str(tmp_path)) as path:
        assert Path(path).parent == tmp_path
        assert Path(path).read_bytes() == data
