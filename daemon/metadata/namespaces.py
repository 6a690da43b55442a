"""Namespace records: their labels, and whether anything still lives in them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from pyctr.api import identifiers, labels
from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, NotFound
from pyctr.daemon.metadata.db import dump_labels, ensure_namespace, load_labels, now_ns

# Tables whose rows keep a namespace from being deleted, with the word containerd uses for them,
# in containerd's order (images, blobs, containers, snapshots). Each schema version that adds such
# a table adds it here.
OWNED_TABLES: list[tuple[str, str]] = [
    ("images", "images"),
    ("content", "blobs"),
    ("containers", "containers"),
]


def _snapshot_words(conn: sqlite3.Connection, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT DISTINCT snapshotter FROM snapshots WHERE namespace = ? ORDER BY snapshotter", (name,)
    )
    return [f"snapshots on {identifiers.goquote(r[0])} snapshotter" for r in rows]


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


def create(conn: sqlite3.Connection, name: str, lbls: dict[str, str]) -> Namespace:
    identifiers.validate(name)
    labels.validate_all(lbls, "namespace.Labels")
    if conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
        raise AlreadyExists(f"namespace {identifiers.goquote(name)}")
    t = now_ns()
    conn.execute(
        "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
        (name, dump_labels(lbls, keep_empty=True), t, t),
    )
    return Namespace(name, dict(lbls))


def get_labels(conn: sqlite3.Connection, name: str) -> dict[str, str]:
    """Labels of a namespace; an unknown one has none (containerd never says NotFound here)."""
    row = conn.execute("SELECT labels FROM namespaces WHERE name = ?", (name,)).fetchone()
    return {} if row is None else load_labels(row[0])


def list_names(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM namespaces ORDER BY name")]


def set_labels(conn: sqlite3.Connection, name: str, lbls: dict[str, str]) -> None:
    """Store the complete label set, creating the namespace if needed; empty values delete keys."""
    identifiers.validate(name)
    clean = {k: v for k, v in lbls.items() if v}
    labels.validate_all(clean, "namespace.Labels")
    ensure_namespace(conn, name)
    conn.execute(
        "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
        (dump_labels(clean), now_ns(), name),
    )


def delete(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is None:
        raise NotFound(f"namespace {identifiers.goquote(name)}")
    owned = [
        word
        for table, word in OWNED_TABLES
        if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()
    ]
    owned += _snapshot_words(conn, name)
    if owned:
        raise FailedPrecondition(
            f"namespace {identifiers.goquote(name)} must be empty, but it still has {', '.join(owned)}"
        )
    # Leases and unfinished ingests go with their namespace, as their buckets do in containerd.
    conn.execute("DELETE FROM ingests WHERE namespace = ?", (name,))
    conn.execute("DELETE FROM lease_resources WHERE namespace = ?", (name,))
    conn.execute("DELETE FROM leases WHERE namespace = ?", (name,))
    conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))
