"""Namespaced snapshots over a backend snapshotter, as containerd's metadata layer does it.

Each namespace has its own keys; the backend sees ``<namespace>/<seq>/<key>``, so namespaces
never collide and a re-used key never meets an old backend snapshot. Labels live here; the
backend only keeps ``containerd.io/snapshot/…`` labels. Removing a snapshot removes its record
and wakes the collector, which removes backend snapshots no record refers to (children first).

Changes that span the metadata and the backend hold the collector's lock shared, so a sweep
never runs between the two halves.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable, Mapping, Sequence

from pyctr.api import filters, labels
from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pyctr.api.identifiers import goquote
from pyctr.api.log import get_logger
from pyctr.api.mount import Mount
from pyctr.daemon.metadata.db import DB, dump_labels, ensure_namespace, load_labels, next_sequence, now_ns
from pyctr.daemon.metadata.leases import exists as lease_exists
from pyctr.snapshotter.base import Info, Kind, Snapshotter, Usage

log = get_logger("pyctrd.snapshots")

TARGET_LABEL = "containerd.io/snapshot.ref"


def _row(conn: sqlite3.Connection, ns: str, sn: str, key: str) -> sqlite3.Row:
    row = conn.execute(
        "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (ns, sn, key)
    ).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key} does not exist")
    return row


def _info(row: sqlite3.Row) -> Info:
    return Info(
        name=row["key"],
        parent=row["parent"],
        kind=Kind(row["kind"]),
        labels=load_labels(row["labels"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _lease_add(conn: sqlite3.Connection, ns: str, lease: str, sn: str, key: str) -> None:
    if not lease:
        return
    if not lease_exists(conn, ns, lease):
        raise NotFound("lease does not exist")
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (ns, lease, f"snapshots/{sn}", key),
    )


def committed_backend_key(bkey: str, key: str, name: str) -> str:
    """The backend key of active ``key`` (backend key ``bkey``) once committed as ``name``: the
    same ``<namespace>/<seq>/`` prefix with the new name. The sequence number was drawn for the
    active snapshot, which the commit consumes, so the result is as unique as a fresh number would
    be, and costs no write."""
    prefix = bkey.removesuffix(key)
    if prefix == bkey or not prefix.endswith("/"):
        raise FailedPrecondition(f"backend key {bkey!r} of snapshot {goquote(key)} is not <ns>/<seq>/<key>")
    return prefix + name


def adaptor(info: Info) -> filters.DictAdaptor:
    return filters.DictAdaptor(
        {
            "name": info.name or None,
            "parent": info.parent or None,
            "kind": info.kind.label,
            "labels": info.labels,
        }
    )


class SnapshotStore:
    def __init__(self, name: str, backend: Snapshotter, db: DB) -> None:
        self.name = name
        self.backend = backend
        self.db = db
        self.on_delete: Callable[[str, str], None] = lambda ns, key: None
        # (namespace, key) of the names a commit in flight consumes and creates: a prepare or
        # another commit must not take them between the commit's check and its publish.
        self._reserved: set[tuple[str, str]] = set()

    async def _backend_key(self, ns: str, key: str) -> tuple[str, Info]:
        def tx(c: sqlite3.Connection) -> tuple[str, Info]:
            row = _row(c, ns, self.name, key)
            return row["backend_key"], _info(row)

        return await self.db.view(tx)

    async def stat(self, ns: str, key: str) -> Info:
        return (await self._backend_key(ns, key))[1]

    async def update(self, ns: str, info: Info, paths: Sequence[str]) -> Info:
        sn = self.name

        def tx(c: sqlite3.Connection) -> Info:
            row = _row(c, ns, sn, info.name)
            current = load_labels(row["labels"])
            if not paths:
                current = dict(info.labels)
            for path in paths:
                if path == "labels":
                    current = dict(info.labels)
                elif path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    current[k] = info.labels.get(k, "")
                else:
                    raise InvalidArgument(
                        f"cannot update {goquote(path)} field on snapshot {goquote(info.name)}"
                    )
            current = {k: v for k, v in current.items() if v}
            labels.validate_all(current, "info.Labels")
            c.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE namespace = ? AND snapshotter = ? AND key = ?",
                (dump_labels(current), now_ns(), ns, sn, info.name),
            )
            return _info(_row(c, ns, sn, info.name))

        return await self.db.update(tx)

    async def usage(self, ns: str, key: str) -> Usage:
        bkey, _ = await self._backend_key(ns, key)
        return await self.backend.usage(bkey)

    async def mounts(self, ns: str, key: str) -> list[Mount]:
        bkey, _ = await self._backend_key(ns, key)
        return await self.backend.mounts(bkey)

    async def prepare(
        self, ns: str, key: str, parent: str, lbls: Mapping[str, str], lease: str
    ) -> list[Mount]:
        return await self._create(Kind.ACTIVE, ns, key, parent, lbls, lease)

    async def view(self, ns: str, key: str, parent: str, lbls: Mapping[str, str], lease: str) -> list[Mount]:
        return await self._create(Kind.VIEW, ns, key, parent, lbls, lease)

    async def _create(
        self, kind: Kind, ns: str, key: str, parent: str, lbls: Mapping[str, str], lease: str
    ) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        labels.validate_all(lbls, "info.Labels")
        if (ns, key) in self._reserved:
            raise AlreadyExists(f"snapshot {goquote(key)}")
        sn = self.name

        def reserve(c: sqlite3.Connection) -> tuple[str, str]:
            ensure_namespace(c, ns)
            target = lbls.get(TARGET_LABEL, "")
            if (
                target
                and c.execute(
                    "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                    (ns, sn, target),
                ).fetchone()
            ):
                raise AlreadyExists(f"target snapshot {goquote(target)}")
            if c.execute(
                "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (ns, sn, key)
            ).fetchone():
                raise AlreadyExists(f"snapshot {goquote(key)}")
            bparent = ""
            if parent:
                prow = c.execute(
                    "SELECT backend_key, kind FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                    (ns, sn, parent),
                ).fetchone()
                if prow is None:
                    raise NotFound(f"parent snapshot {parent} does not exist")
                if Kind(prow["kind"]) != Kind.COMMITTED:
                    raise InvalidArgument(f"parent {goquote(parent)} is not committed snapshot")
                bparent = prow["backend_key"]
            _lease_add(c, ns, lease, sn, key)
            bkey = f"{ns}/{next_sequence(c, 'snapshots/' + sn)}/{key}"
            t = now_ns()
            c.execute(
                "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, sn, key, bkey, parent, int(kind), dump_labels(dict(lbls)), t, t),
            )
            return bkey, bparent

        async with self.db.gc_lock.reader():
            bkey, bparent = await self.db.update(reserve)
            try:
                if kind == Kind.ACTIVE:
                    return await self.backend.prepare(bkey, bparent, lbls)
                return await self.backend.view(bkey, bparent, lbls)
            except BaseException:
                await self.db.update(
                    lambda c: c.execute(
                        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                        (ns, sn, key),
                    )
                )
                raise

    async def commit(self, ns: str, name: str, key: str, lbls: Mapping[str, str], lease: str) -> None:
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        labels.validate_all(lbls, "info.Labels")
        sn = self.name

        # A read, so no commit (and no fsync) of its own; what it checked holds until publish,
        # because this process is the only writer and the names in flight are reserved below.
        def check(c: sqlite3.Connection) -> tuple[str, str]:
            if c.execute(
                "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (ns, sn, name)
            ).fetchone():
                raise AlreadyExists(f"snapshot {goquote(name)}")
            row = _row(c, ns, sn, key)
            if Kind(row["kind"]) != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {goquote(key)} is not active")
            if lease and not lease_exists(c, ns, lease):
                raise NotFound("lease does not exist")
            return row["backend_key"], row["parent"]

        def publish(c: sqlite3.Connection, bname: str, parent: str) -> None:
            c.execute(
                "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (ns, sn, key)
            )
            c.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?",
                (ns, f"snapshots/{sn}", key),
            )
            _lease_add(c, ns, lease, sn, name)
            t = now_ns()
            c.execute(
                "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, sn, name, bname, parent, int(Kind.COMMITTED), dump_labels(dict(lbls)), t, t),
            )

        if (ns, name) in self._reserved:
            raise AlreadyExists(f"snapshot {goquote(name)}")
        if (ns, key) in self._reserved:
            raise FailedPrecondition(f"snapshot {goquote(key)} is not active")
        reserved = {(ns, name), (ns, key)}
        self._reserved |= reserved
        try:
            async with self.db.gc_lock.reader():
                bkey, parent = await self.db.view(check)
                bname = committed_backend_key(bkey, key, name)
                await self.backend.commit(bname, bkey, lbls)
                await self.db.update(lambda c: publish(c, bname, parent))
        finally:
            self._reserved -= reserved

    async def remove(self, ns: str, key: str) -> None:
        sn = self.name

        def tx(c: sqlite3.Connection) -> None:
            _row(c, ns, sn, key)
            if c.execute(
                "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? LIMIT 1",
                (ns, sn, key),
            ).fetchone():
                raise FailedPrecondition("cannot remove snapshot with child")
            c.execute(
                "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (ns, sn, key)
            )

        await self.db.update(tx)
        self.on_delete(ns, key)

    async def walk(self, ns: str, fs: Sequence[str]) -> builtins.list[Info]:
        flt = filters.parse_all(fs)
        rows = await self.db.view(
            lambda c: c.execute(
                "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? ORDER BY key",
                (ns, self.name),
            ).fetchall()
        )
        return [info for info in map(_info, rows) if flt.match(adaptor(info))]

    async def cleanup(self) -> None:
        await self.backend.cleanup()

    async def sweep_backend(self) -> int:
        """Remove backend snapshots no record refers to; children before parents. Returns a count."""
        referenced = {
            r[0]
            for r in await self.db.view(
                lambda c: c.execute(
                    "SELECT backend_key FROM snapshots WHERE snapshotter = ?", (self.name,)
                ).fetchall()
            )
        }
        removed = 0
        while True:
            infos = await self.backend.walk()
            parents = {i.parent for i in infos if i.parent}
            doomed = [i.name for i in infos if i.name not in referenced and i.name not in parents]
            if not doomed:
                return removed
            for bkey in doomed:
                try:
                    await self.backend.remove(bkey)
                    removed += 1
                except Exception as exc:
                    log.warning(
                        "backend snapshot removal failed", snapshotter=self.name, key=bkey, error=str(exc)
                    )
                    return removed
