"""The snapshotter's metadata store: its schema runs once per store, not at every open."""

from __future__ import annotations

import asyncio
import os
import sqlite3

from pyctr.snapshotter import storage
from pyctr.snapshotter.base import Kind


def test_schema_runs_for_new_and_old_stores_only(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "metadata.db")
    old = os.path.join(str(tmp_path), "old.db")
    with sqlite3.connect(old) as conn:  # a store written before the schema had a version
        conn.executescript(storage.SCHEMA.replace("PRAGMA user_version = 1;", ""))
        conn.execute(
            "INSERT INTO snapshots (key, kind, created_at, updated_at) VALUES ('kept', ?, 1, 1)",
            (int(Kind.COMMITTED),),
        )
    conn.close()

    async def main() -> None:
        s = await storage.Storage.open(path)
        await s.tx(lambda conn: storage.create(conn, Kind.ACTIVE, "a", "", {}))
        await s.close()
        s = await storage.Storage.open(path)  # reopened: the snapshot is there, nothing re-created
        assert [info.name for info in await s.tx(storage.walk)] == ["a"]
        await s.close()
        s = await storage.Storage.open(old)
        assert [info.name for info in await s.tx(storage.walk)] == ["kept"]
        await s.close()

    asyncio.run(main())
    for db in (path, old):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == storage.SCHEMA_VERSION
        conn.close()
