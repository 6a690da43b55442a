"""Snapshot commits without a write of their own before the backend's: the backend name comes from
the active snapshot's, names in flight are reserved, and a committed snapshot is measured when
first asked for. A real metadata DB and the native snapshotter on a temp dir (root: it copies
trees with ``cp -a``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, NotFound
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.snapshots.store import SnapshotStore, committed_backend_key
from pyctr.snapshotter import storage
from pyctr.snapshotter.base import Kind
from pyctr.snapshotter.native import NativeSnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the native snapshotter copies trees as root")

NS = "commit-ns"


def run(tmp_path: Path, body: Callable[[SnapshotStore, NativeSnapshotter], Awaitable[None]]) -> None:
    async def main() -> None:
        db = await DB.open(str(tmp_path / "meta" / "meta.db"))
        backend = await NativeSnapshotter.create(str(tmp_path / "native"))
        assert isinstance(backend, NativeSnapshotter)
        try:
            await body(SnapshotStore("native", backend, db), backend)
        finally:
            await backend.close()
            await db.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("bkey", "key", "name", "expected"),
    [
        ("ns/7/extract-1 sha256:a", "extract-1 sha256:a", "sha256:b", "ns/7/sha256:b"),
        ("ns/12/a/b", "a/b", "c/d", "ns/12/c/d"),
        ("ns/3/k", "k", "ns/3/k2", "ns/3/ns/3/k2"),
    ],
)
def test_the_committed_backend_key_keeps_the_active_prefix(
    bkey: str, key: str, name: str, expected: str
) -> None:
    assert committed_backend_key(bkey, key, name) == expected


def test_a_backend_key_of_another_shape_is_refused() -> None:
    with pytest.raises(FailedPrecondition):
        committed_backend_key("ns/7/other", "key", "name")


def test_commit_names_the_backend_snapshot_after_the_active_one(tmp_path: Path) -> None:
    async def body(store: SnapshotStore, backend: NativeSnapshotter) -> None:
        await store.prepare(NS, "base-active", "", {}, "")
        await store.commit(NS, "base", "base-active", {}, "")
        await store.prepare(NS, "child-active", "base", {}, "")
        bkey_active, _ = await store._backend_key(NS, "child-active")
        await store.commit(NS, "child", "child-active", {"l": "v"}, "")
        bkey, info = await store._backend_key(NS, "child")
        assert bkey == bkey_active.removesuffix("child-active") + "child"
        assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "base", {"l": "v"})
        backend_names = {i.name for i in await backend.walk()}
        assert bkey in backend_names and bkey_active not in backend_names
        with pytest.raises(NotFound):
            await store.stat(NS, "child-active")
        # The sequence goes on from where the actives left it: no two snapshots share a prefix.
        await store.prepare(NS, "next", "child", {}, "")
        nkey, _ = await store._backend_key(NS, "next")
        assert nkey.split("/")[1] not in {b.split("/")[1] for b in backend_names}

    run(tmp_path, body)


def test_names_in_flight_are_reserved(tmp_path: Path) -> None:
    async def body(store: SnapshotStore, backend: NativeSnapshotter) -> None:
        await store.prepare(NS, "a", "", {}, "")
        await store.prepare(NS, "b", "", {}, "")
        release = asyncio.Event()
        real_commit = backend.commit

        async def slow_commit(*args: object, **kwargs: object) -> None:
            await release.wait()
            await real_commit(*args, **kwargs)  # type: ignore[arg-type]

        backend.commit = slow_commit  # type: ignore[method-assign]
        first = asyncio.create_task(store.commit(NS, "done", "a", {}, ""))
        await asyncio.sleep(0.05)
        with pytest.raises(AlreadyExists):
            await store.commit(NS, "done", "b", {}, "")  # the name a commit is creating
        with pytest.raises(FailedPrecondition):
            await store.commit(NS, "other", "a", {}, "")  # the key a commit is consuming
        with pytest.raises(AlreadyExists):
            await store.prepare(NS, "done", "", {}, "")
        release.set()
        await first
        backend.commit = real_commit  # type: ignore[method-assign]
        await store.commit(NS, "other", "b", {}, "")
        referenced = {(await store._backend_key(NS, k))[0] for k in ("done", "other")}
        assert referenced == {i.name for i in await backend.walk()}

    run(tmp_path, body)


def test_a_failed_backend_commit_leaves_the_active_snapshot(tmp_path: Path) -> None:
    async def body(store: SnapshotStore, backend: NativeSnapshotter) -> None:
        await store.prepare(NS, "a", "", {}, "")

        async def broken(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        real_commit = backend.commit
        backend.commit = broken  # type: ignore[method-assign]
        with pytest.raises(OSError, match="No space"):
            await store.commit(NS, "done", "a", {}, "")
        backend.commit = real_commit  # type: ignore[method-assign]
        assert (await store.stat(NS, "a")).kind == Kind.ACTIVE
        await store.commit(NS, "done", "a", {}, "")  # and it can be committed again
        assert (await store.stat(NS, "done")).kind == Kind.COMMITTED

    run(tmp_path, body)


def test_committed_snapshots_are_measured_when_first_asked(tmp_path: Path) -> None:
    async def body(store: SnapshotStore, backend: NativeSnapshotter) -> None:
        mounts = await store.prepare(NS, "a", "", {}, "")
        root = Path(mounts[0].source)
        (root / "f").write_bytes(b"x" * 10_000)
        (root / "d").mkdir()
        active = await store.usage(NS, "a")
        await store.commit(NS, "done", "a", {}, "")
        bkey, _ = await store._backend_key(NS, "done")
        _, _, stored = await backend.store.tx(lambda c: storage.get_info(c, bkey))
        assert stored == storage.UNMEASURED
        assert await store.usage(NS, "done") == active
        _, _, stored = await backend.store.tx(lambda c: storage.get_info(c, bkey))
        assert stored == active

    run(tmp_path, body)
