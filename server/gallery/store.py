"""The gallery: collections -> persons -> templates (one embedding per clip per ensemble member), in SQLite
(embedded default) or PostgreSQL (several replicas), with a change log replicas follow.

Durable by design: a person is written in one transaction with all of their templates and the collection's
sequence bump, so a process killed mid-enrolment leaves either the whole person or nothing, and every replica
sees either the whole change or none of it. Each collection is bound to the ensemble version whose embeddings it
holds; templates from one version are meaningless to another. Schema versions: ``server.gallery.migrations``.

Blocking by design (database calls): the server runs it on worker threads.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from server.gallery.dialects import Dialect, SqliteDialect, Tx, open_dialect, redact
from server.gallery.migrations import migrate


class EnrollMode(enum.Enum):
    CREATE = "create"  # a new person; an existing id is ALREADY_EXISTS
    APPEND = "append"  # more templates for an existing person; a missing id is NOT_FOUND


@dataclass(frozen=True)
class EnrollOutcome:
    total_clips: int  # the person's clips after the call
    replayed: bool  # the request key was seen before: nothing was written this time

_MAX_ID = 128


@dataclass(frozen=True)
class Collection:
    name: str
    ensemble: str
    model_version: str
    members: tuple[str, ...]
    embedding_dim: int


@dataclass(frozen=True)
class Person:
    person_id: str
    display_name: str
    templates: int
    created_at: float


@dataclass(frozen=True)
class GalleryMatrix:
    """A collection's templates for one member, ready for search."""

    embeddings: np.ndarray  # [N, D] float32
    owners: tuple[str, ...]


def validate_id(value: str, field: str) -> None:
    if not value or len(value) > _MAX_ID or not value.isprintable():
        raise InvalidArgumentError(FieldViolation(field, f"must be 1 to {_MAX_ID} printable characters"))


@dataclass(frozen=True)
class CollectionState:
    """What a replica checks before every search: one indexed read."""

    generation: str  # changes when the collection is deleted and created again
    seq: int  # bumped by every change, in the change's own transaction


@dataclass(frozen=True)
class CollectionSummary:
    name: str
    model_version: str
    persons: int


@dataclass(frozen=True)
class Changes:
    """What changed in a collection after a sequence number, in sequence order."""

    seq: int  # the collection's sequence these changes bring a replica to
    added: list[tuple[int, str, str, bytes]]  # (seq, person_id, member, float32 embedding bytes)
    deleted: list[tuple[int, str]]  # (seq, person_id)


_COLLECTION_ROW = "SELECT ensemble, model_version, members, embedding_dim FROM collections WHERE name = ?"


def _collection(row: Sequence[Any], name: str) -> Collection:
    return Collection(name, row[0], row[1], tuple(row[2].split(",")), int(row[3]))


