"""An identification ensemble as one file: packed where it was trained, installed where it is served.

No SlowFast weights exist, so the ensemble is the project's own model, and every replica that shares a gallery must
embed with the same one: a collection records the ensemble version its templates came from. Pods therefore do not
train one each: that takes the synthetic clips and minutes, and on another CPU type need not give the same weights.
It is trained once (``make identify-models``), packed (``make ensemble-bundle``), and every pod installs that same
file at start (``docker/entrypoint.sh``: ``FACEGATE_ENSEMBLE``, a path or an http(s) URL, and its pinned
``FACEGATE_ENSEMBLE_SHA256``).

``python -m engines.identify.bundle pack --repository R --out DIR`` (``engines/identify/bundle_pack.py``) writes
``DIR/<name>-<version>.tar.gz`` and its ``.sha256``. The archive is reproducible (sorted entries, no times or
owners), so packing the same models again gives the same sha256. It holds ``bundle.json`` (every other entry's
sha256 and size), the manifest ``ensembles/<name>.json`` and, per member, ``metadata.json`` and ``model.onnx``,
with its INT8 file and gate verdicts where the gates ran (each CPU type's, named). Packed with
``--synthetic`` (as ``make ensemble-bundle`` does), it also holds ``ensembles/<name>.gate-set``, the recipe of the
synthetic clips the ensemble was evaluated on, from which a pod on another CPU type runs the identification gate
(``engines/identify/gate_set.py``); without it, another type serves the members in FP32.

``python -m engines.identify.bundle install SOURCE --sha256 HEX --repository R`` checks the archive's sha256 before
reading it (a mirror is trusted for nothing but availability), unpacks only the entries ``bundle.json`` names, each
within its stated size, into a staging folder in the repository, checks every file and that the members' ONNX
files give the manifest's version, and only then puts it in place, the manifest last. An interrupted install
leaves no ensemble (IdentificationService says FAILED_PRECONDITION), never one whose manifest names other files; the
next start installs it again. Replicas on a shared volume take turns, and one that finds the same archive installed
does nothing. Members are put in place only while no parity gate runs (``precision.GATE_LOCK``): a gate measures
the members' files and writes its verdicts beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from engines.atomic_write import write_atomically
from engines.download import TooLargeError, download
from engines.file_lock import exclusive
from engines.identify import gate_set
from engines.identify.ensemble import ensemble_version
from engines.precision import GATE_FILE, GATE_LOCK, INT8_FILE, adopt_verdicts
from engines.repository import METADATA_FILE, ONNX_FILE, ModelMetadata, ModelRepository
from engines.weights import sha256_file

log = logging.getLogger(__name__)

INDEX = "bundle.json"
FORMAT = 1
MEMBER_FILES = (METADATA_FILE, ONNX_FILE, INT8_FILE, GATE_FILE)  # in this order in the archive
REQUIRED_MEMBER_FILES = (METADATA_FILE, ONNX_FILE)
# Bounds before anything is read: the archive as downloaded, the files it unpacks to, the index, the entry count.
MAX_BUNDLE_BYTES = 1 << 30
MAX_UNPACKED_BYTES = 4 << 30
MAX_INDEX_BYTES = 1 << 20
MAX_ENTRIES = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(RuntimeError):
    """The bundle is missing, not the pinned one, malformed or inconsistent; the message says which and why."""


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    changed: bool  # False: this archive was already installed, nothing was written


def checked_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BundleError(f"{what} {name!r} is not a plain name (letters, digits, '_', '.', '-')")
    return name


# -- install -------------------------------------------------------------------------------------------------------

def _marker(repository: Path, name: str) -> Path:
    # Not *.json: find_ensemble reads every ensembles/*.json as a manifest.
    return repository / "ensembles" / f"{name}.bundle"


def _already_installed(repository: Path, sha256: str) -> Installed | None:
    """The ensemble this archive installed, if it is still in place (its marker and its manifest's version)."""
    folder = repository / "ensembles"
    for marker in sorted(folder.glob("*.bundle")) if folder.is_dir() else []:
        try:
            record = json.loads(marker.read_text())
            manifest = json.loads((folder / f"{record['ensemble']}.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        in_place = all((repository / m / f).is_file()
                       for m in manifest.get("members", []) for f in REQUIRED_MEMBER_FILES)
        if record.get("sha256") == sha256 and manifest.get("version") == record.get("version") and in_place:
            return Installed(record["ensemble"], record["version"], changed=False)
    return None


def _is_url(source: str) -> bool:
    return re.match(r"(?i)https?://", source) is not None


def _fetch(source: str, sha256: str, into: Path, max_bytes: int, timeout_s: float) -> Path:
    """The archive as a local file whose sha256 is ``sha256``: ``source`` itself, or downloaded into ``into`` (the
    caller removes the download)."""
    if _is_url(source):
        try:
            path = download(source, into, ".ensemble-", max_bytes, timeout_s)
        except TooLargeError as exc:
            raise BundleError(f"the ensemble bundle at {source} is larger than {max_bytes} bytes") from exc
        except (OSError, ValueError) as exc:  # ValueError: urllib's word for a malformed URL
            raise BundleError(f"could not download the ensemble bundle from {source}: {exc}") from exc
    else:
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise BundleError(f"the ensemble bundle {path} is not a file")
        if path.stat().st_size > max_bytes:
            raise BundleError(f"the ensemble bundle {path} is larger than {max_bytes} bytes")
    digest = sha256_file(path)
    if digest != sha256:
        if _is_url(source):
            path.unlink(missing_ok=True)
        raise BundleError(f"the ensemble bundle from {source} has sha256 {digest}, not the pinned {sha256}")
    return path


def _entries(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    for count, info in enumerate(tar, 1):
        if count > MAX_ENTRIES:
            raise BundleError(f"the bundle has more than {MAX_ENTRIES} entries")
        if not info.isreg():  # links, devices, folders: a bundle holds plain files only
            raise BundleError(f"the bundle's entry {info.name!r} is not a regular file")
        data = tar.extractfile(info)
        assert data is not None  # a regular file always has data
        yield info, data


def _index(info: tarfile.TarInfo, data: IO[bytes]) -> dict[str, Any]:
    if info.name != INDEX or info.size > MAX_INDEX_BYTES:
        raise BundleError(f"the bundle does not start with its {INDEX} (found {info.name!r}): not an ensemble bundle")
    try:
        index = json.loads(data.read())
        ok = index["format"] == FORMAT and isinstance(index["files"], dict) and isinstance(index["members"], list)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"the bundle's {INDEX} is malformed: {exc}") from exc
    if not ok:
        raise BundleError(f"the bundle's {INDEX} is not format {FORMAT}")
    name = checked_name(index.get("ensemble"), "ensemble")
    members = [checked_name(m, "member") for m in index["members"]]
    allowed = ({f"ensembles/{name}.json", gate_set.recipe_name(name)}
               | {f"{m}/{f}" for m in members for f in MEMBER_FILES})
    total = 0
    for rel, entry in index["files"].items():
        if rel not in allowed:
            raise BundleError(f"the bundle's {INDEX} names {rel!r}, which is not a file of an ensemble")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise BundleError(f"the bundle's {INDEX} has no valid size and sha256 for {rel!r}")
        total += entry["size"]
    if total > MAX_UNPACKED_BYTES:
        raise BundleError(f"the bundle would unpack to {total} bytes (at most {MAX_UNPACKED_BYTES})")
    return index


def _unpack(archive: Path, staging: Path) -> dict[str, Any]:
    """Every file the index names, into ``staging``, each checked against its size and sha256; the index."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            entries = _entries(tar)
            first = next(entries, None)
            if first is None:
                raise BundleError("the bundle is empty")
            index = _index(*first)
            files: dict[str, dict[str, Any]] = index["files"]
            seen: set[str] = set()
            for info, data in entries:
                expected = files.get(info.name)
                if expected is None or info.name in seen:
                    raise BundleError(f"the bundle holds {info.name!r}, which its {INDEX} does not name once")
                if info.size != expected["size"]:
                    raise BundleError(f"{info.name} is {info.size} bytes in the bundle, {expected['size']} in its "
                                      f"{INDEX}")
                seen.add(info.name)
                dest = staging / info.name  # safe: the name is one of the index's fixed forms
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with dest.open("wb") as out:
                    while chunk := data.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != expected["sha256"]:
                    raise BundleError(f"{info.name} in the bundle does not match its sha256 in {INDEX}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # (gzip.BadGzipFile is an OSError)
        raise BundleError(f"the bundle {archive} cannot be read: {exc}") from exc
    if missing := sorted(set(files) - seen):
        raise BundleError(f"the bundle lacks {', '.join(missing)}, which its {INDEX} names")
    _check_ensemble(staging, index)
    return index


def _check_ensemble(staging: Path, index: dict[str, Any]) -> None:
    """The unpacked files make the ensemble the index says: the manifest's name, members and version agree with the
    members' ONNX files."""
    name, members = index["ensemble"], index["members"]
    try:
        manifest = json.loads((staging / "ensembles" / f"{name}.json").read_text())
        metas = {m: ModelMetadata.from_dict(json.loads((staging / m / METADATA_FILE).read_text())) for m in members}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"the bundle's ensemble {name} is incomplete or malformed: {exc}") from exc
    if manifest.get("name") != name or manifest.get("members") != members:
        raise BundleError(f"the bundle's manifest does not name ensemble {name} with members {members}")
    shas = []
    for m in members:
        entry = index["files"].get(f"{m}/{ONNX_FILE}")
        if entry is None:
            raise BundleError(f"the bundle has no {ONNX_FILE} for member {m}")
        sha = entry["sha256"]  # checked against the unpacked bytes as they were written
        if metas[m].onnx_sha256 != sha or metas[m].name != m:
            raise BundleError(f"member {m}: its {METADATA_FILE} does not describe its {ONNX_FILE}")
        shas.append(sha)
    version = ensemble_version(shas)
    if manifest.get("version") != version or index.get("version") != version:
        raise BundleError(f"ensemble {name}: the manifest says version {manifest.get('version')}, the members' "
                          f"ONNX files give {version}")


def _same_model(a: Path, b: Path) -> bool:
    """Both folders hold the same ONNX file (what a member's derived files, measurements and verdicts rest on)."""
    try:
        return (json.loads((a / METADATA_FILE).read_text())["onnx_sha256"]
                == json.loads((b / METADATA_FILE).read_text())["onnx_sha256"] == sha256_file(a / ONNX_FILE))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _put_in_place(repository: Path, staging: Path, index: dict[str, Any], sha256: str) -> None:
    name, members = index["ensemble"], index["members"]
    folder = repository / "ensembles"
    folder.mkdir(parents=True, exist_ok=True)
    # The manifest goes first and comes back last: until the members are all in place there is no ensemble to serve.
    _marker(repository, name).unlink(missing_ok=True)
    (folder / f"{name}.json").unlink(missing_ok=True)
    for member in members:
        target = repository / member
        if target.is_dir() and _same_model(target, staging / member):
            # The same model: keep its compiled caches, measurements and verdicts (each checked against its ONNX),
            # and add the bundle's verdicts for CPU types the volume has none for.
            adopt_verdicts(ModelRepository(repository), member, staging / member)
            continue
        if target.exists():
            target.rename(repository / f".{member}.replaced-{os.getpid()}")
        (staging / member).rename(target)
    recipe = gate_set.recipe_name(name)
    if (staging / recipe).is_file():
        (staging / recipe).replace(repository / recipe)
    else:  # a bundle without one: an earlier bundle's recipe describes other models
        (repository / recipe).unlink(missing_ok=True)
    (staging / "ensembles" / f"{name}.json").replace(folder / f"{name}.json")
    write_atomically(_marker(repository, name), json.dumps({"ensemble": name, "version": index["version"],
                                                            "sha256": sha256}))
    _remove_leftovers(repository)


def _remove_leftovers(repository: Path) -> None:
    """Folders an earlier install (perhaps killed) left: replaced members, staging folders, partial downloads."""
    for path in repository.glob(".*"):
        if ".replaced-" in path.name or path.name.startswith(".ensemble-"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def install(source: str, sha256: str, repository: Path, max_bytes: int = MAX_BUNDLE_BYTES,
            timeout_s: float = 120.0) -> Installed:
    """Install the bundle at ``source`` (a path or an http(s) URL) whose sha256 is ``sha256`` into ``repository``;
    nothing is written there unless the whole bundle checks out."""
    sha256 = sha256.strip().lower()
    if not _SHA256.fullmatch(sha256):
        raise BundleError(f"the pinned sha256 {sha256!r} is not 64 hex digits")
    repository.mkdir(parents=True, exist_ok=True)
    if found := _already_installed(repository, sha256):
        return found
    with exclusive(repository / ".ensemble.lock"):
        if found := _already_installed(repository, sha256):  # another replica installed it while this one waited
            return found
        _remove_leftovers(repository)
        archive = _fetch(source, sha256, repository, max_bytes, timeout_s)
        staging = Path(tempfile.mkdtemp(dir=repository, prefix=".ensemble-"))
        try:
            index = _unpack(archive, staging)
            # Not while a gate runs (another replica's): it measures the members' files, and its verdicts must be
            # about the files they will sit beside.
            with exclusive(repository / GATE_LOCK):
                _put_in_place(repository, staging, index, sha256)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if _is_url(source):
                archive.unlink(missing_ok=True)
        return Installed(index["ensemble"], index["version"], changed=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.identify.bundle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the trained ensemble as one reproducible archive")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--ensemble", default="", help="its name (default: the only one)")
    p.add_argument("--out", type=Path, default=Path("dist"))
    p.add_argument("--synthetic", type=Path, help="the synthetic clips it was trained on: the bundle then carries "
                   "their recipe, for the identification gate on other CPU types")
    i = sub.add_parser("install", help="check a bundle against its pinned sha256 and install it")
    i.add_argument("source", help="a path, or an http(s) URL")
    i.add_argument("--sha256", required=True, help="the bundle's sha256, as `pack` printed it")
    i.add_argument("--repository", type=Path, default=Path("model_repository"))
    i.add_argument("--max-bytes", type=int, default=MAX_BUNDLE_BYTES, help="refuse a larger archive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command == "pack":
            from engines.identify.bundle_pack import pack  # (here: bundle_pack imports this module)

            path, digest = pack(args.repository, args.out, args.ensemble, args.synthetic)
            print(f"{digest}  {path}")
            return 0
        done = install(args.source, args.sha256, args.repository, args.max_bytes)
    except BundleError as exc:
        print(f"ensemble bundle: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the repository (or --out) cannot be written: a read-only volume, a full disk
        print(f"ensemble bundle: cannot write there: {exc}", file=sys.stderr)
        return 2
    print(f"ensemble {done.name} version {done.version}: "
          f"{'installed' if done.changed else 'already installed, nothing to do'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
