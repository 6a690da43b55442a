"""The embedded metadata database: one sqlite file under the daemon's root.

Every call runs on one dedicated thread that owns the connection, so the event loop never
blocks on sqlite and writes are serialised without further locking. A write is one
``BEGIN IMMEDIATE … COMMIT`` transaction; ``synchronous=FULL`` in WAL mode makes a commit durable
before it returns, so a SIGKILL at any point leaves either the old or the new state.

Schema (version 1; every change is a new migration in ``MIGRATIONS``, never an edit of an old one):

    meta(key PK, value)                      -- server uuid, …
    namespaces(name PK, labels JSON, created_at ns, updated_at ns)
    leases(namespace, id, labels JSON, created_at ns)              PK(namespace, id)
    lease_resources(namespace, lease, type, id)                    PK(namespace, lease, type, id)
        type is containerd's resource type: "content", "ingests", "snapshots/<snapshotter>".

Version 2 (content):

    content(namespace, digest, size, labels JSON, created_at, updated_at)    PK(namespace, digest)
        a blob is visible in a namespace only through its row here; the bytes are shared on disk.
    ingests(namespace, ref, bref, expected, expires_at ns or 0)             PK(namespace, ref)
        bref is the backend ref "<namespace>/<ref>"; expires_at 0 means held by a lease.

Version 3 (snapshots):

    snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels JSON, created_at,
              updated_at)                                    PK(namespace, snapshotter, key)
        parent is the parent's key in the same namespace ('' for none); backend_key is the
        snapshotter's own key "<namespace>/<seq>/<key>", unique per snapshotter.
    sequences(name PK, value)                                 counters (backend key numbers)

Version 4 (images):

    images(namespace, name, labels JSON, target_media_type, target_digest, target_size,
           target_annotations JSON, created_at, updated_at)        PK(namespace, name)

Version 5 (containers):

    containers(namespace, id, labels JSON, image, runtime_name, runtime_options (Any: type_url
               + value), spec (Any), snapshotter, snapshot_key, extensions JSON {key: [type_url,
               base64 value]}, sandbox, created_at, updated_at)    PK(namespace, id)

Timestamps are integer nanoseconds since the Unix epoch (UTC). Labels are JSON objects.
A namespace row exists once anything was created in it (namespaces are implicit, as in
containerd); other tables reference it by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from pyctr.daemon.rwlock import RWLock

T = TypeVar("T")

# Each entry moves the schema from version i to i+1; the pending ones apply in one transaction.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE leases (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
    );
    """,
    """
    CREATE TABLE content (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX content_by_digest ON content(digest);
    CREATE TABLE ingests (
        namespace TEXT NOT NULL,
        ref TEXT NOT NULL,
        bref TEXT NOT NULL,
        expected TEXT NOT NULL DEFAULT '',
        expires_at INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, ref)
    );
    """,
    """
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL,
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        backend_key TEXT NOT NULL,
        parent TEXT NOT NULL DEFAULT '',
        kind INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key)
    );
    CREATE UNIQUE INDEX snapshots_backend ON snapshots(snapshotter, backend_key);
    CREATE INDEX snapshots_parent ON snapshots(namespace, snapshotter, parent);
    CREATE TABLE sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    """
    CREATE TABLE images (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        target_media_type TEXT NOT NULL,
        target_digest TEXT NOT NULL,
        target_size INTEGER NOT NULL,
        target_annotations TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    """,
    """
    CREATE TABLE containers (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options_type TEXT NOT NULL DEFAULT '',
        runtime_options BLOB,
        spec_type TEXT NOT NULL DEFAULT '',
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        extensions TEXT NOT NULL DEFAULT '{}',
        sandbox TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def now_ns() -> int:
    return time.time_ns()


def set_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The labels (or annotations) as containerd stores them: an empty value means "not set"."""
    return {k: v for k, v in (labels or {}).items() if v}


def dump_labels(labels: Mapping[str, str] | None, *, keep_empty: bool = False) -> str:
    """The stored JSON form. Empty values are dropped, as containerd's metadata store drops them
    (boltutil's writeMap), except for namespace labels, which it writes as given."""
    items = (labels or {}).items() if keep_empty else set_labels(labels).items()
    return json.dumps(dict(sorted(items)), separators=(",", ":"))


def load_labels(text: str | None) -> dict[str, str]:
    return dict(json.loads(text)) if text else {}


class DB:
    """The metadata database; create with :meth:`open`, which also migrates the schema.

    Writes run on one owner thread (``update``): a commit fsyncs, which must not stall the loop.
    Reads (``view``) run on the loop thread, on a second connection of their own: in WAL mode a
    reader sees the last committed state and never waits for the writer, and a point lookup costs a
    few microseconds of sqlite where a hop to the writer thread and back costs a hundred and more
    (and queues behind whatever commit is running).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metadata")
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Held shared by every change that spans metadata and a backend (blob commits, snapshot
        # prepares and commits), and exclusively by the collector between mark and sweep.
        self.gc_lock = RWLock()

    @classmethod
    async def open(cls, path: str) -> DB:
        db = cls(path)
        await db._run(db._connect)
        db._reader = db._open_reader()
        return db

    def _open_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=True
        )
        # A reader waits only while the WAL index is rebuilt (after a crash); never for long.
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.row_factory = sqlite3.Row
        return conn

    def _connect(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"metadata schema version {version} is newer than this pyctrd understands ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        # Every pending migration in one transaction: a first start commits (and syncs) once, and
        # a crash part-way leaves the schema at the version it had.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def view(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a read transaction (a consistent snapshot), on the calling (loop) thread.

        ``fn`` must only read: the connection is read-only.
        """
        conn = self._reader
        if conn is None:
            raise RuntimeError("metadata database is closed")
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def update(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction: all of it is committed durably, or none of it."""

        def job() -> T:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(job)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("metadata database is closed")
        return self._conn

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

        def job() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(job)
        self._executor.shutdown(wait=True)


def ensure_namespace(conn: sqlite3.Connection, namespace: str) -> None:
    """Namespaces are implicit: any write in one creates it."""
    t = now_ns()
    conn.execute(
        "INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) VALUES (?, '{}', ?, ?)",
        (namespace, t, t),
    )


def next_sequence(conn: sqlite3.Connection, name: str) -> int:
    conn.execute(
        "INSERT INTO sequences(name, value) VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
        (name,),
    )
    return int(conn.execute("SELECT value FROM sequences WHERE name = ?", (name,)).fetchone()[0])


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
