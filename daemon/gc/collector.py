"""The collector: mark from the metadata, sweep what nothing reaches, in one write transaction.

The whole mark and the metadata sweep run as one transaction on the metadata thread, so no
writer can change the graph between them. Deleting blob files happens afterwards, under the
content lock held exclusively, which keeps a commit from publishing a blob that the sweep is
about to remove (commits hold the same lock shared).

Resource kinds register a :class:`Resource` description; content, ingests and leases are
built in, and snapshots, images and containers add theirs as they arrive.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from pyctr.api import labels as labelkeys
from pyctr.api.log import get_logger
from pyctr.daemon.content.local import LocalStore
from pyctr.daemon.gc import mark as gcmark
from pyctr.daemon.gc.mark import Node
from pyctr.daemon.metadata.db import DB, load_labels
from pyctr.daemon.rwlock import RWLock

log = get_logger("pyctrd.gc")


class Graph:
    """Everything the marker needs: the nodes, which are roots, and their references."""

    # A plain class and tuples below: creating a dataclass costs ~0.5 ms of every daemon start.
    def __init__(self) -> None:
        self.nodes: set[Node] = set()
        self.roots: set[Node] = set()
        self.edges: defaultdict[Node, list[Node]] = defaultdict(list)
        self.flat: set[Node] = set()
        # The structural part of edges (a snapshot's parent): followed even under a flat lease.
        self.parents: defaultdict[Node, list[Node]] = defaultdict(list)

    def add(
        self, node: Node, refs: Iterable[Node] = (), root: bool = False, parents: Iterable[Node] = ()
    ) -> None:
        self.nodes.add(node)
        if root:
            self.roots.add(node)
        self.edges[node].extend(refs)
        for parent in parents:
            self.edges[node].append(parent)
            self.parents[node].append(parent)


class Resource(NamedTuple):
    """A kind of object the collector knows: how to load it into the graph and remove it."""

    kind: str
    load: Callable[[sqlite3.Connection, Graph, int], None]
    remove: Callable[[sqlite3.Connection, Node], None]


class Stats(NamedTuple):
    """What one collection did."""

    removed: dict[str, int]
    blobs_deleted: int = 0
    seconds: float = 0.0


def parse_expiry(value: str) -> int | None:
    """An RFC 3339 time in ns, or None when unparsable (containerd then keeps the lease)."""
    import datetime

    try:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp() * 1e9)


def _load_leases(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    resources: dict[tuple[str, str], list[Node]] = defaultdict(list)
    for r in conn.execute("SELECT namespace, lease, type, id FROM lease_resources"):
        ns, lease, typ, ident = r
        if typ == "content":
            node = (gcmark.CONTENT, ns, ident)
        elif typ == "ingests":
            node = (gcmark.INGEST, ns, ident)
        elif typ.startswith("snapshots/"):
            node = (gcmark.SNAPSHOT, ns, f"{typ.split('/', 1)[1]}/{ident}")
        else:
            continue
        resources[(ns, lease)].append(node)
    for ns, ident, text in conn.execute("SELECT namespace, id, labels FROM leases"):
        lbls = load_labels(text)
        node = (gcmark.LEASE, ns, ident)
        expiry = lbls.get(labelkeys.GC_EXPIRE)
        expired = False
        if expiry:
            when = parse_expiry(expiry)
            expired = when is not None and when < now
        g.add(node, resources[(ns, ident)], root=not expired)
        if labelkeys.GC_FLAT in lbls:
            g.flat.add(node)


def _remove_lease(conn: sqlite3.Connection, node: Node) -> None:
    _, ns, ident = node
    conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ?", (ns, ident))
    conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (ns, ident))


def _load_content(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    for ns, dgst, text in conn.execute("SELECT namespace, digest, labels FROM content"):
        lbls = load_labels(text)
        g.add((gcmark.CONTENT, ns, dgst), gcmark.label_refs(ns, lbls), root=gcmark.is_root(lbls))


def _remove_content(conn: sqlite3.Connection, node: Node) -> None:
    conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (node[1], node[2]))


def _load_ingests(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    # A leased ingest (expires_at 0) lives through its lease; an unleased one for a day.
    for ns, ref, expires in conn.execute("SELECT namespace, ref, expires_at FROM ingests"):
        g.add((gcmark.INGEST, ns, ref), root=expires > now)


def _remove_ingest(conn: sqlite3.Connection, node: Node) -> None:
    conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (node[1], node[2]))


def _load_snapshots(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    for ns, sn, key, parent, text in conn.execute(
        "SELECT namespace, snapshotter, key, parent, labels FROM snapshots"
    ):
        lbls = load_labels(text)
        parents = [(gcmark.SNAPSHOT, ns, f"{sn}/{parent}")] if parent else []
        g.add(
            (gcmark.SNAPSHOT, ns, f"{sn}/{key}"), gcmark.label_refs(ns, lbls), gcmark.is_root(lbls), parents
        )


def _remove_snapshot(conn: sqlite3.Connection, node: Node) -> None:
    sn, key = node[2].split("/", 1)
    conn.execute(
        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", (node[1], sn, key)
    )


def _load_images(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    # Images are roots: they keep their target and whatever their labels reference.
    for ns, name, digest, text in conn.execute("SELECT namespace, name, target_digest, labels FROM images"):
        refs = [(gcmark.CONTENT, ns, digest), *gcmark.label_refs(ns, load_labels(text))]
        g.add((gcmark.IMAGE, ns, name), refs, root=True)


def _load_containers(conn: sqlite3.Connection, g: Graph, now: int) -> None:
    # Containers are roots: they keep their snapshot and whatever their labels reference.
    for ns, cid, sn, key, text in conn.execute(
        "SELECT namespace, id, snapshotter, snapshot_key, labels FROM containers"
    ):
        refs = list(gcmark.label_refs(ns, load_labels(text)))
        if sn and key:
            refs.append((gcmark.SNAPSHOT, ns, f"{sn}/{key}"))
        g.add((gcmark.CONTAINER, ns, cid), refs, root=True)


def _keep(conn: sqlite3.Connection, node: Node) -> None:
    """Roots are never swept."""


BUILTIN_RESOURCES = [
    Resource(gcmark.IMAGE, _load_images, _keep),
    Resource(gcmark.CONTAINER, _load_containers, _keep),
    Resource(gcmark.LEASE, _load_leases, _remove_lease),
    Resource(gcmark.CONTENT, _load_content, _remove_content),
    Resource(gcmark.INGEST, _load_ingests, _remove_ingest),
    Resource(gcmark.SNAPSHOT, _load_snapshots, _remove_snapshot),
]


class Collector:
    def __init__(self, db: DB, local: LocalStore | None, lock: RWLock) -> None:
        self.db = db
        self.local = local
        self.lock = lock
        self.resources: dict[str, Resource] = {r.kind: r for r in BUILTIN_RESOURCES}
        # Backends that hold objects of their own (snapshotters): each removes, after the metadata
        # sweep and still under the lock, what no record refers to any more; returns a count.
        self.backend_sweeps: dict[str, Callable[[], Awaitable[int]]] = {}

    def register(self, resource: Resource) -> None:
        self.resources[resource.kind] = resource

    def _mark_and_sweep(self, conn: sqlite3.Connection) -> tuple[dict[str, int], list[str], set[str]]:
        now = time.time_ns()
        g = Graph()
        for r in self.resources.values():
            r.load(conn, g, now)
        live = gcmark.mark(
            g.roots, lambda n: g.edges.get(n, ()), lambda n: n in g.flat, lambda n: g.parents.get(n, ())
        )
        removed: dict[str, int] = defaultdict(int)
        for node in sorted(g.nodes - live):
            resource = self.resources.get(node[0])
            if resource is not None:
                resource.remove(conn, node)
                removed[node[0]] += 1
        # What the backend still holds that no namespace refers to any more. An ingest's expected
        # blob stays too: a "shared" writer in another namespace commits it without sending bytes.
        kept_digests = {r[0] for r in conn.execute("SELECT DISTINCT digest FROM content")}
        kept_digests |= {
            r[0] for r in conn.execute("SELECT DISTINCT expected FROM ingests WHERE expected != ''")
        }
        kept_brefs = {r[0] for r in conn.execute("SELECT bref FROM ingests")}
        return dict(removed), sorted(kept_digests), kept_brefs

    async def collect(self) -> Stats:
        started = time.monotonic()
        async with self.lock.writer():
            removed, kept, kept_brefs = await self.db.update(self._mark_and_sweep)
            deleted = 0
            if self.local is not None:
                kept_set = set(kept)
                for dgst in self.local.walk():
                    if dgst not in kept_set:
                        try:
                            await self.local.delete(dgst)
                            deleted += 1
                        except Exception as exc:  # a blob that vanished meanwhile is fine
                            log.debug("blob removal failed", digest=dgst, error=str(exc))
                for bref in self.local.ingest_refs():
                    if bref not in kept_brefs and not self.local.locked(bref):
                        try:
                            await self.local.abort(bref)
                        except Exception as exc:
                            log.debug("ingest removal failed", ref=bref, error=str(exc))
            for name, sweep in self.backend_sweeps.items():
                try:
                    n = await sweep()
                except Exception as exc:
                    log.warning("backend sweep failed", backend=name, error=str(exc))
                    continue
                if n:
                    removed[f"{name} backend"] = n
        stats = Stats(removed, deleted, time.monotonic() - started)
        if removed or deleted:
            log.info("garbage collected", removed=removed, blobs=deleted, seconds=round(stats.seconds, 4))
        return stats
