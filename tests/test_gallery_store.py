"""The SQLite gallery: collections bound to a model version, atomic enrolment, restart and crash safety."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engines.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.gallery.store import EnrollMode, GalleryStore
from tests.conftest import ROOT

MEMBERS = ("m0", "m1")


def emb(seed: int, dim: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m in MEMBERS:
        v = rng.normal(size=dim).astype(np.float32)
        out[m] = v / np.linalg.norm(v)
    return out


def test_collections_are_bound_to_a_model_version(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite")
    _, created = store.create_collection("staff", "ens", "v1", MEMBERS, 4)
    assert created
    _, created = store.create_collection("staff", "ens", "v1", MEMBERS, 4)
    assert not created
    with pytest.raises(FailedPreconditionError, match="bound to model version v1"):
        store.create_collection("staff", "ens", "v2", MEMBERS, 4)
    with pytest.raises(NotFoundError):
        store.collection("nope")
    with pytest.raises(InvalidArgumentError):
        store.create_collection("", "ens", "v1", MEMBERS, 4)


def test_enrol_search_list_delete_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite"
    store = GalleryStore(path)
    store.create_collection("c", "ens", "v1", MEMBERS, 4)
    assert store.enroll("c", "alice", "Alice", [("clip0", emb(0)), ("clip1", emb(1))]).total_clips == 2
    assert store.enroll("c", "bob", "", [("clip2", emb(2))]).total_clips == 1
    assert store.enroll("c", "alice", "", [("clip3", emb(3))], EnrollMode.APPEND).total_clips == 3
    mats = store.matrices("c")
    assert mats["m0"].embeddings.shape == (4, 4) and mats["m0"].owners.count("alice") == 3
    store.close()
    again = GalleryStore(path)
    people = again.persons("c")
    assert [(p.person_id, p.display_name, p.templates) for p in people] == [("alice", "Alice", 3), ("bob", "", 1)]
    assert [p.person_id for p in again.persons("c", limit=1, after="alice")] == ["bob"]
    again.delete_person("c", "alice")
    assert [p.person_id for p in again.persons("c")] == ["bob"]
    assert again.matrices("c")["m1"].owners == ("bob",)
    with pytest.raises(NotFoundError):
        again.delete_person("c", "alice")


def test_a_failing_enrolment_writes_nothing(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite")
    store.create_collection("c", "ens", "v1", MEMBERS, 4)
    bad = {"m0": np.ones(4, np.float32), "m1": np.ones(5, np.float32)}  # wrong size for m1
    with pytest.raises(FailedPreconditionError):
        store.enroll("c", "carol", "", [("ok", emb(0)), ("bad", bad)])
    assert store.persons("c") == []


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from server.gallery.store import EnrollMode, GalleryStore
    store = GalleryStore(Path(sys.argv[1]))
    store.create_collection("c", "ens", "v1", ("m0", "m1"), 64)
    rng = np.random.default_rng(0)
    i = 0
    while True:
        clips = [(f"clip{k}", {m: rng.normal(size=64).astype(np.float32) for m in ("m0", "m1")}) for k in range(20)]
        store.enroll("c", f"p{i:06d}", "", clips)
        i += 1
        if i == 3:
            print("writing", flush=True)
""")


@pytest.mark.slow
def test_a_process_killed_during_enrolment_leaves_no_partial_person(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    store = GalleryStore(path)
    people = store.persons("c", limit=100_000)
    assert len(people) >= 3
    assert all(p.templates == 20 for p in people)  # every person whole: 20 clips each, never fewer
    assert store.matrices("c")["m0"].embeddings.shape == (20 * len(people), 64)


def test_create_never_takes_over_an_existing_person_and_append_is_explicit(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite")
    store.create_collection("c", "ens", "v1", MEMBERS, 4)
    store.enroll("c", "alice", "Alice", [("clip0", emb(0))], added_by="svc-a")
    with pytest.raises(AlreadyExistsError):
        store.enroll("c", "alice", "Mallory", [("evil", emb(1))], added_by="svc-b")
    with pytest.raises(NotFoundError):
        store.enroll("c", "nobody", "", [("x", emb(1))], EnrollMode.APPEND)
    store.enroll("c", "alice", "", [("clip1", emb(2))], EnrollMode.APPEND, added_by="svc-c")
    assert store.template_authors("c", "alice") == ["svc-a", "svc-c"]
    assert [(p.display_name, p.templates) for p in store.persons("c")] == [("Alice", 2)]


def test_a_retried_enrolment_with_the_same_key_is_stored_once(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / "g.sqlite")
    store.create_collection("c", "ens", "v1", MEMBERS, 4)
    first = store.enroll("c", "alice", "", [("clip0", emb(0))], request_key="k1")
    again = store.enroll("c", "alice", "", [("clip0-retry", emb(0))], request_key="k1")
    assert (first.total_clips, first.replayed) == (1, False)
    assert (again.total_clips, again.replayed) == (1, True)
    assert store.matrices("c")["m0"].embeddings.shape == (1, 4)
    store.delete_person("c", "alice")  # a deleted person's keys go with them: re-enrolling is not a retry
    assert store.enroll("c", "alice", "", [("clip0", emb(0))], request_key="k1").replayed is False


def test_deleted_templates_do_not_linger_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite"
    store = GalleryStore(path)
    store.create_collection("c", "ens", "v1", MEMBERS, 4)
    marker = np.full(4, 1234.5678, np.float32)  # a recognisable byte pattern
    store.enroll("c", "alice", "", [("clip0", {"m0": marker, "m1": marker})])
    store.delete_person("c", "alice")
    store.close()
    for f in tmp_path.iterdir():
        assert marker.tobytes() not in f.read_bytes(), f.name
