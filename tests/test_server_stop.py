"""A stopped server lets go of its models: their weights and runtime threads go with ``stop()``, even while the
server object itself is still referenced (by a test's fixture, or by a program that embeds the server). Before,
each stopped test server kept ~1 GiB and ~90 threads until the end of the pytest session (9.5 GiB RSS and 1,068 threads
at the peak of `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engines.runtime.base import EngineError
from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.weights


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_a_stopped_server_releases_its_engines_and_their_threads(repository_dir: Path, tmp_path: Path) -> None:
    before = native_threads()
    running, thread = start_server(repository_dir, gallery_path=tmp_path / "g.sqlite")
    engines = {name: served.engine for name, served in running.server.registry.models.items()}  # type: ignore[attr-defined]
    started = native_threads()
    assert len(engines) >= 6 and started - before >= 40, (len(engines), before, started)  # the runtimes' threads
    stop_server(running, thread)
    # (gRPC's own threads, made by the first server in a process, stay: ~7)
    assert native_threads() - before <= 15, (before, started, native_threads())
    for engine in engines.values():  # still referenced here, but closed: nothing left to run on
        with pytest.raises(EngineError, match="closed"):
            engine.new_instance()
