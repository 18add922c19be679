"""The identification ensemble packed as one file and installed from it (engines/identify/bundle.py): the trained
ensemble of ``make identify-models`` packed for real, and archives altered the ways a wrong or hostile mirror, a
corrupt upload or a killed install would alter them. Whatever is refused leaves nothing in the repository."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from engines.file_lock import exclusive
from engines.identify.bundle import INDEX, BundleError, install
from engines.identify.bundle_pack import pack
from engines.identify.ensemble import ensemble_version, find_ensemble
from engines.machine import is_this_type
from engines.precision import GATE_LOCK, stored_verdicts
from engines.repository import ModelRepository
from engines.weights import sha256_file
from tests.conftest import _need, run_together, serve_folder
from tests.served import gated_precisions
from tests.verdicts import OTHER_CPU, move_to_another_type

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def source(repository_dir: Path) -> Path:
    if find_ensemble(repository_dir) is None:
        _need(f"a trained identification ensemble in {repository_dir} (make identify-models)")
    return repository_dir


@pytest.fixture(scope="module")
def bundle(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return pack(source, tmp_path_factory.mktemp("dist"))


def installed_files(repository: Path) -> list[str]:
    """What an install left in the repository, but for the lock file that every process may make."""
    return sorted(str(p.relative_to(repository)) for p in repository.rglob("*") if p.name != ".ensemble.lock")


def members(repository: Path) -> tuple[str, ...]:
    ensemble = find_ensemble(repository)
    assert ensemble is not None
    return ensemble.members


def test_a_bundle_packs_reproducibly_and_installs_the_trained_ensemble(
        source: Path, bundle: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = bundle
    again, digest_again = pack(source, tmp_path / "again")
    assert digest_again == digest and again.read_bytes() == archive.read_bytes()
    assert (archive.parent / f"{archive.name}.sha256").read_text() == f"{digest}  {archive.name}\n"

    repository = tmp_path / "repository"
    done = install(str(archive), digest, repository)
    assert done.changed and find_ensemble(repository) == find_ensemble(source)
    for member in members(source):
        assert sha256_file(repository / member / "model.onnx") == sha256_file(source / member / "model.onnx")
        # The gates' verdicts travel with the models: on this CPU type the same precisions may serve them.
        assert gated_precisions(repository, member) == gated_precisions(source, member)
    stamps = {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}

    # A restart (or a second replica) with the same archive writes nothing.
    assert not install(str(archive), digest, repository).changed
    assert {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()} == stamps
    # Unless a member was lost since (a volume tidied by hand): then it is installed again.
    shutil.rmtree(repository / members(source)[-1])
    assert install(str(archive), digest, repository).changed
    assert sha256_file(repository / members(source)[-1] / "model.onnx") == sha256_file(
        source / members(source)[-1] / "model.onnx")


def test_replicas_installing_together_install_it_once(bundle: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = bundle
    script = ("import sys; from pathlib import Path; from engines.identify.bundle import install; "
              "print(install(sys.argv[1], sys.argv[2], Path(sys.argv[3])).changed)")
    outputs = run_together(script, str(archive), digest, str(tmp_path / "shared"), copies=3)
    assert sorted(o.strip() for o in outputs) == ["False", "False", "True"]


def test_an_install_keeping_a_member_adds_the_bundles_verdicts_for_other_cpu_types(
        source: Path, bundle: tuple[Path, str], tmp_path: Path) -> None:
    """A volume whose members were gated on another CPU type gets a bundle with the same members (a new ensemble
    version that left them unchanged): they are kept, with both types' verdicts, and serve here as packed."""
    archive, digest = bundle
    repository = tmp_path / "repository"
    install(str(archive), digest, repository)
    ensemble = find_ensemble(repository)
    assert ensemble is not None
    theirs = {m: move_to_another_type(repository / m) for m in ensemble.members}
    assert all(gated_precisions(repository, m) == {"fp32"} for m in ensemble.members)
    (repository / "ensembles" / f"{ensemble.name}.bundle").unlink()  # as if another archive held these members
    assert install(str(archive), digest, repository).changed
    for member in ensemble.members:
        verdicts = stored_verdicts(repository / member)
        assert verdicts[OTHER_CPU] == theirs[member] and [is_this_type(t) for t in verdicts if t != OTHER_CPU] == [True]
        assert gated_precisions(repository, member) == gated_precisions(source, member)


