from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, NotImplementedErr
from pyctr.daemon.metadata import db as dbmod
from pyctr.daemon.metadata import leases, namespaces


def run(path: str, fn: object, write: bool = True) -> object:
    async def main() -> object:
        db = await dbmod.DB.open(path)
        try:
            return await (db.update(fn) if write else db.view(fn))  # type: ignore[arg-type]
        finally:
            await db.close()

    return asyncio.run(main())


def test_namespaces(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"
    run(path, lambda c: namespaces.create(c, "moby", {"a": "b"}))
    with pytest.raises(AlreadyExists, match='namespace "moby": already exists'):
        run(path, lambda c: namespaces.create(c, "moby", {}))
    with pytest.raises(InvalidArgument):
        run(path, lambda c: namespaces.create(c, "bad name", {}))
    with pytest.raises(InvalidArgument, match="label key and value greater than maximum size"):
        run(path, lambda c: namespaces.create(c, "big", {"k": "v" * 5000}))
    assert run(path, lambda c: namespaces.get_labels(c, "moby"), write=False) == {"a": "b"}
    assert run(path, lambda c: namespaces.get_labels(c, "nope"), write=False) == {}
    run(path, lambda c: namespaces.set_labels(c, "moby", {"a": "", "c": "d"}))
    assert run(path, lambda c: namespaces.get_labels(c, "moby"), write=False) == {"c": "d"}
    # Leases do not keep a namespace alive; they go with it.
    run(path, lambda c: leases.create(c, "moby", "l1", {}))
    run(path, lambda c: namespaces.delete(c, "moby"))
    assert run(path, lambda c: namespaces.list_names(c), write=False) == []
    with pytest.raises(NotFound, match='namespace "moby": not found'):
        run(path, lambda c: namespaces.delete(c, "moby"))


def test_namespace_with_objects_cannot_be_deleted(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"
    run(path, lambda c: namespaces.create(c, "k8s.io", {}))

    def add_table(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE images_t (namespace TEXT, name TEXT)")
        c.execute("INSERT INTO images_t VALUES ('k8s.io', 'x')")

    run(path, add_table)
    namespaces.OWNED_TABLES.append(("images_t", "images"))
    try:
        with pytest.raises(
            FailedPrecondition, match=r'namespace "k8s\.io" must be empty, but it still has images'
        ):
            run(path, lambda c: namespaces.delete(c, "k8s.io"))
    finally:
        namespaces.OWNED_TABLES.remove(("images_t", "images"))


def test_leases_and_resources(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"
    created = run(path, lambda c: leases.create(c, "default", "l1", {"containerd.io/gc.expire": "x"}))
    assert isinstance(created, leases.Lease) and created.created_at > 0
    run(path, lambda c: leases.create(c, "default", "l2", {"team": "a"}))
    run(path, lambda c: leases.create(c, "other", "l1", {}))  # same id, other namespace
    with pytest.raises(AlreadyExists, match='lease "l1": already exists'):
        run(path, lambda c: leases.create(c, "default", "l1", {}))
    ids = run(path, lambda c: [x.id for x in leases.list_leases(c, "default", ["labels.team==a"])], False)
    assert ids == ["l2"]
    both = run(path, lambda c: [x.id for x in leases.list_leases(c, "default", ["id==l1", "id==l2"])], False)
    assert both == ["l1", "l2"]

    dgst = "sha256:" + "a" * 64
    for r in [
        leases.Resource(dgst, "content"),
        leases.Resource("ref-1", "ingests"),
        leases.Resource("key 1", "snapshots/overlayfs"),
    ]:
        run(path, lambda c, r=r: leases.add_resource(c, "default", "l1", r))
    got = run(path, lambda c: leases.list_resources(c, "default", "l1"), False)
    assert [(r.type, r.id) for r in got] == [  # type: ignore[attr-defined]
        ("content", dgst),
        ("ingests", "ref-1"),
        ("snapshots/overlayfs", "key 1"),
    ]
    assert run(path, lambda c: leases.list_resources(c, "other", "l1"), False) == []
    with pytest.raises(InvalidArgument, match="invalid content resource id"):
        run(path, lambda c: leases.add_resource(c, "default", "l1", leases.Resource("nope", "content")))
    with pytest.raises(InvalidArgument, match="invalid snapshot resource type"):
        run(path, lambda c: leases.add_resource(c, "default", "l1", leases.Resource("k", "snapshots")))
    with pytest.raises(NotImplementedErr):
        run(path, lambda c: leases.add_resource(c, "default", "l1", leases.Resource("k", "images")))
    with pytest.raises(NotFound, match='lease "zz": not found'):
        run(path, lambda c: leases.add_resource(c, "default", "zz", leases.Resource(dgst, "content")))
    run(path, lambda c: leases.delete_resource(c, "default", "l1", leases.Resource(dgst, "content")))
    run(path, lambda c: leases.delete(c, "default", "l1"))
    with pytest.raises(NotFound):
        run(path, lambda c: leases.list_resources(c, "default", "l1"), False)


def test_failed_transaction_leaves_nothing(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"

    def half(c: sqlite3.Connection) -> None:
        leases.create(c, "default", "l1", {})
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        run(path, half)
    assert run(path, lambda c: leases.list_leases(c, "default", []), False) == []
    assert run(path, lambda c: namespaces.list_names(c), False) == []


def test_newer_schema_is_refused(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {dbmod.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this pyctrd understands"):
        run(path, lambda c: None)


def test_pending_migrations_apply_together_from_any_version(tmp_path: object) -> None:
    """A first start applies every migration in one transaction; an older schema catches up."""
    path = f"{tmp_path}/meta.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in dbmod.MIGRATIONS[0].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    names = run(path, lambda c: [r[0] for r in c.execute(tables)], False)
    assert {"meta", "leases", "content", "snapshots", "images", "containers"} <= set(names)
    assert run(path, lambda c: c.execute("PRAGMA user_version").fetchone()[0], False) == dbmod.SCHEMA_VERSION

    fresh = f"{tmp_path}/fresh.db"
    assert run(fresh, lambda c: [r[0] for r in c.execute(tables)], False) == names


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pyctr.daemon.metadata import db as dbmod, leases
    async def main():
        db = await dbmod.DB.open(sys.argv[1])
        i = 0
        while True:
            def tx(c, i=i):
                leases.create(c, "default", f"l{i}", {"n": str(i)})
                leases.add_resource(c, "default", f"l{i}", leases.Resource(f"ref{i}", "ingests"))
            await db.update(tx)
            print(i, flush=True)
            i += 1
    asyncio.run(main())
    """
)


def test_sigkill_during_writes_leaves_a_consistent_database(tmp_path: object) -> None:
    path = f"{tmp_path}/meta.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = -1
    deadline = time.monotonic() + 10
    while committed < 50 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n_leases = conn.execute("SELECT count(*) FROM leases").fetchone()[0]
    n_res = conn.execute("SELECT count(*) FROM lease_resources").fetchone()[0]
    conn.close()
    # Every reported commit is durable, and no transaction is half there.
    assert n_leases >= committed + 1
    assert n_leases == n_res
