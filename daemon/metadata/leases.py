"""Lease records and the resources they hold (content, ingests, snapshots).

A lease keeps what it references from garbage collection until it is deleted or, with a
``containerd.io/gc.expire`` label, until it expires. Resource types are containerd's:
``content`` (id is a digest), ``ingests`` (id is an ingest ref) and ``snapshots/<snapshotter>``
(id is a snapshot key).
"""

from __future__ import annotations

import base64
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyctr.api import filters, identifiers, labels
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, NotFound, NotImplementedErr
from pyctr.daemon.metadata.db import dump_labels, ensure_namespace, load_labels, now_ns, set_labels

_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


@dataclass(frozen=True)
class Lease:
    id: str
    created_at: int  # ns since epoch
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


def random_id() -> str:
    """containerd's random lease id: the clock's nanoseconds and three random bytes."""
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def validate_resource(r: Resource) -> Resource:
    keys = r.type.split("/")
    if keys[0] in ("content", "ingests"):
        if len(keys) != 1:
            raise InvalidArgument(f"invalid resource type {r.type}")
        if keys[0] == "content" and not _DIGEST_RE.match(r.id):
            raise InvalidArgument(f"invalid content resource id {r.id}: invalid checksum digest format")
    elif keys[0] == "snapshots":
        if len(keys) != 2 or not keys[1]:
            raise InvalidArgument(f"invalid snapshot resource type {r.type}")
    else:
        raise NotImplementedErr(f"resource type {r.type} not supported yet")
    return r


def create(conn: sqlite3.Connection, namespace: str, lease_id: str, lbls: dict[str, str]) -> Lease:
    if not lease_id:
        raise InvalidArgument("lease id must be provided")
    labels.validate_all(lbls)
    ensure_namespace(conn, namespace)
    if conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone():
        raise AlreadyExists(f"lease {identifiers.goquote(lease_id)}")
    t = now_ns()
    conn.execute(
        "INSERT INTO leases(namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, dump_labels(lbls), t),
    )
    return Lease(lease_id, t, set_labels(lbls))


def _require(conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
    if not conn.execute(
        "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
    ).fetchone():
        raise NotFound(f"lease {identifiers.goquote(lease_id)}")


def delete(conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
    _require(conn, namespace, lease_id)
    conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (namespace, lease_id))
    conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id))


def exists(conn: sqlite3.Connection, namespace: str, lease_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
    ).fetchone()
    return row is not None


def list_leases(conn: sqlite3.Connection, namespace: str, fs: Sequence[str]) -> list[Lease]:
    flt = filters.parse_all(fs)
    cursor = conn.execute(
        "SELECT id, created_at, labels FROM leases WHERE namespace = ? ORDER BY id", (namespace,)
    )
    cursor.row_factory = None
    found = [Lease(id, created, load_labels(lbls)) for id, created, lbls in cursor]
    if flt is filters.always:
        return found
    return [x for x in found if flt.match(filters.DictAdaptor({"id": x.id, "labels": x.labels}))]


def add_resource(conn: sqlite3.Connection, namespace: str, lease_id: str, r: Resource) -> None:
    _require(conn, namespace, lease_id)
    validate_resource(r)
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (namespace, lease_id, r.type, r.id),
    )


def delete_resource(conn: sqlite3.Connection, namespace: str, lease_id: str, r: Resource) -> None:
    _require(conn, namespace, lease_id)
    validate_resource(r)
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
        (namespace, lease_id, r.type, r.id),
    )


def list_resources(conn: sqlite3.Connection, namespace: str, lease_id: str) -> list[Resource]:
    _require(conn, namespace, lease_id)
    rows = conn.execute(
        "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, id",
        (namespace, lease_id),
    )
    # containerd lists content first, then ingests, then snapshots by snapshotter.
    order = {"content": 0, "ingests": 1}
    return sorted((Resource(r[1], r[0]) for r in rows), key=lambda r: (order.get(r.type, 2), r.type, r.id))
