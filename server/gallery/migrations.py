"""Versioned schema migrations, the same steps for SQLite and PostgreSQL (types from the dialect).

A table records the schema version; at start-up the missing steps run, each in its own transaction with its
version bump, so a crash between steps leaves a consistent, resumable database. A database newer than this code
is refused with a clear error (an older server must not write a schema it does not know).
"""

from __future__ import annotations

from server.gallery.dialects import Dialect, Tx, redact


class SchemaError(RuntimeError):
    pass


def _v1_base(tx: Tx, d: Dialect) -> None:
    """Collections -> persons -> templates, enrolment request keys (the first released layout, plus what the
    security release added: who added each template)."""
    tx.execute("CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, ensemble TEXT NOT NULL, "
               f"model_version TEXT NOT NULL, members TEXT NOT NULL, embedding_dim INTEGER NOT NULL, "
               f"created_at {d.real} NOT NULL)")
    tx.execute("CREATE TABLE IF NOT EXISTS persons (collection TEXT NOT NULL REFERENCES collections(name) "
               f"ON DELETE CASCADE, person_id TEXT NOT NULL, display_name TEXT NOT NULL DEFAULT '', "
               f"created_at {d.real} NOT NULL, PRIMARY KEY (collection, person_id))")
    tx.execute(f"CREATE TABLE IF NOT EXISTS templates (id {d.autoincrement_pk}, collection TEXT NOT NULL, "
               f"person_id TEXT NOT NULL, member TEXT NOT NULL, clip TEXT NOT NULL, embedding {d.blob} NOT NULL, "
               "FOREIGN KEY (collection, person_id) REFERENCES persons(collection, person_id) ON DELETE CASCADE)")
    tx.execute("CREATE INDEX IF NOT EXISTS templates_by_person ON templates(collection, person_id)")
    if not d.has_column(tx, "templates", "added_by"):
        tx.execute("ALTER TABLE templates ADD COLUMN added_by TEXT NOT NULL DEFAULT ''")
    tx.execute(f"CREATE TABLE IF NOT EXISTS enrol_requests (collection TEXT NOT NULL, request_key TEXT NOT NULL, "
               f"person_id TEXT NOT NULL, created_at {d.real} NOT NULL, PRIMARY KEY (collection, request_key))")


def _v2_change_log(tx: Tx, d: Dialect) -> None:
    """The change log replicas follow: a sequence per collection bumped in every change's transaction, the
    sequence that added each template, and one row per deletion; a generation id tells a re-created collection
    from the one a replica has cached."""
    tx.execute("ALTER TABLE collections ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
    tx.execute("ALTER TABLE collections ADD COLUMN generation TEXT NOT NULL DEFAULT ''")
    tx.execute("ALTER TABLE templates ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
    tx.execute("CREATE INDEX IF NOT EXISTS templates_by_seq ON templates(collection, seq)")
    tx.execute("CREATE TABLE IF NOT EXISTS deletions (collection TEXT NOT NULL, seq BIGINT NOT NULL, "
               "person_id TEXT NOT NULL, PRIMARY KEY (collection, seq))")
    tx.execute("UPDATE collections SET generation = name || ':' || CAST(created_at AS TEXT) WHERE generation = ''")


MIGRATIONS = (_v1_base, _v2_change_log)
VERSION = len(MIGRATIONS)


def migrate(d: Dialect) -> int:
    """Bring the schema to ``VERSION``; returns the version found before."""
    with d.write() as tx:
        d.lock_schema(tx)
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = tx.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            tx.execute("INSERT INTO schema_version VALUES (0)")
    with d.read() as tx:
        found = int(tx.execute("SELECT version FROM schema_version").fetchone()[0])
    if found > VERSION:
        raise SchemaError(f"the gallery at {redact(d.url)} has schema version {found}, newer than this server "
                          f"knows ({VERSION}): upgrade the server, or point it at another gallery")
    for version in range(found + 1, VERSION + 1):
        with d.write() as tx:
            d.lock_schema(tx)
            # Re-read under the lock: another replica may have migrated meanwhile.
            current = int(tx.execute("SELECT version FROM schema_version").fetchone()[0])
            if current >= version:
                continue
            MIGRATIONS[version - 1](tx, d)
            tx.execute("UPDATE schema_version SET version = ?", (version,))
    return found
