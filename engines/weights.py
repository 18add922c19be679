"""Obtain the pretrained weights: from a local directory or the pinned upstream commits, sha256-checked.

Weights are data, never part of the repository. A local directory (``FACEGATE_WEIGHTS_DIR``, laid out like
``shared/models``) is used in place; otherwise each file is downloaded once into a cache directory, from its pinned
upstream or from a mirror laid out like that directory (``FACEGATE_WEIGHTS_URL``: a cluster without egress to
GitHub, an internal artefact server). Either way every file's sha256 is checked before anything loads it, so a
mirror is trusted for nothing but availability.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engines.download import TooLargeError, download

WEIGHTS_DIR_ENV = "FACEGATE_WEIGHTS_DIR"
WEIGHTS_URL_ENV = "FACEGATE_WEIGHTS_URL"

_SILENT_FACE = "https://github.com/minivision-ai/Silent-Face-Anti-Spoofing/raw/b6d5f04ad78778917853b25c778acef6d5626d15"


@dataclass(frozen=True)
class WeightFile:
    relpath: str  # path inside the weights directory, e.g. "silent-face/deploy.prototxt"
    url: str
    sha256: str
    size: int


MANIFEST: tuple[WeightFile, ...] = (
    WeightFile("silent-face/2.7_80x80_MiniFASNetV2.pth",
               f"{_SILENT_FACE}/resources/anti_spoof_models/2.7_80x80_MiniFASNetV2.pth",
               "a5eb02e1843f19b5386b953cc4c9f011c3f985d0ee2bb9819eea9a142099bec0", 1849453),
    WeightFile("silent-face/4_0_0_80x80_MiniFASNetV1SE.pth",
               f"{_SILENT_FACE}/resources/anti_spoof_models/4_0_0_80x80_MiniFASNetV1SE.pth",
               "84ee1d37d96894d5e82de5a57df044ef80a58be2b218b5ed7cdfd875ec2f5990", 1856130),
    WeightFile("silent-face/Widerface-RetinaFace.caffemodel",
               f"{_SILENT_FACE}/resources/detection_model/Widerface-RetinaFace.caffemodel",
               "d08338a2c207df16a9c566f767fea67fb43ba6fff76ce11e938fe3fabefb9402", 1866013),
    WeightFile("silent-face/deploy.prototxt",
               f"{_SILENT_FACE}/resources/detection_model/deploy.prototxt",
               "9fe2f141b4baee039ed9442da2833e216af40a6ff3e639e7b39258812bcda808", 40787),
)


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt or could not be downloaded; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, spec: WeightFile) -> None:
    if not path.is_file():
        raise WeightsError(f"weight file {spec.relpath} is missing (looked for {path})")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise WeightsError(
            f"weight file {spec.relpath} at {path} is corrupt: sha256 {digest}, expected {spec.sha256}"
        )


def _download(spec: WeightFile, dest: Path, url: str, timeout_s: float) -> None:
    # Renamed into place only after the hash checks out: no half-written or wrong weights.
    try:
        tmp = download(url, dest.parent, dest.name, spec.size, timeout_s)
    except TooLargeError as exc:
        raise WeightsError(f"weight file {spec.relpath} from {url} is larger than its pinned {spec.size} "
                           "bytes") from exc
    except (OSError, ValueError) as exc:  # ValueError: urllib's word for a malformed URL (a mistyped mirror)
        raise WeightsError(f"could not download weight file {spec.relpath} from {url}: {exc}") from exc
    try:
        verify(tmp, spec)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def source_url(spec: WeightFile, mirror: str | None) -> str:
    """Where a file is downloaded from: the mirror's copy at its relative path, else the pinned upstream."""
    return f"{mirror.rstrip('/')}/{spec.relpath}" if mirror else spec.url


def obtain(source_dir: Path | None, cache_dir: Path, files: Iterable[WeightFile] = MANIFEST,
           timeout_s: float = 60.0, mirror: str | None = None) -> dict[str, Path]:
    """Return verified local paths for every weight file, keyed by relpath.

    With ``source_dir`` the files are read from there and never downloaded (a missing file is an error);
    without it they are downloaded (from ``mirror`` if given) into ``cache_dir`` unless a verified copy is there.
    """
    paths: dict[str, Path] = {}
    for spec in files:
        if source_dir is not None:
            path = source_dir / spec.relpath
            verify(path, spec)
        else:
            path = cache_dir / spec.relpath
            try:
                verify(path, spec)
            except WeightsError:
                _download(spec, path, source_url(spec, mirror), timeout_s)
        paths[spec.relpath] = path
    return paths
