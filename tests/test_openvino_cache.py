"""Compiled OpenVINO models kept between starts: a second load imports them, with outputs identical to a fresh
compile; a blob that cannot be imported, or a directory that cannot be written, costs only the compile; blobs
no load used for the age are pruned."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from engines.declarations import declaration_for
from engines.repository import ModelRepository
from engines.runtime.openvino_cache import LOCK_FILE, SUFFIX, CompiledCache
from engines.runtime.openvino_engine import OpenVinoModel
from tests.conftest import run_together

pytestmark = pytest.mark.weights

NAME = "minifasnet_v2"


def outputs(model: OpenVinoModel, item: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs at batch 1 and 2 (static models here) and 3 (the dynamic model)."""
    inst = model.new_instance()
    rng = np.random.default_rng(0)
    got: list[np.ndarray] = []
    for batch in (1, 2, 3):
        x = {k: rng.uniform(0, 255, (batch, *v.shape)).astype(v.dtype) for k, v in item.items()}
        out, _ = inst.infer(x)
        got.extend(out[k] for k in sorted(out))
    return got


def test_a_second_load_imports_what_the_first_compiled(repository_dir: Path, tmp_path: Path) -> None:
    repo = ModelRepository(repository_dir)
    meta = repo.load(NAME)
    item = declaration_for(meta).warmup_item()
    fresh = outputs(OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2)), item)
    first = CompiledCache(tmp_path / "cache")
    a = OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=first)
    assert (first.hits, first.misses) == (0, 3)  # the dynamic model and batches 1 and 2
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))
    second = CompiledCache(tmp_path / "cache")
    b = OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=second)
    assert (second.hits, second.misses) == (3, 0)
    assert b.static_batches == (1, 2)
    for x, y, z in zip(fresh, outputs(a, item), outputs(b, item), strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    # Another configuration is another compiled model, not the one cached for the first.
    other = CompiledCache(tmp_path / "cache")
    OpenVinoModel(repo.onnx_path(NAME), meta, threads=2, static_batches=(1, 2), cache=other)
    assert (other.hits, other.misses) == (0, 3)
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 6


def test_a_bad_blob_is_compiled_again_and_replaced(repository_dir: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    repo = ModelRepository(repository_dir)
    meta = repo.load(NAME)
    item = declaration_for(meta).warmup_item()
    fresh = outputs(OpenVinoModel(repo.onnx_path(NAME), meta), item)
    OpenVinoModel(repo.onnx_path(NAME), meta, cache=CompiledCache(tmp_path))
    (blob,) = tmp_path.glob(f"*{SUFFIX}")
    blob.write_bytes(blob.read_bytes()[:1000])  # cut short, as a full disk might have left it
    cache = CompiledCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = OpenVinoModel(repo.onnx_path(NAME), meta, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and "compiling it again" in caplog.text
    assert all(np.array_equal(x, y) for x, y in zip(fresh, outputs(model, item), strict=True))
    again = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, cache=again)
    assert (again.hits, again.misses) == (1, 0)


def set_age(path: Path, days: float) -> None:
    """Access and modification times ``days`` ago (the prune reads the modification time)."""
    os.utime(path, (time.time() - days * 86400,) * 2)


def test_blobs_unused_for_the_age_and_stale_temporary_files_are_pruned(repository_dir: Path,
                                                                         tmp_path: Path) -> None:
    """An import refreshes its blob, so the blobs a load uses are never pruned however old they were; blobs nothing
    used for the age, and temporary files a killed writer left, go; anything else in the directory stays."""
    repo = ModelRepository(repository_dir)
    meta = repo.load(NAME)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=CompiledCache(tmp_path))
    in_use = sorted(tmp_path.glob(f"*{SUFFIX}"))
    files = {"old.blob": 40, "recent.blob": 20, ".old.1.tmp": 1, ".writing.2.tmp": 0, "notes.txt": 400}
    for name, age in files.items():
        (tmp_path / name).write_bytes(b"x" * 1000)
        set_age(tmp_path / name, age)
    for blob in in_use:
        set_age(blob, 90)
    cache = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=cache)
    assert cache.hits == 3
    assert cache.prune(30 * 86400) == (2, 2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [b.name for b in in_use] + ["recent.blob", ".writing.2.tmp", "notes.txt", LOCK_FILE])
    again = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=again)
    assert (again.hits, again.misses) == (3, 0)


def test_a_directory_that_cannot_be_written_only_costs_the_compile(repository_dir: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    repo = ModelRepository(repository_dir)
    meta = repo.load(NAME)
    (tmp_path / "a-file").write_text("not a directory")
    cache = CompiledCache(tmp_path / "a-file" / "cache")  # root may write anywhere, but not under a file
    with caplog.at_level(logging.WARNING):
        model = OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=cache)
    assert model.static_batches == (1, 2) and cache.misses == 3
    assert caplog.text.count("are not cached") == 1  # said once, not once per compiled model
    assert outputs(model, declaration_for(meta).warmup_item())
    assert cache.prune(0) == (0, 0)  # nothing to read there is nothing to prune, not an error


