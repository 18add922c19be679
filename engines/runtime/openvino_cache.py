"""Compiled OpenVINO models kept on disk, so a server that starts again imports what it compiled before.

Compiling is most of a server's start: each SlowFast member is compiled nine times (its dynamic model and the static
batch sizes 1-8), 7.3-8.2 s an INT8 member on the AVX2 EPYC, against 1.2-1.4 s to import the same nine. The blobs
are OpenVINO's own export (``CompiledModel.export_model``/``Core.import_model``); their outputs are bit-identical to
a fresh compile's (tested). OpenVINO's ``CACHE_DIR`` does the same, but it writes each blob in place, so a second
worker process starting beside the first could import a half-written one. Here a blob is written under a temporary
name and renamed, so a reader sees a whole blob or none. The key covers everything that changes the compiled model:
the file's bytes, the input shapes, the compile configuration, OpenVINO's version and the machine class (the CPU
plugin compiles for the ISA it finds). A blob that cannot be imported is compiled again and replaced; a directory
that cannot be written (a read-only repository), or an export that fails, only costs the compile, with one
warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.atomic_write import write_atomically
from engines.file_lock import once
from engines.machine import machine_class

log = logging.getLogger(__name__)

SUFFIX = ".blob"
DIRECTORY = "openvino-cache"  # in each model's directory of the repository
TMP_SUFFIX = ".tmp"
LOCK_FILE = ".compile.lock"  # held while a process compiles into the directory (never pruned: it is 0 bytes)
STALE_TMP_S = 3600.0  # a blob is written in seconds: a temporary file this old was left by a killed writer


class CompiledCache:
    """One directory of compiled models (one per model in the repository: ``<model>/openvino-cache``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self._warned = False

    def key(self, source_digest: str, shapes: Mapping[str, list[int]] | None, config: Mapping[str, Any]) -> str:
        import openvino as ov

        parts = {"source": source_digest, "shapes": shapes or "dynamic", "config": dict(config),
                 "openvino": ov.__version__, "machine": machine_class()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def compile(self, core: Any, model: Any, source_digest: str, config: Mapping[str, Any],
                shapes: Mapping[str, list[int]] | None = None) -> Any:
        """``core.compile_model(model, "CPU", config)``, imported from the cache where it holds that model."""
        blob = self.directory / f"{self.key(source_digest, shapes, config)}{SUFFIX}"

        def compile_and_store() -> Any:
            compiled = core.compile_model(model, "CPU", dict(config))
            self.misses += 1
            self._store(blob, compiled)
            return compiled

        # Processes starting together on one repository (--workers) compile each model once: the first compiles
        # and stores it while the others wait, then they import its blob.
        return once(self.directory / LOCK_FILE, lambda: self._import(core, blob, config), compile_and_store)

    def _import(self, core: Any, blob: Path, config: Mapping[str, Any]) -> Any:
        """The compiled model in ``blob``, or None where there is none or it cannot be imported."""
        if not blob.is_file():
            return None
        try:
            compiled = core.import_model(io.BytesIO(blob.read_bytes()), "CPU", dict(config))
        except Exception as exc:  # OpenVINO raises its own types; a bad blob is only a cache miss
            log.warning("%s: cannot import the cached compiled model (%s); compiling it again", blob, exc)
            return None
        self.hits += 1
        with contextlib.suppress(OSError):  # in use: ``prune`` keeps it (a read-only directory cannot say)
            os.utime(blob)
        return compiled

    def _store(self, blob: Path, compiled: Any) -> None:
        try:  # (the lock made the directory, where it can be made); another process sees the whole blob or none
            write_atomically(blob, compiled.export_model().getbuffer())
        except Exception as exc:  # a full or read-only disk, or OpenVINO refusing the export: never fatal to a load
            if not self._warned:
                self._warned = True
                log.warning("%s: compiled models are not cached (%s); each start compiles them again",
                            self.directory, exc)

    def prune(self, max_age_s: float) -> tuple[int, int]:
        """Remove the blobs not imported or written for ``max_age_s`` seconds, and temporary files older than
        ``STALE_TMP_S``; (files removed, bytes freed). A blob this load used was just imported or written, so it is
        never among them; one another process is importing at that moment is only compiled again there."""
        now = time.time()
        removed, freed = 0, 0
        try:
            entries = list(self.directory.iterdir())
        except OSError:  # no directory yet, or one that cannot be read: nothing to prune
            return 0, 0
        for path in entries:
            limit = max_age_s if path.suffix == SUFFIX else STALE_TMP_S if path.suffix == TMP_SUFFIX else None
            try:
                stat = path.stat()
                if limit is None or now - stat.st_mtime <= limit:
                    continue
                path.unlink()
            except OSError:  # gone already (another process pruned it), or a read-only directory
                continue
            removed, freed = removed + 1, freed + stat.st_size
        return removed, freed
