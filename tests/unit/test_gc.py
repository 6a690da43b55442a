"""Garbage collection: the pure marker, and the collector over a real sqlite DB and LocalStore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api import digest as digestmod
from pyctr.api import labels as labelkeys
from pyctr.daemon.content import testsuite
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.gc import mark as gcmark
from pyctr.daemon.gc.collector import Collector
from pyctr.daemon.gc.mark import Node
from pyctr.daemon.metadata import leases

NS = "gc-a"
OTHER = "gc-b"


# -- label references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("containerd.io/gc.ref.content", [("content", NS, "V")]),
        ("containerd.io/gc.ref.content.m.0", [("content", NS, "V")]),
        ("containerd.io/gc.ref.content.config", [("content", NS, "V")]),
        ("containerd.io/gc.ref.content/x", [("content", NS, "V")]),
        ("containerd.io/gc.ref.content.", [("content", NS, "V")]),
        ("containerd.io/gc.ref.snapshot.overlayfs", [("snapshot", NS, "overlayfs/V")]),
        ("containerd.io/gc.ref.snapshot.overlayfs/1", [("snapshot", NS, "overlayfs/V")]),
        ("containerd.io/gc.ref.snapshot.native/a/b", [("snapshot", NS, "native/V")]),
        ("containerd.io/gc.ref.contentx", []),
        ("containerd.io/gc.ref.content_x", []),
        ("containerd.io/gc.ref.contents.0", []),
        ("containerd.io/gc.ref.snapshot", []),
        ("x/containerd.io/gc.ref.content", []),
        ("containerd.io/gc.root", []),
        ("containerd.io/gc.ref", []),
        ("gc.ref.content", []),
    ],
)
def test_label_refs(key: str, expected: list[Node]) -> None:
    assert list(gcmark.label_refs(NS, {key: "V"})) == expected


def test_label_refs_many_and_root() -> None:
    lbls = {
        "containerd.io/gc.ref.content.l.0": "sha256:a",
        "containerd.io/gc.ref.content.l.1": "sha256:b",
        "containerd.io/gc.ref.snapshot.overlayfs": "key",
        "unrelated": "sha256:c",
    }
    assert sorted(gcmark.label_refs("ns", lbls)) == [
        ("content", "ns", "sha256:a"),
        ("content", "ns", "sha256:b"),
        ("snapshot", "ns", "overlayfs/key"),
    ]
    assert gcmark.is_root({labelkeys.GC_ROOT: ""}) and gcmark.is_root({labelkeys.GC_ROOT: "x"})
    assert not gcmark.is_root({"containerd.io/gc.rootx": "1"})


# -- marking ----------------------------------------------------------------------------------------


def c(key: str) -> Node:
    return ("content", "ns", key)


def graph(edges: dict[Node, list[Node]]) -> Callable[[Node], list[Node]]:
    return lambda n: edges.get(n, [])


def test_mark_cycles() -> None:
    edges = {c("a"): [c("b")], c("b"): [c("c")], c("c"): [c("a"), c("d")], c("x"): [c("a")]}
    assert gcmark.mark([c("a")], graph(edges)) == {c("a"), c("b"), c("c"), c("d")}
    assert gcmark.mark([c("c")], graph(edges)) == {c("a"), c("b"), c("c"), c("d")}
    assert gcmark.mark([c("x")], graph(edges)) == {c("x"), c("a"), c("b"), c("c"), c("d")}
    assert gcmark.mark([], graph(edges)) == set()
    # A self-loop and a root referencing nothing.
    assert gcmark.mark([c("s")], graph({c("s"): [c("s")]})) == {c("s")}


def test_mark_flat_lease() -> None:
    lease = ("lease", "ns", "L")
    edges = {lease: [c("m")], c("m"): [c("layer")], c("other"): [c("layer2")], c("layer2"): [c("deep")]}
    flat = {lease}
    assert gcmark.mark([lease], graph(edges), lambda n: n in flat) == {lease, c("m")}
    # Without the flat label, the lease keeps everything its content references.
    assert gcmark.mark([lease], graph(edges)) == {lease, c("m"), c("layer")}
    # What a flat lease keeps shallowly is still followed when reached from a full root.
    both = gcmark.mark([lease, c("m")], graph(edges), lambda n: n in flat)
    assert both == {lease, c("m"), c("layer")}
    both = gcmark.mark([c("m"), lease], graph(edges), lambda n: n in flat)
    assert both == {lease, c("m"), c("layer")}


def test_mark_flat_lease_keeps_snapshot_parents() -> None:
    lease = ("lease", "ns", "L")
    s1, s2, s3 = (("snapshot", "ns", f"overlayfs/{k}") for k in ("s1", "s2", "s3"))
    edges = {lease: [s3], s3: [s2, c("config")], s2: [s1], s1: [c("deep")]}
    parents = {s3: [s2], s2: [s1]}
    flat = {lease}
    marked = gcmark.mark([lease], graph(edges), lambda n: n in flat, graph(parents))
    assert marked == {lease, s3, s2, s1}, "a flat lease keeps the snapshot's chain, not its label refs"
    assert gcmark.mark([lease], graph(edges), lambda n: n in flat) == {lease, s3}


def _closure(start: set[int], step: dict[int, set[int]], expand: Callable[[int], bool]) -> set[int]:
    found = set(start)
    while True:
        grown = found | {child for n in found if expand(n) for child in step.get(n, set())}
        if grown == found:
            return found
        found = grown


def _reference_mark(
    roots: set[int], edges: dict[int, set[int]], flat: set[int], parents: dict[int, set[int]] | None = None
) -> set[int]:
    """Fixpoints, written independently of mark(): live nodes expand unless flat; what a flat node
    holds is kept, with its parent chain."""
    live = _closure(roots, edges, lambda n: n not in flat)
    held = {child for n in live & flat for child in edges.get(n, set())}
    return live | _closure(held, parents or {}, lambda n: True)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[set[int], dict[int, set[int]], set[int], dict[int, set[int]]]:
    n = draw(st.integers(min_value=1, max_value=25))
    node = st.integers(min_value=0, max_value=n - 1)
    pairs = draw(st.lists(st.tuples(node, node, st.booleans()), max_size=60))
    edges: dict[int, set[int]] = {}
    parents: dict[int, set[int]] = {}
    for a, b, is_parent in pairs:
        edges.setdefault(a, set()).add(b)
        if is_parent:
            parents.setdefault(a, set()).add(b)
    roots = draw(st.sets(node, max_size=5))
    flat = draw(st.sets(node, max_size=3))
    return roots, edges, flat, parents


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_mark_is_reachability(g: tuple[set[int], dict[int, set[int]], set[int], dict[int, set[int]]]) -> None:
    roots, edges, flat, parents = g

    def node(i: int) -> Node:
        return c(str(i))

    nodes_edges = {node(a): [node(b) for b in sorted(bs)] for a, bs in edges.items()}
    # Without flat nodes: exactly what a root reaches, and nothing else.
    marked = gcmark.mark([node(r) for r in roots], graph(nodes_edges))
    assert marked == {node(i) for i in _reference_mark(roots, edges, set())}
    reachable = {node(i) for i in _reference_mark(roots, edges, set())}
    assert all(child in marked for n in marked for child in nodes_edges.get(n, []))
    assert not marked - reachable
    # With flat nodes: their direct references are kept, not what those reference.
    flat_nodes = {node(f) for f in flat}
    marked = gcmark.mark([node(r) for r in roots], graph(nodes_edges), lambda n: n in flat_nodes)
    assert marked == {node(i) for i in _reference_mark(roots, edges, flat)}
    # What a flat node holds keeps its parents, transitively, and nothing else more.
    node_parents = {node(a): [node(b) for b in sorted(bs)] for a, bs in parents.items()}
    marked = gcmark.mark(
        [node(r) for r in roots], graph(nodes_edges), lambda n: n in flat_nodes, graph(node_parents)
    )
    assert marked == {node(i) for i in _reference_mark(roots, edges, flat, parents)}


# -- the collector on a real store -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def env(root: str) -> AsyncIterator[tuple[ContentStore, Collector]]:
    async with testsuite.local_store(root) as store:
        yield store, Collector(store.db, store.local, store.lock)


def run(root: object, fn: Callable[[ContentStore, Collector], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with env(str(root)) as (store, collector):
            await fn(store, collector)

    asyncio.run(main())


async def commit(
    store: ContentStore,
    ns: str,
    data: bytes,
    lbls: dict[str, str] | None = None,
    lease: str = "",
    expected: bool = True,
) -> str:
    """Write and commit ``data``; without ``expected`` the digest is only known at commit (import)."""
    dgst = digestmod.of(data)
    w = await store.writer(ns, f"ref-{dgst[7:19]}", len(data), dgst if expected else "", lease)
    try:
        await w.write(data[w.status().offset :])
        return await w.commit(len(data), dgst if expected else "", lbls or {})
    finally:
        w.close()


async def new_lease(store: ContentStore, ns: str, lease_id: str, lbls: dict[str, str] | None = None) -> None:
    await store.db.update(lambda conn: leases.create(conn, ns, lease_id, lbls or {}))


async def drop_lease(store: ContentStore, ns: str, lease_id: str) -> None:
    await store.db.update(lambda conn: leases.delete(conn, ns, lease_id))


async def rows(store: ContentStore, ns: str) -> set[str]:
    return {i.digest for i in await store.list(ns, [])}


def on_disk(store: ContentStore, dgst: str) -> bool:
    return os.path.exists(store.local.blob_path(dgst))


def test_unreferenced_content_is_collected(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        dgst = await commit(store, NS, b"nobody wants me")
        assert on_disk(store, dgst)
        stats = await collector.collect()
        assert stats.removed == {"content": 1} and stats.blobs_deleted == 1
        assert await rows(store, NS) == set()
        assert not on_disk(store, dgst), "blob file left after its last row went"
        assert (await collector.collect()).blobs_deleted == 0

    run(tmp_path, body)


def test_lease_keeps_content_and_its_references(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        await new_lease(store, NS, "L")
        layer = await commit(store, NS, b"layer")
        config = await commit(store, NS, b"config")
        manifest = await commit(
            store,
            NS,
            b"manifest",
            {"containerd.io/gc.ref.content.l.0": layer, "containerd.io/gc.ref.content.config": config},
            lease="L",
        )
        stray = await commit(store, NS, b"stray")
        await collector.collect()
        assert await rows(store, NS) == {manifest, layer, config}
        assert all(on_disk(store, d) for d in (manifest, layer, config)) and not on_disk(store, stray)
        # Another lease going away changes nothing.
        await new_lease(store, NS, "other")
        await drop_lease(store, NS, "other")
        await collector.collect()
        assert await rows(store, NS) == {manifest, layer, config}
        await drop_lease(store, NS, "L")
        await collector.collect()
        assert await rows(store, NS) == set()
        assert not any(on_disk(store, d) for d in (manifest, layer, config))

    run(tmp_path, body)


def test_flat_lease_keeps_only_what_it_holds(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        await new_lease(store, NS, "flat", {labelkeys.GC_FLAT: "1"})
        layer = await commit(store, NS, b"layer of a flat-leased manifest")
        manifest = await commit(
            store, NS, b"flat manifest", {"containerd.io/gc.ref.content.l.0": layer}, "flat"
        )
        await collector.collect()
        assert await rows(store, NS) == {manifest}
        assert on_disk(store, manifest) and not on_disk(store, layer)

    run(tmp_path, body)


def test_flat_lease_keeps_a_snapshot_with_its_parents(tmp_path: object) -> None:
    """A flat lease holding an active snapshot keeps its committed parents (as containerd does)."""

    async def body(store: ContentStore, collector: Collector) -> None:
        config = await commit(store, NS, b"config")
        await new_lease(store, NS, "build", {labelkeys.GC_FLAT: "1"})

        def setup(conn: Any) -> None:
            for key, parent, lbls in (
                ("base", "", "{}"),
                ("mid", "base", "{}"),
                ("active", "mid", f'{{"containerd.io/gc.ref.content.c": "{config}"}}'),
                ("stray", "", "{}"),
            ):
                conn.execute(
                    "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels,"
                    " created_at, updated_at) VALUES (?, 'overlayfs', ?, ?, ?, 1, ?, 1, 1)",
                    (NS, key, f"{NS}/{key}", parent, lbls),
                )
            leases.add_resource(conn, NS, "build", leases.Resource("active", "snapshots/overlayfs"))

        await store.db.update(setup)
        await collector.collect()
        keys = await store.db.view(
            lambda conn: sorted(
                r[0] for r in conn.execute("SELECT key FROM snapshots WHERE namespace = ?", (NS,))
            )
        )
        assert keys == ["active", "base", "mid"], keys
        assert await rows(store, NS) == set(), "a flat lease kept what its snapshot's labels reference"

    run(tmp_path, body)


def test_expired_lease_does_not_protect_and_is_removed(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        await new_lease(store, NS, "old", {labelkeys.GC_EXPIRE: "2001-02-03T04:05:06Z"})
        await new_lease(store, NS, "fresh", {labelkeys.GC_EXPIRE: "2999-01-01T00:00:00Z"})
        await new_lease(store, NS, "garbled", {labelkeys.GC_EXPIRE: "not a time"})
        gone = await commit(store, NS, b"under the old lease", lease="old")
        kept = await commit(store, NS, b"under the fresh lease", lease="fresh")
        kept2 = await commit(store, NS, b"under the garbled lease", lease="garbled")
        stats = await collector.collect()
        assert stats.removed == {"content": 1, "lease": 1}
        assert await rows(store, NS) == {kept, kept2}
        assert not on_disk(store, gone) and on_disk(store, kept)
        ids = await store.db.view(lambda conn: [x.id for x in leases.list_leases(conn, NS, [])])
        assert ids == ["fresh", "garbled"]

    run(tmp_path, body)


def test_gc_root_keeps_a_blob(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        root = await commit(store, NS, b"rooted", {labelkeys.GC_ROOT: "2024-01-01T00:00:00Z"})
        child = await commit(store, NS, b"child")
        await store.update(
            NS, root, {"containerd.io/gc.ref.content.0": child}, ["labels.containerd.io/gc.ref.content.0"]
        )
        await collector.collect()
        assert await rows(store, NS) == {root, child}
        await store.update(NS, root, {}, [f"labels.{labelkeys.GC_ROOT}"])
        await collector.collect()
        assert await rows(store, NS) == set() and not on_disk(store, root) and not on_disk(store, child)

    run(tmp_path, body)


def test_other_namespace_keeps_the_file(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        data = b"in two namespaces"
        dgst = await commit(store, OTHER, data, {labelkeys.GC_ROOT: "x"})
        assert await commit(store, NS, data) == dgst  # the shared path: no bytes written
        await collector.collect()
        assert await rows(store, NS) == set(), "this namespace's unreferenced row survived"
        assert await rows(store, OTHER) == {dgst}
        assert on_disk(store, dgst)
        assert await testsuite.read_all(store, OTHER, dgst) == data
        await store.delete(OTHER, dgst)
        await collector.collect()
        assert not on_disk(store, dgst)

    run(tmp_path, body)


def test_ingest_expiry(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        await new_lease(store, NS, "L")
        for ref, lease in (("young", ""), ("old", ""), ("leased", "L")):
            w = await store.writer(NS, ref, 0, "", lease)
            await w.write(ref.encode())
            w.close()
        # A day passes for "old" (the clock cannot be moved for real, the row can).
        await store.db.update(
            lambda conn: conn.execute(
                "UPDATE ingests SET expires_at = 1 WHERE namespace = ? AND ref = 'old'", (NS,)
            )
        )
        stats = await collector.collect()
        assert stats.removed == {"ingest": 1}
        assert {s.ref for s in await store.list_statuses(NS, [])} == {"young", "leased"}
        assert not os.path.exists(store.local.ingest_path(f"{NS}/old")), "expired ingest's bytes left"
        assert os.path.exists(store.local.ingest_path(f"{NS}/young"))
        await drop_lease(store, NS, "L")
        await collector.collect()
        assert {s.ref for s in await store.list_statuses(NS, [])} == {"young"}
        assert not os.path.exists(store.local.ingest_path(f"{NS}/leased"))

    run(tmp_path, body)


def test_open_ingest_is_not_removed_under_the_writer(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        w = await store.writer(NS, "busy", 0, "", "")
        try:
            await w.write(b"part one ")
            await store.db.update(lambda conn: conn.execute("UPDATE ingests SET expires_at = 1"))
            await collector.collect()
            assert os.path.exists(os.path.join(store.local.ingest_path(f"{NS}/busy"), "data"))
            await w.write(b"part two")
            dgst = await w.commit(0, "", {labelkeys.GC_ROOT: "x"})
        finally:
            w.close()
        assert await testsuite.read_all(store, NS, dgst) == b"part one part two"

    run(tmp_path, body)


def test_orphan_blob_is_deleted(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        # The state a crash between the rename and the metadata insert leaves: a blob, no row.
        w = await store.local.writer("crashed", 0)
        await w.write(b"orphan")
        dgst = await w.commit(0, "")
        kept = await commit(store, NS, b"kept", {labelkeys.GC_ROOT: "x"})
        assert on_disk(store, dgst)
        stats = await collector.collect()
        assert stats.blobs_deleted == 1
        assert not on_disk(store, dgst) and on_disk(store, kept)
        # A backend ingest nobody records (crash before the row) goes too.
        w = await store.local.writer("unrecorded", 0)
        await w.write(b"x")
        w.close()
        await collector.collect()
        assert store.local.ingest_refs() == []

    run(tmp_path, body)


def test_shared_ingest_keeps_the_blob_it_expects(tmp_path: object) -> None:
    """b's ingest expects a blob only a has; a deletes it; b's commit without data must still work."""

    async def body(store: ContentStore, collector: Collector) -> None:
        data = b"shared between namespaces"
        dgst = await commit(store, NS, data)
        # While the writer is open (a pull between STAT and COMMIT) ...
        w = await store.writer(OTHER, "pull", len(data), dgst, "")
        try:
            assert w.status().offset == len(data)
            await store.delete(NS, dgst)
            await collector.collect()
            assert on_disk(store, dgst), "the blob an open shared writer expects was collected"
            assert await w.commit(len(data), dgst, {labelkeys.GC_ROOT: "x"}) == dgst
        finally:
            w.close()
        assert await testsuite.read_all(store, OTHER, dgst) == data
        # ... and after it closed, with the ingest left to resume.
        data = b"shared, then resumed"
        dgst = await commit(store, NS, data)
        w = await store.writer(OTHER, "pull2", len(data), dgst, "")
        w.close()
        await store.delete(NS, dgst)
        await collector.collect()
        assert on_disk(store, dgst), "the blob a shared ingest expects was collected"
        w = await store.writer(OTHER, "pull2", len(data), dgst, "")
        try:
            assert w.status().offset == len(data)
            assert await w.commit(len(data), dgst, {labelkeys.GC_ROOT: "x"}) == dgst
        finally:
            w.close()
        await collector.collect()
        assert await testsuite.read_all(store, OTHER, dgst) == data

    run(tmp_path, body)


def test_commit_racing_collection_never_loses_a_blob(tmp_path: object) -> None:
    async def body(store: ContentStore, collector: Collector) -> None:
        rng = random.Random(7)
        await new_lease(store, NS, "L")
        protected: set[str] = set()

        async def one(i: int) -> None:
            data = rng.randbytes(rng.choice([10, 4096, 300_000])) + str(i).encode()
            how = i % 3  # by a lease, by gc.root, or by nothing
            lbls = {labelkeys.GC_ROOT: "x"} if how == 1 else {}
            ns = NS if i % 4 else OTHER
            lease = "L" if how == 0 and ns == NS else ""
            dgst = await commit(store, ns, data, lbls, lease, expected=i % 2 == 0)
            if how == 1 or (how == 0 and ns == NS):
                protected.add(dgst)

        async def collecting(done: asyncio.Event) -> None:
            # Back to back, but yielding between runs as the scheduler does: the lock prefers
            # writers, so a collector that re-locked at once would keep every commit waiting.
            while not done.is_set():
                await collector.collect()
                await asyncio.sleep(0)

        for round_ in range(10):
            done = asyncio.Event()
            commits: list[Coroutine[Any, Any, Any]] = [one(round_ * 10 + k) for k in range(8)]
            jobs = [asyncio.ensure_future(j) for j in commits]
            background = [asyncio.ensure_future(collecting(done))]
            await asyncio.gather(*jobs)
            done.set()
            await asyncio.gather(*background)
            # Invariant at every step: a row never outlives its bytes.
            for ns in (NS, OTHER):
                for dgst in await rows(store, ns):
                    assert on_disk(store, dgst), f"row {dgst} in {ns} without its blob"
        await collector.collect()
        everything = await rows(store, NS) | await rows(store, OTHER)
        assert protected <= everything, f"lost committed blobs: {protected - everything}"
        assert set(store.local.walk()) == everything, "blobs on disk differ from the rows"

    run(tmp_path, body)


def test_shared_writer_racing_collection(tmp_path: object) -> None:
    """A writer in b finding a's unreferenced blob while a collection removes it: either it shares
    the blob and the blob stays, or it does not share and the client sends the bytes."""

    async def body(store: ContentStore, collector: Collector) -> None:
        for i in range(60):
            data = f"blob {i} ".encode() * (1 + i % 5)
            dgst = await commit(store, NS, data)  # unreferenced: the next collection takes it

            async def pull(data: bytes = data, i: int = i) -> None:
                await asyncio.sleep(0.0005 * (i % 4))  # land at different points of the collection
                await commit(store, OTHER, data, {labelkeys.GC_ROOT: "x"})

            await asyncio.gather(collector.collect(), pull())
            assert on_disk(store, dgst), f"round {i}: b's committed blob has no bytes"
            assert await testsuite.read_all(store, OTHER, dgst) == data

    run(tmp_path, body)
