"""Content records: which blobs each namespace sees, with their labels; and open ingests.

Functions run inside a metadata transaction (see ``db.DB``). Lease bookkeeping follows
containerd: a blob committed, or an ingest opened, under a lease is added to that lease.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyctr.api import filters, labels
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, NotFound
from pyctr.api.identifiers import goquote
from pyctr.daemon.metadata import leases
from pyctr.daemon.metadata.db import dump_labels, ensure_namespace, load_labels, now_ns, set_labels

INGEST_EXPIRY_NS = 24 * 3600 * 1_000_000_000  # an unleased ingest is kept for a day


@dataclass(frozen=True)
class Info:
    digest: str
    size: int
    created_at: int
    updated_at: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ingest:
    ref: str
    bref: str
    expected: str
    expires_at: int


def _row(row: sqlite3.Row) -> Info:
    return Info(row["digest"], row["size"], row["created_at"], row["updated_at"], load_labels(row["labels"]))


def get(conn: sqlite3.Connection, ns: str, dgst: str) -> Info:
    row = conn.execute(
        "SELECT digest, size, created_at, updated_at, labels FROM content WHERE namespace = ? AND digest = ?",
        (ns, dgst),
    ).fetchone()
    if row is None:
        raise NotFound(f"content digest {dgst}")
    return _row(row)


def watch_deletes(conn: sqlite3.Connection, name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` (on the metadata thread) whenever a content row is deleted, by anyone.

    A TEMP trigger lives with this connection only (no schema change); it calls a function
    registered here, under ``name``, for every deleted row: Delete and the collector's sweep alike.
    """
    if not name.isidentifier():
        raise ValueError(f"bad trigger name {name!r}")

    def deleted() -> None:
        callback()

    conn.create_function(name, 0, deleted)
    conn.execute(
        f"CREATE TEMP TRIGGER IF NOT EXISTS {name} AFTER DELETE ON main.content BEGIN SELECT {name}(); END"
    )


def exists(conn: sqlite3.Connection, ns: str, dgst: str) -> bool:
    row = conn.execute("SELECT 1 FROM content WHERE namespace = ? AND digest = ?", (ns, dgst)).fetchone()
    return row is not None


def referenced_anywhere(conn: sqlite3.Connection, dgst: str) -> bool:
    return conn.execute("SELECT 1 FROM content WHERE digest = ? LIMIT 1", (dgst,)).fetchone() is not None


def adaptor(info: Info) -> filters.DictAdaptor:
    return filters.DictAdaptor({"digest": info.digest, "size": str(info.size), "labels": info.labels})


def list_infos(conn: sqlite3.Connection, ns: str, fs: Sequence[str]) -> list[Info]:
    flt = filters.parse_all(fs)
    rows = conn.execute(
        "SELECT digest, size, created_at, updated_at, labels FROM content"
        " WHERE namespace = ? ORDER BY digest",
        (ns,),
    )
    return [info for info in map(_row, rows) if flt.match(adaptor(info))]


def insert(conn: sqlite3.Connection, ns: str, dgst: str, size: int, lbls: dict[str, str], lease: str) -> Info:
    """Make a committed blob visible in ``ns``; AlreadyExists if it already was."""
    labels.validate_all(lbls)
    ensure_namespace(conn, ns)
    if lease:
        add_to_lease(conn, ns, lease, "content", dgst)
    if exists(conn, ns, dgst):
        raise AlreadyExists(f"content {dgst}")
    t = now_ns()
    conn.execute(
        "INSERT INTO content(namespace, digest, size, labels, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (ns, dgst, size, dump_labels(lbls), t, t),
    )
    return Info(dgst, size, t, t, set_labels(lbls))


def add_to_lease(conn: sqlite3.Connection, ns: str, lease: str, type_: str, ident: str) -> None:
    if not leases.exists(conn, ns, lease):
        raise NotFound("lease does not exist")
    conn.execute(
        "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
        (ns, lease, type_, ident),
    )


def update(conn: sqlite3.Connection, ns: str, dgst: str, new: dict[str, str], paths: Sequence[str]) -> Info:
    """Labels only: ``labels`` replaces them, ``labels.<key>`` sets or (empty value) clears one."""
    info = get(conn, ns, dgst)
    current = dict(info.labels)
    if not paths:
        current = dict(new)
    for path in paths:
        if path == "labels":
            current = dict(new)
        elif path.startswith("labels."):
            key = path.removeprefix("labels.")
            current[key] = new.get(key, "")
        else:
            raise InvalidArgument(f"cannot update {goquote(path)} field on content info {goquote(dgst)}")
    current = {k: v for k, v in current.items() if v}
    labels.validate_all(current)
    t = now_ns()
    conn.execute(
        "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
        (dump_labels(current), t, ns, dgst),
    )
    return Info(dgst, info.size, info.created_at, t, current)


def delete(conn: sqlite3.Connection, ns: str, dgst: str) -> None:
    cur = conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (ns, dgst))
    if cur.rowcount == 0:
        raise NotFound(f"content digest {dgst}")


# -- ingests --------------------------------------------------------------------------------------


def open_ingest(conn: sqlite3.Connection, ns: str, ref: str, expected: str, lease: str) -> Ingest:
    """Record (or find) the namespace's ingest ``ref``; its backend ref is namespaced."""
    ensure_namespace(conn, ns)
    row = conn.execute(
        "SELECT bref, expected FROM ingests WHERE namespace = ? AND ref = ?", (ns, ref)
    ).fetchone()
    expires = 0
    if lease:
        add_to_lease(conn, ns, lease, "ingests", ref)
    else:
        expires = now_ns() + INGEST_EXPIRY_NS
    if row is None:
        bref = f"{ns}/{ref}"
        conn.execute(
            "INSERT INTO ingests(namespace, ref, bref, expected, expires_at) VALUES (?, ?, ?, ?, ?)",
            (ns, ref, bref, expected, expires),
        )
        return Ingest(ref, bref, expected, expires)
    conn.execute(
        "UPDATE ingests SET expires_at = ?, expected = ? WHERE namespace = ? AND ref = ?",
        (expires, expected or row["expected"], ns, ref),
    )
    return Ingest(ref, row["bref"], expected or row["expected"], expires)


def get_ingest(conn: sqlite3.Connection, ns: str, ref: str) -> Ingest:
    row = conn.execute(
        "SELECT ref, bref, expected, expires_at FROM ingests WHERE namespace = ? AND ref = ?", (ns, ref)
    ).fetchone()
    if row is None:
        raise NotFound(f"ingest ref {goquote(ref)}")
    return Ingest(row["ref"], row["bref"], row["expected"], row["expires_at"])


def list_ingests(conn: sqlite3.Connection, ns: str) -> list[Ingest]:
    rows = conn.execute(
        "SELECT ref, bref, expected, expires_at FROM ingests WHERE namespace = ? ORDER BY ref", (ns,)
    )
    return [Ingest(r["ref"], r["bref"], r["expected"], r["expires_at"]) for r in rows]


def remove_ingest(conn: sqlite3.Connection, ns: str, ref: str, lease: str) -> None:
    conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (ns, ref))
    if lease:
        conn.execute(
            "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = 'ingests' AND id = ?",
            (ns, lease, ref),
        )
