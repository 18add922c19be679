"""Packing an identification ensemble as one reproducible file (``make ensemble-bundle``; the format, and the
install that checks it, are ``engines/identify/bundle.py``)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO

from engines.atomic_write import write_atomically
from engines.identify import gate_set
from engines.identify.bundle import FORMAT, INDEX, MEMBER_FILES, REQUIRED_MEMBER_FILES, BundleError, checked_name
from engines.identify.ensemble import ensemble_version, manifest_path, report_path
from engines.repository import METADATA_FILE, ONNX_FILE, ModelMetadata, ModelNotFoundError
from engines.weights import sha256_file


def pack(repository: Path, out_dir: Path, name: str = "", synthetic: Path | None = None) -> tuple[Path, str]:
    """Write the ensemble ``name`` (the only one, if not named) of ``repository`` as a bundle in ``out_dir``; its
    path and sha256. With ``synthetic``, the folder of the clips it was trained on, the bundle carries their recipe
    (``engines/identify/gate_set.py``), so that a pod on another CPU type can run the identification gate."""
    try:
        path = manifest_path(repository, name)
    except ModelNotFoundError as exc:
        raise BundleError(str(exc)) from exc
    if path is None:
        raise BundleError(f"no identification ensemble in {repository / 'ensembles'} (run `make identify-models`)")
    manifest = json.loads(path.read_text())
    name = checked_name(manifest["name"], "ensemble")
    members = [checked_name(m, "member") for m in manifest["members"]]
    files: dict[str, Path] = {f"ensembles/{name}.json": path}
    for member in members:
        folder = repository / member
        for required in REQUIRED_MEMBER_FILES:
            if not (folder / required).is_file():
                raise BundleError(f"member {member} has no {required} in {folder}")
        files.update({f"{member}/{f}": folder / f for f in MEMBER_FILES if (folder / f).is_file()})
    digests = {rel: sha256_file(file) for rel, file in files.items()}  # each file read once, here
    made: dict[str, bytes] = {}  # entries written from memory
    if synthetic is not None:
        try:
            report = json.loads(report_path(repository, name).read_text())
            recipe = gate_set.make_recipe(synthetic, report)
        except (OSError, ValueError, KeyError) as exc:  # (GateSetError is a ValueError)
            raise BundleError(f"no gate set for ensemble {name}: {exc}") from exc
        rel = gate_set.recipe_name(name)
        made[rel] = json.dumps(recipe, indent=1, sort_keys=True).encode()
        digests[rel] = hashlib.sha256(made[rel]).hexdigest()
    for member in members:
        meta = ModelMetadata.from_dict(json.loads(files[f"{member}/{METADATA_FILE}"].read_text()))
        if meta.onnx_sha256 != digests[f"{member}/{ONNX_FILE}"]:
            raise BundleError(f"member {member}: {ONNX_FILE} is not the file its {METADATA_FILE} describes")
    version = ensemble_version([digests[f"{m}/{ONNX_FILE}"] for m in members])
    if manifest["version"] != version:
        raise BundleError(f"ensemble {name}: its manifest says version {manifest['version']}, its members' ONNX "
                          f"files give {version} (retrain or re-export it)")
    sizes = {**{rel: file.stat().st_size for rel, file in files.items()}, **{rel: len(b) for rel, b in made.items()}}
    index = {"format": FORMAT, "ensemble": name, "version": version, "members": members,
             "files": {rel: {"sha256": digests[rel], "size": size} for rel, size in sizes.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}-{version}.tar.gz"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            _add(tar, INDEX, io.BytesIO(json.dumps(index, indent=2, sort_keys=True).encode()))
            for rel, file in files.items():
                with file.open("rb") as f:
                    _add(tar, rel, f)
            for rel, data in made.items():
                _add(tar, rel, io.BytesIO(data))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    digest = sha256_file(out)
    write_atomically(out.with_name(out.name + ".sha256"), f"{digest}  {out.name}\n")
    return out, digest


def _add(tar: tarfile.TarFile, name: str, data: IO[bytes]) -> None:
    """One regular file with no time, owner or mode of this machine in it: the same models pack to the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = data.seek(0, io.SEEK_END)
    data.seek(0)
    info.mode = 0o644
    tar.addfile(info, data)
