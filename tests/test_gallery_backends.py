"""The gallery on both backends (SQLite and a real PostgreSQL): schema versions, atomic enrolment, the change log,
and the guarantee that every replica (here: independent Gallery objects with their own connections) sees the
same gallery, deletions first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.errors import AlreadyExistsError, NotFoundError
from engines.identify.matching import person_scores
from server.gallery.index import MemberIndex
from server.gallery.migrations import VERSION, SchemaError
from server.gallery.search import Gallery
from server.gallery.store import EnrollMode, GalleryStore

MEMBERS = ("m0", "m1")
DIM = 8


def emb(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m in MEMBERS:
        v = rng.normal(size=DIM).astype(np.float32)
        out[m] = v / np.linalg.norm(v)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        yield tmp_path / "g.sqlite"
        return
    cluster = request.getfixturevalue("postgres")
    url = cluster.url
    yield url
    store = GalleryStore(url)  # leave the shared database empty for the next test
    for c in store.collections():
        store.delete_collection(c.name)
    store.close()


def test_schema_is_versioned_and_a_newer_one_is_refused(target: Any) -> None:
    store = GalleryStore(target)
    with store.dialect.read() as tx:
        assert int(tx.execute("SELECT version FROM schema_version").fetchone()[0]) == VERSION
    with store.dialect.write() as tx:
        tx.execute("UPDATE schema_version SET version = ?", (VERSION + 1,))
    store.close()
    with pytest.raises(SchemaError, match=f"schema version {VERSION + 1}, newer than this server knows"):
        GalleryStore(target)
    again = GalleryStore.__new__(GalleryStore)  # put it back without migrating, for the cleanup
    from server.gallery.dialects import SqliteDialect, open_dialect

    again.dialect = SqliteDialect(target) if isinstance(target, Path) else open_dialect(target)
    with again.dialect.write() as tx:
        tx.execute("UPDATE schema_version SET version = ?", (VERSION,))
    again.close()


def test_collections_persons_and_the_change_log(target: Any) -> None:
    store = GalleryStore(target)
    store.create_collection("c", "ens", "v1", MEMBERS, DIM)
    assert store.state("c").seq == 0
    store.enroll("c", "alice", "Alice", [("k0", emb(0)), ("k1", emb(1))])
    store.enroll("c", "bob", "", [("k2", emb(2))])
    with pytest.raises(AlreadyExistsError):
        store.enroll("c", "alice", "", [("k3", emb(3))])
    store.enroll("c", "alice", "", [("k3", emb(3))], EnrollMode.APPEND)
    assert store.state("c").seq == 3
    changes = store.changes_since("c", 1)
    assert changes.seq == 3 and sorted({(s, p) for s, p, _, _ in changes.added}) == [(2, "bob"), (3, "alice")]
    store.delete_person("c", "bob")
    changes = store.changes_since("c", 3)
    assert changes.deleted == [(4, "bob")] and not changes.added
    assert [(p.person_id, p.templates) for p in store.persons("c")] == [("alice", 3)]
    assert [(c.name, c.persons) for c in store.collections()] == [("c", 1)]
    store.delete_collection("c")
    assert store.collections() == []
    with pytest.raises(NotFoundError):
        store.delete_collection("c")
    with pytest.raises(NotFoundError):
        store.state("c")
    store.close()


def test_every_replica_sees_enrolments_and_never_a_deleted_person(target: Any) -> None:
    writer = GalleryStore(target)
    replica_store = GalleryStore(target)  # another process would have its own connections, as this does
    replica = Gallery(replica_store)
    writer.create_collection("c", "ens", "v1", MEMBERS, DIM)
    writer.enroll("c", "alice", "", [("k0", emb(0))])
    probe = emb(0)
    assert next(iter(replica.search("c", probe, 5)["m0"])) == "alice"  # the replica's first search loads it
    writer.enroll("c", "bob", "", [("k1", emb(1))])
    assert next(iter(replica.search("c", emb(1), 5)["m0"])) == "bob"  # picked up from the change log
    writer.delete_person("c", "alice")
    assert "alice" not in replica.search("c", probe, 5)["m0"]  # once the delete returned, never again
    writer.delete_collection("c")
    with pytest.raises(NotFoundError):
        replica.search("c", probe, 5)
    writer.create_collection("c", "ens", "v1", MEMBERS, DIM)  # a new collection under the old name
    writer.enroll("c", "carol", "", [("k2", emb(2))])
    assert set(replica.search("c", emb(2), 5)["m0"]) == {"carol"}
    writer.close()
    replica_store.close()


def test_the_index_is_exact_through_appends_deletions_and_compaction() -> None:
    rng = np.random.default_rng(7)
    index = MemberIndex(16)
    truth: dict[str, list[np.ndarray]] = {}
    for step in range(400):
        person = f"p{rng.integers(0, 120)}"
        if rng.random() < 0.2 and truth:
            victim = sorted(truth)[int(rng.integers(0, len(truth)))]
            index.remove(victim)
            truth.pop(victim)
            continue
        e = rng.normal(size=(int(rng.integers(1, 4)), 16)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        if step % 3:
            index.add(person, e)
        else:  # the bulk path a collection's first load takes, here with another person's rows beside
            other = f"p{rng.integers(0, 120)}"
            extra = rng.normal(size=(1, 16)).astype(np.float32)
            extra /= np.linalg.norm(extra)
            index.add_many([person] * len(e) + [other], np.concatenate([e, extra]))
            truth.setdefault(other, []).extend(extra)
        truth.setdefault(person, []).extend(e)
        if step % 50 == 0:
            q = rng.normal(size=16).astype(np.float32)
            owners = [p for p, rows in truth.items() for _ in rows]
            ref = person_scores(q, np.stack([r for rows in truth.values() for r in rows]), owners)
            best = sorted(ref.items(), key=lambda kv: -kv[1])[:5]
            got = index.top_persons(q, 5)
            assert [p for p, _ in best] == list(got)
            assert np.allclose([s for _, s in best], list(got.values()), atol=1e-5)
    assert len(index) == sum(len(r) for r in truth.values())


def test_a_first_load_in_chunks_reads_every_template_once(target: Any) -> None:
    store = GalleryStore(target)
    store.create_collection("c", "ens", "v1", MEMBERS, DIM)
    for i in range(7):
        store.enroll("c", f"p{i}", "", [(f"k{i}a", emb(2 * i)), (f"k{i}b", emb(2 * i + 1))])
    store.delete_person("c", "p3")
    whole = store.changes_since("c", 0)
    parts = list(store.templates_in_chunks("c", chunk=3))
    assert len(parts) > 2 and all(len(p.added) <= 3 and not p.deleted for p in parts)
    assert {p.seq for p in parts} == {store.state("c").seq}
    assert [a for p in parts for a in p.added] == whole.added and len(whole.added) == 6 * 2 * len(MEMBERS)
    store.create_collection("empty", "ens", "v1", MEMBERS, DIM)
    assert [(p.seq, p.added) for p in store.templates_in_chunks("empty")] == [(0, [])]
    store.close()


def test_the_index_gives_the_garbage_collector_nothing_per_person() -> None:
    """A full collection stops every thread while it walks what it tracks: per-person objects that stay tracked
    made one take ~0.1 s at 1M templates. A person's rows must leave the collector's lists (tuples of ints do)."""
    import gc

    index = MemberIndex(4)
    gc.collect()
    before = len(gc.get_objects())
    n = 20_000
    index.add_many([f"p{i // 2}" for i in range(n)], np.ones((n, 4), np.float32) / 2)
    index.remove("p7")
    index.compact()
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert index.person_scores(np.ones(4, np.float32) / 2, ["p8"]) == {"p8": pytest.approx(1.0)}


def test_replicas_writing_the_same_thing_at_once_get_the_answers_one_at_a_time_would(target: Any) -> None:
    """Two replicas (two stores) do the same write at the same moment, 20 times each: create one collection,
    enrol one person, retry one enrolment. Each pair gets what it would one after the other (created / found,
    created / ALREADY_EXISTS, stored / replayed), never a database error. On PostgreSQL both used to find nothing
    and both insert, and the second failed with a unique violation."""
    import threading

    stores = [GalleryStore(target) for _ in range(2)]

    def at_once(write: Any) -> list[str]:
        barrier, out = threading.Barrier(2), ["", ""]

        def run(k: int) -> None:
            barrier.wait()
            try:
                out[k] = str(write(stores[k], k))
            except Exception as err:  # what each replica got is the point
                out[k] = type(err).__name__
        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return sorted(out)

    try:
        for i in range(20):
            made = at_once(lambda s, k: s.create_collection(f"c{i}", "ens", "v1", MEMBERS, DIM)[1])  # noqa: B023
            assert made == ["False", "True"]
            enrolled = at_once(lambda s, k: s.enroll(f"c{i}", "alice", "", [(f"clip{k}", emb(k))]).total_clips)  # noqa: B023
            assert enrolled == ["1", "AlreadyExistsError"]
            retried = at_once(lambda s, k: s.enroll(f"c{i}", "bob", "", [("clip", emb(2))],  # noqa: B023
                                                    request_key="r1").replayed)
            assert retried == ["False", "True"]
        assert [p.person_id for p in stores[0].persons("c19")] == ["alice", "bob"]
    finally:
        for s in stores:
            s.close()