class GalleryStore:
    """The gallery in SQLite or PostgreSQL (``GalleryStore(path)`` or ``GalleryStore("postgresql://...")``).

    A person and all their templates are written in one transaction, and so is the change-log entry (the
    collection's sequence bump) that tells every replica about it. Blocking: call it from worker threads.
    """

    def __init__(self, target: Path | str) -> None:
        self.dialect: Dialect = SqliteDialect(target) if isinstance(target, Path) else open_dialect(target)
        self.url = redact(self.dialect.url)
        try:
            migrate(self.dialect)
        except BaseException:
            self.dialect.close()
            raise

    def close(self) -> None:
        self.dialect.close()

    def _lock(self, tx: Tx, collection: str) -> Collection:
        """Takes the collection for this write transaction and returns it (NotFound if it is gone): two replicas
        enrolling the same person at once on PostgreSQL both found no such person and both inserted it, and the
        second got a unique violation (INTERNAL) instead of ALREADY_EXISTS, or, retrying one request, instead of
        its replay."""
        row = tx.execute(_COLLECTION_ROW + self.dialect.row_lock, (collection,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {collection!r}")
        return _collection(row, collection)

    @staticmethod
    def _bump(tx: Tx, collection: str) -> int:
        return int(tx.execute("UPDATE collections SET seq = seq + 1 WHERE name = ? RETURNING seq",
                              (collection,)).fetchone()[0])

    # --- collections ---------------------------------------------------------------------------------------

    def create_collection(self, name: str, ensemble: str, model_version: str, members: Sequence[str],
                          embedding_dim: int) -> tuple[Collection, bool]:
        """Create, or return the existing one if it is bound to the same version. Returns (collection, created)."""
        validate_id(name, "collection")
        with self.dialect.write() as tx:
            # Inserted unless it exists, in one statement: two replicas creating it at once must not both insert
            # (on PostgreSQL the second waits for the first, then inserts nothing).
            created = tx.execute(
                "INSERT INTO collections (name, ensemble, model_version, members, embedding_dim, created_at, seq, "
                "generation) VALUES (?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT (name) DO NOTHING",
                (name, ensemble, model_version, ",".join(members), embedding_dim, time.time(),
                 uuid.uuid4().hex)).rowcount == 1
            if not created:
                existing = _collection(tx.execute(_COLLECTION_ROW, (name,)).fetchone(), name)
                if existing.model_version != model_version:
                    raise FailedPreconditionError(
                        f"collection {name!r} exists, bound to model version {existing.model_version}; "
                        f"the server runs {model_version}")
                return existing, False
        return Collection(name, ensemble, model_version, tuple(members), embedding_dim), True

    def collection(self, name: str) -> Collection:
        with self.dialect.read() as tx:
            row = tx.execute(_COLLECTION_ROW, (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {name!r}")
        return _collection(row, name)

    def collections(self) -> list[CollectionSummary]:
        with self.dialect.read() as tx:
            rows = tx.execute("SELECT c.name, c.model_version, COUNT(p.person_id) FROM collections c LEFT JOIN "
                              "persons p ON p.collection = c.name GROUP BY c.name, c.model_version "
                              "ORDER BY c.name").fetchall()
        return [CollectionSummary(r[0], r[1], int(r[2])) for r in rows]

    def delete_collection(self, name: str) -> None:
        validate_id(name, "collection")
        with self.dialect.write() as tx:
            self._lock(tx, name)
            # Children first: SQLite enforces the cascade, but explicit deletes keep both databases alike.
            tx.execute("DELETE FROM templates WHERE collection = ?", (name,))
            tx.execute("DELETE FROM persons WHERE collection = ?", (name,))
            tx.execute("DELETE FROM enrol_requests WHERE collection = ?", (name,))
            tx.execute("DELETE FROM deletions WHERE collection = ?", (name,))
            tx.execute("DELETE FROM collections WHERE name = ?", (name,))

    def state(self, collection: str) -> CollectionState:
        with self.dialect.read() as tx:
            row = tx.execute("SELECT generation, seq FROM collections WHERE name = ?", (collection,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {collection!r}")
        return CollectionState(str(row[0]), int(row[1]))

    def changes_since(self, collection: str, seq: int) -> Changes:
        """Templates added and persons deleted after ``seq`` (0: everything still there), in one snapshot."""
        # A plain read, not a write transaction (which would take SQLite's writer lock on every catch-up): rows are
        # bounded by the sequence read first, so later commits are simply left for the next sync.
        with self.dialect.read() as tx:
            now = self._seq(tx, collection)
            added = tx.execute("SELECT seq, person_id, member, embedding FROM templates WHERE collection = ? AND "
                               "seq > ? AND seq <= ? ORDER BY id", (collection, seq, now)).fetchall()
            deleted = tx.execute("SELECT seq, person_id FROM deletions WHERE collection = ? AND seq > ? AND "
                                 "seq <= ? ORDER BY seq", (collection, seq, now)).fetchall() if seq > 0 else []
        return Changes(now, [(int(a), str(p), str(m), bytes(e)) for a, p, m, e in added],
                       [(int(a), str(p)) for a, p in deleted])

    def templates_in_chunks(self, collection: str, chunk: int = 10_000) -> Iterator[Changes]:
        """Every template still there, as Changes of at most ``chunk`` templates, read by one statement.

        What a replica's first load of a collection reads. One list of a million rows held the GIL for ~0.1 s
        at a time, three times over (fetching, applying and freeing it: measured 84, 115 and 134 ms at 1M
        templates), stalling every other call; chunks bound each of those to a few milliseconds."""
        with self.dialect.read() as tx:
            now = self._seq(tx, collection)
            cur = tx.execute("SELECT seq, person_id, member, embedding FROM templates WHERE collection = ? AND "
                             "seq <= ? ORDER BY id", (collection, now))
            while rows := cur.fetchmany(chunk):
                yield Changes(now, [(int(a), str(p), str(m), bytes(e)) for a, p, m, e in rows], [])
                del rows
        # An empty collection still brings the index to its sequence.
        yield Changes(now, [], [])

    @staticmethod
    def _seq(tx: Any, collection: str) -> int:
        row = tx.execute("SELECT seq FROM collections WHERE name = ?", (collection,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {collection!r}")
        return int(row[0])

    # --- persons -------------------------------------------------------------------------------------------

    def enroll(self, collection: str, person_id: str, display_name: str,
               templates: Sequence[tuple[str, Mapping[str, np.ndarray]]], mode: EnrollMode = EnrollMode.CREATE,
               added_by: str = "", request_key: str = "") -> EnrollOutcome:
        """Create a person (CREATE) or add templates to one (APPEND), atomically, with its change-log entry.
        ``templates``: (clip id, member -> embedding). A ``request_key`` seen before writes nothing (a retry)."""
        validate_id(person_id, "person_id")
        with self.dialect.write() as tx:
            coll = self._lock(tx, collection)  # read under the lock: no separate transaction for it
            if request_key and tx.execute("SELECT 1 FROM enrol_requests WHERE collection = ? AND request_key = ?",
                                          (collection, request_key)).fetchone():
                return EnrollOutcome(self._clip_count(tx, collection, person_id), True)
            exists = tx.execute("SELECT 1 FROM persons WHERE collection = ? AND person_id = ?",
                                (collection, person_id)).fetchone() is not None
            if mode is EnrollMode.CREATE:
                if exists:
                    raise AlreadyExistsError(f"person {person_id!r} already exists in collection {collection!r}; "
                                             f"adding templates to them is an explicit APPEND")
                tx.execute("INSERT INTO persons (collection, person_id, display_name, created_at) "
                           "VALUES (?, ?, ?, ?)", (collection, person_id, display_name, time.time()))
            else:
                if not exists:
                    raise NotFoundError(f"no person {person_id!r} in collection {collection!r} to append to")
                if display_name:
                    tx.execute("UPDATE persons SET display_name = ? WHERE collection = ? AND person_id = ?",
                               (display_name, collection, person_id))
            seq = self._bump(tx, collection)
            for clip, by_member in templates:
                for member in coll.members:
                    emb = np.asarray(by_member[member], np.float32).reshape(-1)
                    if emb.shape[0] != coll.embedding_dim:
                        raise FailedPreconditionError(
                            f"embedding of {member} has {emb.shape[0]} values; collection {collection!r} "
                            f"holds {coll.embedding_dim}")
                    tx.execute("INSERT INTO templates (collection, person_id, member, clip, embedding, added_by, seq)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (collection, person_id, member, clip, emb.tobytes(), added_by, seq))
            if request_key:
                tx.execute("INSERT INTO enrol_requests VALUES (?, ?, ?, ?)",
                           (collection, request_key, person_id, time.time()))
            total = self._clip_count(tx, collection, person_id)
        return EnrollOutcome(total, False)

    @staticmethod
    def _clip_count(tx: Tx, collection: str, person_id: str) -> int:
        return int(tx.execute("SELECT COUNT(DISTINCT clip) FROM templates WHERE collection = ? AND person_id = ?",
                              (collection, person_id)).fetchone()[0])

    def template_authors(self, collection: str, person_id: str) -> list[str]:
        """Who added each of a person's clips (in order), for audits."""
        with self.dialect.read() as tx:
            rows = tx.execute("SELECT MIN(added_by) FROM templates WHERE collection = ? AND person_id = ? "
                              "GROUP BY clip ORDER BY MIN(id)", (collection, person_id)).fetchall()
        return [r[0] for r in rows]

    def delete_person(self, collection: str, person_id: str) -> None:
        with self.dialect.write() as tx:
            self._lock(tx, collection)
            tx.execute("DELETE FROM templates WHERE collection = ? AND person_id = ?", (collection, person_id))
            cur = tx.execute("DELETE FROM persons WHERE collection = ? AND person_id = ?", (collection, person_id))
            if cur.rowcount == 0:
                raise NotFoundError(f"no person {person_id!r} in collection {collection!r}")
            # A later enrolment of the same person must not be taken for a retry of the deleted one.
            tx.execute("DELETE FROM enrol_requests WHERE collection = ? AND person_id = ?", (collection, person_id))
            seq = self._bump(tx, collection)
            tx.execute("INSERT INTO deletions (collection, seq, person_id) VALUES (?, ?, ?)",
                       (collection, seq, person_id))

    def persons(self, collection: str, limit: int = 100, after: str = "") -> list[Person]:
        """Persons in id order, after the given id (for paging)."""
        self.collection(collection)
        with self.dialect.read() as tx:
            rows = tx.execute(
                "SELECT p.person_id, p.display_name, p.created_at, COUNT(DISTINCT t.clip) FROM persons p "
                "LEFT JOIN templates t ON t.collection = p.collection AND t.person_id = p.person_id "
                "WHERE p.collection = ? AND p.person_id > ? GROUP BY p.person_id, p.display_name, p.created_at "
                "ORDER BY p.person_id LIMIT ?", (collection, after, limit)).fetchall()
        return [Person(r[0], r[1], int(r[3]), float(r[2])) for r in rows]

    def display_names(self, collection: str, person_ids: Sequence[str]) -> dict[str, str]:
        if not person_ids:
            return {}
        marks = ",".join("?" * len(person_ids))
        with self.dialect.read() as tx:
            rows = tx.execute(f"SELECT person_id, display_name FROM persons WHERE collection = ? "  # noqa: S608
                              f"AND person_id IN ({marks})", (collection, *person_ids)).fetchall()
        return {str(a): str(b) for a, b in rows}

    def matrices(self, collection: str) -> dict[str, GalleryMatrix]:
        """Per member, every template of the collection as one matrix (what a full reload reads)."""
        coll = self.collection(collection)
        changes = self.changes_since(collection, 0)
        out: dict[str, GalleryMatrix] = {}
        for member in coll.members:
            rows = [(p, e) for _, p, m, e in changes.added if m == member]
            emb = (np.stack([np.frombuffer(e, np.float32) for _, e in rows]) if rows
                   else np.zeros((0, coll.embedding_dim), np.float32))
            out[member] = GalleryMatrix(emb, tuple(p for p, _ in rows))
        return out
