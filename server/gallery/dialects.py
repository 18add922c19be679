"""The two databases a gallery can live in, behind one small interface: SQLite (embedded, the default) and
PostgreSQL (psycopg 3 with a connection pool, for several replicas).

SQL is written once with ``?`` placeholders; each dialect runs it in its own way. A dialect gives connections
for reads and transactions for writes, its schema migrations, and turns "the database is not there" into
UNAVAILABLE (with RetryInfo) so callers back off and the server keeps serving.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from engines.errors import UnavailableError


class Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...


Migration = Callable[[Tx, "Dialect"], None]


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class Dialect:
    name = ""
    url = ""

    def read(self) -> Any:  # a context manager yielding a Tx outside any transaction
        raise NotImplementedError

    def write(self) -> Any:  # a context manager yielding a Tx inside one transaction
        raise NotImplementedError

    def has_column(self, tx: Tx, table: str, column: str) -> bool:
        raise NotImplementedError

    def lock_schema(self, tx: Tx) -> None:
        """Serialise schema migrations between processes (SQLite's write transaction already does)."""

    # Appended to a SELECT of a collection's row inside a write transaction, so that transactions changing the
    # same collection run one after the other and each sees what the one before committed. SQLite's write
    # transactions (BEGIN IMMEDIATE) already do; PostgreSQL's, at READ COMMITTED, need the row lock.
    row_lock = ""

    def close(self) -> None:
        pass

    # DDL pieces that differ
    autoincrement_pk = ""
    blob = ""
    real = ""


class SqliteDialect(Dialect):
    """WAL journal with synchronous=FULL (a committed change survives power loss), foreign keys on, secure_delete on
    (deleted templates are overwritten, not left in free pages). One connection per thread."""

    name = "sqlite"
    autoincrement_pk = "INTEGER PRIMARY KEY"
    blob = "BLOB"
    real = "REAL"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def read(self) -> Iterator[Tx]:
        yield self._conn()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def has_column(self, tx: Tx, table: str, column: str) -> bool:
        return column in {r[1] for r in tx.execute(f"PRAGMA table_info({table})").fetchall()}

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


class _PgTx:
    """psycopg with ``?`` placeholders (the SQL here never contains a literal question mark)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(re.sub(r"\?", "%s", sql), tuple(params))


class PostgresDialect(Dialect):
    """psycopg 3 over a psycopg_pool connection pool; a connection is checked before it is handed out, so a
    database that went away and came back is reconnected to by itself."""

    name = "postgresql"
    autoincrement_pk = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    blob = "BYTEA"
    real = "DOUBLE PRECISION"

    def __init__(self, url: str, pool_size: int = 4, connect_timeout_s: float = 5.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self._errors: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
                                    check=ConnectionPool.check_connection,
                                    kwargs={"connect_timeout": max(1, int(connect_timeout_s)), "autocommit": True})
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise ConnectionError(f"cannot connect to the gallery database {redact(url)}: {exc}") from None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise UnavailableError(f"the gallery database is unavailable ({type(exc).__name__}); retry shortly") \
                from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise UnavailableError("the gallery database is unavailable (no connection); retry shortly") \
                    from exc
            raise

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with self._connection() as conn:
            yield _PgTx(conn)

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with self._connection() as conn, conn.transaction():
            yield _PgTx(conn)

    def has_column(self, tx: Tx, table: str, column: str) -> bool:
        row = tx.execute("SELECT 1 FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                         (table, column)).fetchone()
        return row is not None

    def lock_schema(self, tx: Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(7021)")  # replicas starting together migrate one at a time

    row_lock = " FOR UPDATE"

    def close(self) -> None:
        self._pool.close()


def is_postgresql(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return url.split(":", 1)[0].lower() in ("postgresql", "postgres")


def open_dialect(url: str) -> Dialect:
    """``sqlite:///relative/or/absolute/path`` or ``postgresql://user[:password]@host[:port]/db[?host=/socket]``."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        rest = url.split("://", 1)[1] if "://" in url else ""
        path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel/path, sqlite:////abs/path
        if not path:
            raise ValueError(f"gallery_url {url!r}: give a file, e.g. sqlite:///data/gallery.sqlite")
        return SqliteDialect(Path(path))
    if is_postgresql(url):
        return PostgresDialect(url)
    raise ValueError(f"gallery_url {redact(url)!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
