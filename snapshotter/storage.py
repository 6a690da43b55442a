"""Snapshot metadata for one snapshotter: a sqlite file in its root.

Schema (version 1):

    snapshots(id INTEGER PK, key TEXT UNIQUE, parent_id → snapshots.id, kind, labels JSON,
              created_at ns, updated_at ns, size, inodes)

Ids name the on-disk directories (``snapshots/<id>``) and are never reused, so a directory
left over from a crash can be told apart from a live one. Parents are referenced by id; a
snapshot with children cannot be removed. Calls run on one thread that owns the connection.

``size`` and ``inodes`` of a committed snapshot are measured the first time someone asks
(``UNMEASURED``, -1, until then): its files no longer change, and walking a 20,000-file layer at
commit time would delay every unpack for a number hardly anyone reads. Views keep 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pyctr.snapshotter.base import Info, Kind, Usage

T = TypeVar("T")

UNMEASURED = Usage(-1, -1)

SCHEMA_VERSION = 1
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""
    + f"PRAGMA user_version = {SCHEMA_VERSION};\n"
)


@dataclass(frozen=True)
class Snapshot:
    """What a snapshotter needs to build mounts: its id, kind, and parent ids nearest first."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


class Storage:
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapmeta")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> Storage:
        s = cls(path)
        await s._run(s._connect)
        return s

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.row_factory = sqlite3.Row
        # The schema script commits, and runs at every daemon start: only a store older than it
        # (or a new one) needs it.
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            conn.executescript(SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            conn = self._conn
            if conn is None:
                raise RuntimeError("snapshot storage is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(job)

    async def close(self) -> None:
        def job() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(job)
        self._executor.shutdown(wait=True)


def _row(conn: sqlite3.Connection, key: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key} does not exist")
    return row


def _parent_chain(conn: sqlite3.Connection, parent_id: int | None) -> tuple[int, ...]:
    chain = []
    while parent_id is not None:
        chain.append(parent_id)
        row = conn.execute("SELECT parent_id FROM snapshots WHERE id = ?", (parent_id,)).fetchone()
        parent_id = row[0] if row else None
    return tuple(chain)


def _info(conn: sqlite3.Connection, row: sqlite3.Row) -> Info:
    parent = ""
    if row["parent_id"] is not None:
        prow = conn.execute("SELECT key FROM snapshots WHERE id = ?", (row["parent_id"],)).fetchone()
        parent = prow[0] if prow else ""
    return Info(
        name=row["key"],
        parent=parent,
        kind=Kind(row["kind"]),
        labels=json.loads(row["labels"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def get_info(conn: sqlite3.Connection, key: str) -> tuple[int, Info, Usage]:
    row = _row(conn, key)
    return row["id"], _info(conn, row), Usage(row["size"], row["inodes"])


def get_snapshot(conn: sqlite3.Connection, key: str) -> Snapshot:
    row = _row(conn, key)
    kind = Kind(row["kind"])
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"requested snapshot {key} not active or view")
    return Snapshot(row["id"], kind, _parent_chain(conn, row["parent_id"]))


def create(
    conn: sqlite3.Connection, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
) -> Snapshot:
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(
            f"snapshot type {kind.name} invalid; only snapshots of type Active or View can be created"
        )
    parent_id = None
    if parent:
        prow = conn.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
        if prow is None:
            raise NotFound(f"missing parent {parent!r} bucket")
        if Kind(prow["kind"]) != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
        parent_id = prow["id"]
    if conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
        raise AlreadyExists(f"snapshot {key}")
    t = time.time_ns()
    cur = conn.execute(
        "INSERT INTO snapshots(key, parent_id, kind, labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key, parent_id, int(kind), json.dumps(dict(labels)), t, t),
    )
    new_id = cur.lastrowid
    assert new_id is not None
    return Snapshot(new_id, kind, _parent_chain(conn, parent_id))


def commit_active(
    conn: sqlite3.Connection, key: str, name: str, usage: Usage, labels: Mapping[str, str]
) -> int:
    if conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
        raise AlreadyExists(f"committed snapshot {name}")
    row = conn.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"failed to get active snapshot {key!r}")
    if Kind(row["kind"]) != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is not active")
    merged = json.loads(row["labels"])
    merged.update(labels)
    conn.execute(
        "UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated_at = ?, size = ?, inodes = ? WHERE id = ?",
        (name, int(Kind.COMMITTED), json.dumps(merged), time.time_ns(), usage.size, usage.inodes, row["id"]),
    )
    return int(row["id"])


def set_usage(conn: sqlite3.Connection, sid: int, usage: Usage) -> None:
    conn.execute("UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?", (usage.size, usage.inodes, sid))


def remove(conn: sqlite3.Connection, key: str) -> tuple[int, Kind]:
    row = _row(conn, key)
    if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone():
        raise FailedPrecondition("cannot remove snapshot with child")
    conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
    return int(row["id"]), Kind(row["kind"])


def update(conn: sqlite3.Connection, info: Info, fieldpaths: Sequence[str]) -> Info:
    row = _row(conn, info.name)
    labels = json.loads(row["labels"])
    if not fieldpaths:
        labels = dict(info.labels)
    for path in fieldpaths:
        if path == "labels":
            labels = dict(info.labels)
        elif path.startswith("labels."):
            k = path.removeprefix("labels.")
            if info.labels.get(k):
                labels[k] = info.labels[k]
            else:
                labels.pop(k, None)
        else:
            raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
    conn.execute(
        "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
        (json.dumps(labels), time.time_ns(), row["id"]),
    )
    return _info(conn, _row(conn, info.name))


def walk(conn: sqlite3.Connection) -> list[Info]:
    return [_info(conn, row) for row in conn.execute("SELECT * FROM snapshots ORDER BY key")]


def ids(conn: sqlite3.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM snapshots")}


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