def test_an_install_waits_while_a_gate_runs(bundle: tuple[Path, str], tmp_path: Path) -> None:
    """A gate (another replica's) measures the members' files and writes verdicts beside them: an install puts new
    members in place only after it."""
    archive, digest = bundle
    repository = tmp_path / "repository"
    done = threading.Event()

    def install_then_say() -> None:
        install(str(archive), digest, repository)
        done.set()

    thread = threading.Thread(target=install_then_say)
    with exclusive(repository / GATE_LOCK):
        thread.start()
        assert not done.wait(5.0)  # (unpacked and checked in about a second, then waiting)
        assert find_ensemble(repository) is None
    assert done.wait(120.0)
    thread.join()
    assert find_ensemble(repository) is not None


def test_a_bundle_is_downloaded_from_a_mirror_within_its_size_limit(bundle: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = bundle
    with serve_folder(archive.parent) as mirror:
        too_small = tmp_path / "limited"
        with pytest.raises(BundleError, match="larger than"):
            install(mirror + archive.name, digest, too_small, max_bytes=archive.stat().st_size - 1)
        with pytest.raises(BundleError, match="could not download"):
            install(mirror + "missing.tar.gz", digest, too_small)
        assert installed_files(too_small) == []  # no partial download left behind
        assert install(mirror + archive.name, digest, tmp_path / "downloaded").changed
    assert find_ensemble(tmp_path / "downloaded") is not None


def test_a_bundle_that_is_not_the_pinned_one_is_not_read(bundle: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = bundle
    other = "0" * 64
    with pytest.raises(BundleError, match=f"has sha256 {digest}, not the pinned {other}"):
        install(str(archive), other, tmp_path)
    with pytest.raises(BundleError, match="not 64 hex digits"):
        install(str(archive), digest[:20], tmp_path)
    assert installed_files(tmp_path) == []


def entries_of(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar}  # type: ignore[union-attr]


def write_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> str:
    """A .tar.gz of these entries in this order (a name and its bytes, or a TarInfo with no data); its sha256."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    path.write_bytes(raw.getvalue())
    return sha256_file(path)


def reindexed(files: dict[str, bytes]) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    """``files`` with an index that states their real sizes and sha256s (what a careful forger would write)."""
    import hashlib

    index = json.loads(files[INDEX])
    index["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in files.items()
                      if n != INDEX}
    return [(INDEX, json.dumps(index).encode()), *((n, b) for n, b in files.items() if n != INDEX)]


def _member_onnx(files: dict[str, bytes]) -> str:
    return next(n for n in files if n.endswith("/model.onnx"))


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _escape(f: dict[str, bytes]) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    return [*reindexed(f), ("../escaped.txt", b"x")]


def _swapped_onnx(f: dict[str, bytes]) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    return reindexed({**f, _member_onnx(f): f[_member_onnx(f)] + b"\0"})


def _wrong_version(f: dict[str, bytes]) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    name = next(n for n in f if n.startswith("ensembles/"))
    return reindexed({**f, name: json.dumps({**json.loads(f[name]), "version": "0" * 16}).encode()})


def _unindexed_content(f: dict[str, bytes]) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    entries = reindexed(f)
    name = _member_onnx(f)
    return [(n, b[:-1] + bytes([b[-1] ^ 1])) if n == name else (n, b) for n, b in entries]  # type: ignore[misc]


ALTERED: dict[str, tuple[Callable[[dict[str, bytes]], list[tarfile.TarInfo | tuple[str, bytes]]], str]] = {
    "an entry outside the repository": (_escape, "'../escaped.txt', which its bundle.json does not name"),
    "a symbolic link": (lambda f: [*reindexed(f), _link("slowfast_cpu_m9", "/etc")], "not a regular file"),
    "an ONNX file its metadata does not describe": (_swapped_onnx, "does not describe its model.onnx"),
    "a manifest version its members do not give": (_wrong_version, "the members' ONNX files give"),
    "a file that is not the one its index states": (_unindexed_content, "does not match its sha256"),
    "a file its index names but it lacks": (lambda f: reindexed(f)[:-1], "lacks"),
    "no index first (a tar of the repository)": (lambda f: reindexed(f)[1:], "does not start with its bundle.json"),
}


@pytest.mark.parametrize("case", ALTERED)
def test_an_altered_bundle_is_refused_and_writes_nothing(case: str, bundle: tuple[Path, str],
                                                         tmp_path: Path) -> None:
    alter, reason = ALTERED[case]
    altered = tmp_path / "altered.tar.gz"
    digest = write_tar(altered, alter(entries_of(bundle[0])))  # pinned: only the content checks stand in the way
    repository = tmp_path / "repository"
    with pytest.raises(BundleError, match=reason):
        install(str(altered), digest, repository)
    assert installed_files(repository) == [] and not (tmp_path / "escaped.txt").exists()


def test_bytes_that_are_not_a_bundle_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(BundleError, match="cannot be read"):
        install(str(junk), sha256_file(junk), tmp_path / "repository")
    assert installed_files(tmp_path / "repository") == []


def retrained(source: Path, into: Path) -> Path:
    """A copy of the source's ensemble whose first member is another ONNX file (the same graph with a note added),
    with its metadata and the manifest's version made to match: another version, as a retraining gives."""
    for member in members(source):
        (into / member).mkdir(parents=True)
        for name in ("metadata.json", "model.onnx"):
            shutil.copy(source / member / name, into / member / name)
    first = members(source)[0]
    model = onnx.load(str(into / first / "model.onnx"))
    model.doc_string = "retrained"
    onnx.save(model, str(into / first / "model.onnx"))
    meta: dict[str, Any] = json.loads((into / first / "metadata.json").read_text())
    meta["onnx_sha256"] = sha256_file(into / first / "model.onnx")
    (into / first / "metadata.json").write_text(json.dumps(meta))
    repo = ModelRepository(into)
    manifest = json.loads(next((source / "ensembles").glob("*.json")).read_text())
    manifest["version"] = ensemble_version([repo.load(m).onnx_sha256 for m in manifest["members"]])
    (into / "ensembles").mkdir()
    (into / "ensembles" / f"{manifest['name']}.json").write_text(json.dumps(manifest))
    return into


def test_a_new_version_replaces_the_old_and_an_interrupted_install_serves_none(
        source: Path, bundle: tuple[Path, str], tmp_path: Path) -> None:
    archive, digest = bundle
    repository = tmp_path / "repository"
    install(str(archive), digest, repository)
    first, *others = members(source)
    for member in (first, *others):  # what the server adds beside a model: a measurement, a compiled cache
        (repository / member / "cpu-runtime.json").write_text("{}")

    new_archive, new_digest = pack(retrained(source, tmp_path / "retrained"), tmp_path / "dist")
    done = install(str(new_archive), new_digest, repository)
    ensemble = find_ensemble(repository)
    assert done.changed and ensemble is not None and ensemble.version == done.version
    assert ensemble.version != find_ensemble(source).version  # type: ignore[union-attr]
    # The changed member is replaced whole (what was derived from the old model goes with it); the others, the same
    # models, keep theirs.
    assert not (repository / first / "cpu-runtime.json").exists()
    assert all((repository / m / "cpu-runtime.json").exists() for m in others)
    assert sha256_file(repository / first / "model.onnx") == sha256_file(tmp_path / "retrained" / first / "model.onnx")

    # Killed midway: the manifest goes first, so what is left is no ensemble (never a manifest naming other files),
    # with a replaced member and a staging folder lying about. The next start installs it again and tidies up.
    manifest = next((repository / "ensembles").glob("*.json"))
    manifest.unlink()
    (repository / first).rename(repository / f".{first}.replaced-1234")
    (repository / ".ensemble-stage").mkdir()
    assert find_ensemble(repository) is None
    assert install(str(new_archive), new_digest, repository).changed
    assert find_ensemble(repository) == ensemble
    assert not list(repository.glob(".*.replaced-*")) and not list(repository.glob(".ensemble-*"))
