"""Weight acquisition: sha256 checks and errors that name the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from engines.weights import MANIFEST, WeightFile, WeightsError, obtain
from tests.conftest import serve_folder


def spec_for(content: bytes, relpath: str = "m/w.bin") -> WeightFile:
    return WeightFile(relpath, "http://127.0.0.1:9/unreachable", hashlib.sha256(content).hexdigest(), len(content))


def test_local_directory_is_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"weights")
    paths = obtain(tmp_path, tmp_path / "cache", [spec_for(b"weights")])
    assert paths["m/w.bin"] == tmp_path / "m" / "w.bin"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"m/w\.bin is missing"):
        obtain(tmp_path, tmp_path / "cache", [spec_for(b"weights")])


def test_corrupt_file_names_the_file_and_both_hashes(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"tampered")
    spec = spec_for(b"weights")
    with pytest.raises(WeightsError, match=rf"m/w\.bin .* is corrupt: sha256 \w+, expected {spec.sha256}"):
        obtain(tmp_path, tmp_path / "cache", [spec])


def test_failed_download_is_a_clear_error_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"could not download weight file m/w\.bin"):
        obtain(None, tmp_path / "cache", [spec_for(b"weights")], timeout_s=2)
    assert not any((tmp_path / "cache").rglob("*.part"))


def test_manifest_pins_commits_and_hashes() -> None:
    for spec in MANIFEST:
        assert len(spec.sha256) == 64
        assert "b6d5f04ad78778917853b25c778acef6d5626d15" in spec.url


@pytest.mark.weights
def test_shared_weights_match_the_manifest(weights_dir: Path) -> None:
    paths = obtain(weights_dir, weights_dir, MANIFEST)
    assert all(p.stat().st_size == s.size for s, p in zip(MANIFEST, paths.values(), strict=True))


def test_a_mirror_is_trusted_for_availability_only(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "m").mkdir(parents=True)
    (mirror / "m" / "w.bin").write_bytes(b"weights")
    (mirror / "m" / "big.bin").write_bytes(b"w" * (4 << 20))
    cache = tmp_path / "cache"
    with serve_folder(mirror) as url:
        paths = obtain(None, cache, [spec_for(b"weights")], timeout_s=10, mirror=url)
        assert paths["m/w.bin"].read_bytes() == b"weights" and paths["m/w.bin"].parent.parent == cache
        # The mirror's copy differs from the pinned file: refused, nothing kept.
        with pytest.raises(WeightsError, match=r"m/w\.bin .* is corrupt"):
            obtain(None, tmp_path / "other", [spec_for(b"weight5")], timeout_s=10, mirror=url)
        # A file larger than its pinned size is refused (reading stops at size + 1 bytes).
        big = WeightFile("m/big.bin", "unused", hashlib.sha256(b"w" * 100).hexdigest(), 100)
        with pytest.raises(WeightsError, match=r"m/big\.bin from .* is larger than its pinned 100 bytes"):
            obtain(None, tmp_path / "other", [big], timeout_s=10, mirror=url)
    for mistyped in ("not a url", "http://[::1"):  # a clear error, not urllib's ValueError
        with pytest.raises(WeightsError, match=r"could not download weight file m/w\.bin from "):
            obtain(None, tmp_path / "other", [spec_for(b"weights")], timeout_s=10, mirror=mistyped)
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]