def test_the_server_setting_caches_each_model_beside_it_and_says_so(repository_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import shutil
    from dataclasses import replace

    from engines.declarations import ONNXRUNTIME, OPENVINO
    from engines.runtime.factory import EngineFactory, RuntimeSettings
    from engines.runtime.openvino_cache import DIRECTORY

    shutil.copytree(repository_dir / NAME, tmp_path / NAME, ignore=shutil.ignore_patterns("engines", DIRECTORY))
    repo = ModelRepository(tmp_path)
    decl = declaration_for(repo.load(NAME))
    batching = replace(decl.batching, max_batch_size=2)
    off = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO, openvino_cache=False))
    off.create(decl, batching)
    assert not (tmp_path / NAME / DIRECTORY).exists()
    on = EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=OPENVINO))
    with caplog.at_level(logging.INFO, logger="engines.runtime.factory"):
        on.create(decl, batching)
        on.create(decl, batching)
    assert f"{NAME}: 0 compiled model(s) imported from {tmp_path / NAME / DIRECTORY}, 3 compiled" in caplog.text
    assert f"{NAME}: 3 compiled model(s) imported from {tmp_path / NAME / DIRECTORY}, 0 compiled" in caplog.text
    # A blob of an older OpenVINO, unused for 40 days, goes at the next load; the three in use stay.
    stray = tmp_path / NAME / DIRECTORY / f"{'0' * 32}{SUFFIX}"
    stray.write_bytes(b"x" * 2_000_000)
    set_age(stray, 40)
    with caplog.at_level(logging.INFO, logger="engines.runtime.factory"):
        on.create(decl, batching)
    assert f"{NAME}: removed 1 stale cache file(s), 2.0 MB (compiled models no start imported for 30" in caplog.text
    assert not stray.exists() and len(list((tmp_path / NAME / DIRECTORY).glob(f"*{SUFFIX}"))) == 3
    # A model now served by ONNX Runtime imports nothing: its blobs go once they are older than the age.
    for blob in (tmp_path / NAME / DIRECTORY).glob(f"*{SUFFIX}"):
        set_age(blob, 40)
    EngineFactory(repo, RuntimeSettings(prefer_gpu=False, cpu_runtime=ONNXRUNTIME)).create(decl, batching)
    assert not list((tmp_path / NAME / DIRECTORY).glob(f"*{SUFFIX}"))


def test_an_export_that_fails_only_costs_the_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plugin may refuse to export (OpenVINO raises its own exception types, not OSError): the compiled model is
    still returned, nothing half-written is left, and the warning is said once."""

    class Unexportable:
        def export_model(self) -> None:
            raise RuntimeError("export is not supported")

    class Core:
        def compile_model(self, model: object, device: str, config: dict[str, object]) -> Unexportable:
            return Unexportable()

    cache = CompiledCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = [cache.compile(Core(), object(), "digest", {"threads": 1}, {"input": [b, 3]}) for b in (1, 2)]
    assert all(isinstance(g, Unexportable) for g in got) and cache.misses == 2
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # nothing half-written, only the (empty) lock
    assert caplog.text.count("are not cached") == 1 and "export is not supported" in caplog.text


def test_one_repository_on_two_machine_classes_keeps_each_ones_compiled_models(
        repository_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository on a disk that servers of two CPU classes share (a volume moved between node pools): each class
    compiles and imports its own blobs (the CPU plugin compiles for the ISA it finds), and neither evicts or imports
    the other's."""
    from engines.runtime import openvino_cache

    repo = ModelRepository(repository_dir)
    meta = repo.load(NAME)
    here = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=here)
    ours = sorted(tmp_path.glob(f"*{SUFFIX}"))
    monkeypatch.setattr(openvino_cache, "machine_class", lambda: "Some Other CPU (family 23 model 1) [] x2")
    there = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=there)
    assert (there.hits, there.misses) == (0, 3)
    assert there.prune(30 * 86400) == (0, 0) and set(ours) < set(tmp_path.glob(f"*{SUFFIX}"))
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 6
    again = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=again)
    assert (again.hits, again.misses) == (3, 0)
    monkeypatch.undo()
    back = CompiledCache(tmp_path)
    OpenVinoModel(repo.onnx_path(NAME), meta, static_batches=(1, 2), cache=back)
    assert (back.hits, back.misses) == (3, 0)


_LOAD = """
import sys
from pathlib import Path
from engines.repository import ModelRepository
from engines.runtime.openvino_cache import CompiledCache
from engines.runtime.openvino_engine import OpenVinoModel
repo = ModelRepository(Path(sys.argv[1]))
cache = CompiledCache(Path(sys.argv[2]))
OpenVinoModel(repo.onnx_path(sys.argv[3]), repo.load(sys.argv[3]), static_batches=(1, 2), cache=cache)
print(cache.hits, cache.misses)
"""


def test_processes_starting_together_compile_each_model_once(repository_dir: Path, tmp_path: Path) -> None:
    """Two workers loading at once: one compiles the three models while the other waits, then imports them."""
    counts = sorted(tuple(map(int, out.split())) for out in run_together(_LOAD, str(repository_dir),
                                                                          str(tmp_path / "cache"), NAME))
    assert counts == [(0, 3), (3, 0)]
    assert len(list((tmp_path / "cache").glob(f"*{SUFFIX}"))) == 3
