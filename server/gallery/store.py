"""The gallery in SQLite: collections -> persons -> templates (one embedding per clip per ensemble member).

Durable by design: WAL journal with synchronous=FULL (a committed enrolment survives power loss), and a person
is written in one transaction with all of their templates, so a process killed mid-enrolment leaves either the
whole person or nothing. Each collection is bound to the ensemble version whose embeddings it holds; templates
from one version are meaningless to another.

Synchronous by design (SQLite calls block): the server runs it on one dedicated thread.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    ensemble TEXT NOT NULL,
    model_version TEXT NOT NULL,
    members TEXT NOT NULL,            -- member model names, comma-separated, in ensemble order
    embedding_dim INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS persons (
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    person_id TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (collection, person_id)
);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    person_id TEXT NOT NULL,
    member TEXT NOT NULL,
    clip TEXT NOT NULL,
    embedding BLOB NOT NULL,          -- float32, L2-normalised
    FOREIGN KEY (collection, person_id) REFERENCES persons(collection, person_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS templates_by_person ON templates(collection, person_id);
CREATE TABLE IF NOT EXISTS enrol_requests (   -- idempotency: a retried enrolment is not stored twice
    collection TEXT NOT NULL,
    request_key TEXT NOT NULL,
    person_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (collection, request_key)
);
"""
# Columns added after the first release, for galleries created before them.
_ADDED_COLUMNS = (("templates", "added_by", "TEXT NOT NULL DEFAULT ''"),)


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


class GalleryStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._conn()
        db.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        # Search matrices per (collection, member), rebuilt after any change to that collection.
        self._cache: dict[str, dict[str, GalleryMatrix]] = {}

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Deleted templates are overwritten with zeros, not left readable in free pages.
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- collections ---------------------------------------------------------------------------------------

    def create_collection(self, name: str, ensemble: str, model_version: str, members: Sequence[str],
                          embedding_dim: int) -> tuple[Collection, bool]:
        """Create, or return the existing one if it is bound to the same version. Returns (collection, created)."""
        validate_id(name, "collection")
        with self._tx() as db:
            row = db.execute("SELECT ensemble, model_version, members, embedding_dim FROM collections "
                             "WHERE name = ?", (name,)).fetchone()
            if row is not None:
                existing = Collection(name, row[0], row[1], tuple(row[2].split(",")), row[3])
                if existing.model_version != model_version:
                    raise FailedPreconditionError(
                        f"collection {name!r} exists, bound to model version {existing.model_version}; "
                        f"the server runs {model_version}")
                return existing, False
            db.execute("INSERT INTO collections VALUES (?, ?, ?, ?, ?, ?)",
                       (name, ensemble, model_version, ",".join(members), embedding_dim, time.time()))
        return Collection(name, ensemble, model_version, tuple(members), embedding_dim), True

    def collection(self, name: str) -> Collection:
        row = self._conn().execute("SELECT ensemble, model_version, members, embedding_dim FROM collections "
                                   "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {name!r}")
        return Collection(name, row[0], row[1], tuple(row[2].split(",")), row[3])

    def collections(self) -> list[Collection]:
        rows = self._conn().execute("SELECT name, ensemble, model_version, members, embedding_dim "
                                    "FROM collections ORDER BY name").fetchall()
        return [Collection(r[0], r[1], r[2], tuple(r[3].split(",")), r[4]) for r in rows]

    # --- persons -------------------------------------------------------------------------------------------

    def enroll(self, collection: str, person_id: str, display_name: str,
               templates: Sequence[tuple[str, Mapping[str, np.ndarray]]], mode: EnrollMode = EnrollMode.CREATE,
               added_by: str = "", request_key: str = "") -> EnrollOutcome:
        """Create a person (CREATE) or add templates to one (APPEND), atomically. ``templates``: (clip id,
        member -> embedding). A ``request_key`` seen before for this collection writes nothing (a retry)."""
        validate_id(person_id, "person_id")
        coll = self.collection(collection)
        with self._tx() as db:
            if request_key and db.execute("SELECT 1 FROM enrol_requests WHERE collection = ? AND request_key = ?",
                                          (collection, request_key)).fetchone():
                return EnrollOutcome(self._clip_count(db, collection, person_id), True)
            exists = db.execute("SELECT 1 FROM persons WHERE collection = ? AND person_id = ?",
                                (collection, person_id)).fetchone() is not None
            if mode is EnrollMode.CREATE:
                if exists:
                    raise AlreadyExistsError(f"person {person_id!r} already exists in collection {collection!r}; "
                                             f"adding templates to them is an explicit APPEND")
                db.execute("INSERT INTO persons (collection, person_id, display_name, created_at) "
                           "VALUES (?, ?, ?, ?)", (collection, person_id, display_name, time.time()))
            else:
                if not exists:
                    raise NotFoundError(f"no person {person_id!r} in collection {collection!r} to append to")
                if display_name:
                    db.execute("UPDATE persons SET display_name = ? WHERE collection = ? AND person_id = ?",
                               (display_name, collection, person_id))
            for clip, by_member in templates:
                for member in coll.members:
                    emb = np.asarray(by_member[member], np.float32).reshape(-1)
                    if emb.shape[0] != coll.embedding_dim:
                        raise FailedPreconditionError(
                            f"embedding of {member} has {emb.shape[0]} values; collection {collection!r} "
                            f"holds {coll.embedding_dim}")
                    db.execute("INSERT INTO templates (collection, person_id, member, clip, embedding, added_by) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (collection, person_id, member, clip, emb.tobytes(), added_by))
            if request_key:
                db.execute("INSERT INTO enrol_requests VALUES (?, ?, ?, ?)",
                           (collection, request_key, person_id, time.time()))
            total = self._clip_count(db, collection, person_id)
        self._cache.pop(collection, None)
        return EnrollOutcome(total, False)

    @staticmethod
    def _clip_count(db: sqlite3.Connection, collection: str, person_id: str) -> int:
        return int(db.execute("SELECT COUNT(DISTINCT clip) FROM templates WHERE collection = ? AND person_id = ?",
                              (collection, person_id)).fetchone()[0])

    def template_authors(self, collection: str, person_id: str) -> list[str]:
        """Who added each of a person's clips (in order), for audits."""
        rows = self._conn().execute("SELECT added_by FROM templates WHERE collection = ? AND person_id = ? "
                                    "GROUP BY clip ORDER BY MIN(id)", (collection, person_id)).fetchall()
        return [r[0] for r in rows]

    def delete_person(self, collection: str, person_id: str) -> None:
        self.collection(collection)
        with self._tx() as db:
            cur = db.execute("DELETE FROM persons WHERE collection = ? AND person_id = ?", (collection, person_id))
            if cur.rowcount == 0:
                raise NotFoundError(f"no person {person_id!r} in collection {collection!r}")
            # A later enrolment of the same person must not be taken for a retry of the deleted one.
            db.execute("DELETE FROM enrol_requests WHERE collection = ? AND person_id = ?", (collection, person_id))
        self._cache.pop(collection, None)

    def persons(self, collection: str, limit: int = 100, after: str = "") -> list[Person]:
        """Persons in id order, after the given id (for paging)."""
        self.collection(collection)
        rows = self._conn().execute(
            "SELECT p.person_id, p.display_name, p.created_at, COUNT(DISTINCT t.clip) FROM persons p "
            "LEFT JOIN templates t ON t.collection = p.collection AND t.person_id = p.person_id "
            "WHERE p.collection = ? AND p.person_id > ? GROUP BY p.person_id ORDER BY p.person_id LIMIT ?",
            (collection, after, limit)).fetchall()
        return [Person(r[0], r[1], r[3], r[2]) for r in rows]

    def display_names(self, collection: str, person_ids: Sequence[str]) -> dict[str, str]:
        if not person_ids:
            return {}
        marks = ",".join("?" * len(person_ids))
        rows = self._conn().execute(f"SELECT person_id, display_name FROM persons WHERE collection = ? "  # noqa: S608
                                    f"AND person_id IN ({marks})", (collection, *person_ids)).fetchall()
        return dict(rows)

    def matrices(self, collection: str) -> dict[str, GalleryMatrix]:
        """Per member, every template of the collection as one matrix (cached until the collection changes)."""
        cached = self._cache.get(collection)
        if cached is not None:
            return cached
        coll = self.collection(collection)
        out: dict[str, GalleryMatrix] = {}
        for member in coll.members:
            rows = self._conn().execute("SELECT person_id, embedding FROM templates WHERE collection = ? AND "
                                        "member = ? ORDER BY id", (collection, member)).fetchall()
            emb = (np.stack([np.frombuffer(r[1], np.float32) for r in rows]) if rows
                   else np.zeros((0, coll.embedding_dim), np.float32))
            out[member] = GalleryMatrix(emb, tuple(r[0] for r in rows))
        self._cache[collection] = out
        return out
