"""The content-store conformance suite: importable, runnable against any ``ContentStore`` factory.

Modelled on containerd's ``content/testsuite`` (read, not copied): every case is a plain async
function taking a :data:`Factory` -- something that, given an empty directory, yields a fresh
``ContentStore`` rooted there (and closes it afterwards). ``CASES`` lists them for a test runner
to parametrize over; :func:`run_all` runs them in order. Failures are ``AssertionError``s that say
what differed; the suite imports nothing from a test framework.

The reference behaviour is containerd's metadata content store with the "shared" policy:

* one writer per ref (a second gets ``Unavailable``); a closed writer resumes where it stopped;
* a commit checks size and digest (``FailedPrecondition``) and publishes nothing when they differ;
* a digest already in the namespace is ``AlreadyExists`` -- when opening a writer that expects it,
  and when committing it again;
* a blob committed in one namespace is invisible in another until committed there, but a writer in
  the other namespace that expects it starts complete (offset == total) and commits without data.

pyctrd also accepts sha384/sha512 expected digests (containerd's local store hashes sha256 only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pyctr.api import digest as digestmod
from pyctr.api.errdefs import (
    AlreadyExists,
    ContainerdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from pyctr.daemon.content.local import LocalStore
from pyctr.daemon.content.store import ContentStore, NamespacedWriter
from pyctr.daemon.metadata import content as meta
from pyctr.daemon.metadata.db import DB

# A factory turns an empty directory into a store for the duration of the ``async with``.
Factory = Callable[[str], contextlib.AbstractAsyncContextManager[ContentStore]]
Case = Callable[[Factory], Awaitable[None]]
E = TypeVar("E", bound=ContainerdError)

NS = "suite-a"
OTHER = "suite-b"
LABELS = {"name": "value", "containerd.io/gc.root": "2006-01-02T15:04:05Z"}


@contextlib.asynccontextmanager
async def local_store(root: str) -> AsyncIterator[ContentStore]:
    """pyctrd's own store: sqlite metadata over the local blob store, as the plugins build it."""
    db = await DB.open(os.path.join(root, "io.containerd.metadata.v1.sqlite", "meta.db"))
    try:
        yield ContentStore(db, LocalStore(os.path.join(root, "io.containerd.content.v1.content")))
    finally:
        await db.close()


# -- helpers ----------------------------------------------------------------------------------------


def blob(size: int, seed: int | None = None) -> tuple[bytes, str]:
    """``size`` random bytes and their sha256 digest."""
    rng = random.Random(seed if seed is not None else size)
    data = rng.randbytes(size)
    return data, digestmod.of(data)


@contextlib.asynccontextmanager
async def _fresh(factory: Factory) -> AsyncIterator[ContentStore]:
    with tempfile.TemporaryDirectory(prefix="content-suite-") as root:
        async with factory(root) as store:
            yield store


async def expect(kind: type[E], aw: Awaitable[Any], what: str) -> E:
    """Await ``aw`` and require that it fails with the category ``kind``."""
    try:
        result = await aw
    except ContainerdError as exc:
        if not isinstance(exc, kind):
            raise AssertionError(
                f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}"
            ) from exc
        return exc
    if isinstance(result, NamespacedWriter):
        result.close()
    raise AssertionError(f"{what}: expected {kind.__name__}, got success ({repr(result)[:80]})")


async def read_all(store: ContentStore, ns: str, dgst: str, offset: int = 0, size: int = 0) -> bytes:
    out = bytearray()
    expect_at = max(offset, 0)
    async for at, chunk in await store.read(ns, dgst, offset, size):
        assert at == expect_at, f"read chunk at {at}, expected {expect_at}"
        out += chunk
        expect_at += len(chunk)
    return bytes(out)


async def write_chunks(w: NamespacedWriter, data: bytes, chunk: int = 32) -> None:
    for i in range(0, len(data), chunk):
        n = await w.write(data[i : i + chunk])
        assert n == len(data[i : i + chunk]), f"short write: {n}"


async def ingest(
    store: ContentStore,
    ns: str,
    ref: str,
    data: bytes,
    expected: str = "",
    lbls: dict[str, str] | None = None,
) -> str:
    """Write and commit ``data`` in one writer session, resuming as content.Copy does."""
    w = await store.writer(ns, ref, len(data), expected, "")
    try:
        await w.write(data[w.status().offset :])
        return await w.commit(len(data), expected, lbls or {})
    finally:
        w.close()


async def check_info(
    store: ContentStore, ns: str, dgst: str, size: int, lbls: dict[str, str], t0: int, t1: int
) -> meta.Info:
    info = await store.info(ns, dgst)
    assert info.digest == dgst, f"info digest {info.digest} != {dgst}"
    assert info.size == size, f"info size {info.size} != {size}"
    assert info.labels == lbls, f"info labels {info.labels} != {lbls}"
    assert t0 <= info.created_at <= t1, f"created_at {info.created_at} outside [{t0}, {t1}]"
    assert t0 <= info.updated_at <= t1, f"updated_at {info.updated_at} outside [{t0}, {t1}]"
    return info


def blob_files(store: ContentStore) -> list[str]:
    return store.local.walk()


async def visible_nowhere(store: ContentStore, *digests: str) -> None:
    for ns in (NS, OTHER):
        for dgst in digests:
            await expect(NotFound, store.info(ns, dgst), f"info {dgst} in {ns}")
        listed = {i.digest for i in await store.list(ns, [])}
        assert not listed & set(digests), f"{listed & set(digests)} listed in {ns}"
    on_disk = set(blob_files(store))
    assert not on_disk & set(digests), f"blob files left: {on_disk & set(digests)}"


# -- cases ------------------------------------------------------------------------------------------


async def write_commit_info_read(factory: Factory) -> None:
    """Four writers (no descriptor, size, digest, both), small writes, commit with labels."""
    async with _fresh(factory) as store:
        writers = []
        for i, (with_size, with_digest) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
            data, dgst = blob(256, seed=i)
            w = await store.writer(NS, f"c{i}", 256 if with_size else 0, dgst if with_digest else "", "")
            writers.append((w, data, dgst))
        for w, data, dgst in writers:
            try:
                await write_chunks(w, data)
                assert w.status().offset == len(data)
                t0 = time.time_ns()
                got = await w.commit(0, "", dict(LABELS))
                t1 = time.time_ns()
            finally:
                w.close()
            assert got == dgst, f"commit returned {got}, expected {dgst}"
            await check_info(store, NS, dgst, len(data), LABELS, t0, t1)
            assert await read_all(store, NS, dgst) == data
            assert os.path.exists(store.local.blob_path(dgst))
        assert await store.list_statuses(NS, []) == [], "committed ingests still listed"
        assert {i.digest for i in await store.list(NS, [])} == {d for _, _, d in writers}


async def status_updates(factory: Factory) -> None:
    """The writer's status follows every write: offset, total, digest so far, timestamps."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        t0 = time.time_ns()
        w = await store.writer(NS, "c1", 256, dgst, "")
        t1 = time.time_ns()
        try:
            st = w.status()
            assert (st.ref, st.offset, st.total) == ("c1", 0, 256), st
            assert w.digest() == digestmod.of(b"")
            assert t0 - 1_000_000_000 <= st.started_at <= t1, "started_at out of range"
            for end in (64, 192, 256):
                before = time.time_ns()
                await w.write(data[w.status().offset : end])
                st = w.status()
                assert st.offset == end, f"offset {st.offset} != {end}"
                assert w.digest() == digestmod.of(data[:end])
                assert st.updated_at >= before, "updated_at did not move"
            status = await store.status(NS, "c1")
            assert (status.ref, status.offset, status.total, status.expected) == ("c1", 256, 256, dgst)
            assert await w.commit(0, "", {}) == dgst
        finally:
            w.close()
        await expect(NotFound, store.status(NS, "c1"), "status after commit")


async def resume_after_close(factory: Factory) -> None:
    """Close half-way, reopen the ref: the offset is kept and the digest continues."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        w = await store.writer(NS, "cb", 256, dgst, "")
        await w.write(data[:128])
        first = w.digest()
        w.close()
        assert first == digestmod.of(data[:128])
        st = await store.status(NS, "cb")
        assert (st.offset, st.total) == (128, 256), st
        w = await store.writer(NS, "cb", 256, dgst, "")
        try:
            assert w.status().offset == 128, "offset lost on resume"
            assert w.digest() == first, "digest did not continue from the stored bytes"
            await w.write(data[128:])
            assert w.digest() == dgst
            t0 = time.time_ns()
            assert await w.commit(0, "", {}) == dgst
            t1 = time.time_ns()
        finally:
            w.close()
        await check_info(store, NS, dgst, 256, {}, t0, t1)
        assert await read_all(store, NS, dgst) == data


async def resume_variants(factory: Factory) -> None:
    """containerd's ResumeDiscard / ResumeTruncate over a few sizes and cut points."""
    async with _fresh(factory) as store:
        n = 0
        for size in (500, 50_000):
            for fraction in (0.0, 0.5, 1.0):
                for mode in ("continue", "truncate"):
                    n += 1
                    data, dgst = blob(size, seed=n)
                    cut = int(size * fraction)
                    ref = f"ref-{n}"
                    w = await store.writer(NS, ref, size, dgst, "")
                    await w.write(data[:cut])
                    w.close()
                    w = await store.writer(NS, ref, size, dgst, "")
                    try:
                        assert w.status().offset == cut, f"{ref}: offset {w.status().offset} != {cut}"
                        if mode == "truncate":
                            await w.truncate(0)
                            assert w.status().offset == 0
                            await write_chunks(w, data, 1024)
                        else:
                            await write_chunks(w, data[cut:], 1024)
                        assert await w.commit(size, dgst, {}) == dgst
                    finally:
                        w.close()
                    assert await read_all(store, NS, dgst) == data, f"{ref}: bytes differ"


async def commit_wrong_digest(factory: Factory) -> None:
    """A digest mismatch is FailedPrecondition; nothing becomes visible; the ingest can resume."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        _, wrong = blob(256, seed=99)
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            await w.write(data)
            await expect(FailedPrecondition, w.commit(256, wrong, {}), "commit with the wrong digest")
        finally:
            w.close()
        await visible_nowhere(store, dgst, wrong)
        st = await store.status(NS, "c1")
        assert st.offset == 256, f"failed commit lost the ingest's bytes (offset {st.offset})"
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            assert await w.commit(256, dgst, {}) == dgst
        finally:
            w.close()
        assert await read_all(store, NS, dgst) == data


async def commit_wrong_size(factory: Factory) -> None:
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            await w.write(data)
            await expect(FailedPrecondition, w.commit(255, "", {}), "commit with the wrong size")
        finally:
            w.close()
        await visible_nowhere(store, dgst)
        # The declared total is checked too, when the client gives no size at commit.
        w = await store.writer(NS, "c2", 300, "", "")
        try:
            await w.write(data)
            await expect(FailedPrecondition, w.commit(300, "", {}), "commit short of the total")
        finally:
            w.close()
        await visible_nowhere(store, dgst)


async def commit_invalid_labels(factory: Factory) -> None:
    """Labels are checked before anything is published: the ingest stays to commit again."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            await w.write(data)
            await expect(InvalidArgument, w.commit(256, dgst, {"big": "v" * 5000}), "oversized label")
        finally:
            w.close()
        await visible_nowhere(store, dgst)
        assert (await store.status(NS, "c1")).offset == 256, "a refused commit lost the ingest"
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            assert await w.commit(256, dgst, {"ok": "1"}) == dgst
        finally:
            w.close()
        assert (await store.info(NS, dgst)).labels == {"ok": "1"}


async def locked_ref(factory: Factory) -> None:
    """One writer per ref: a second is Unavailable until the first closes; other refs are free."""
    async with _fresh(factory) as store:
        w = await store.writer(NS, "busy", 0, "", "")
        try:
            await w.write(b"some")
            await expect(Unavailable, store.writer(NS, "busy", 0, "", ""), "second writer on a ref")
            await expect(Unavailable, store.abort(NS, "busy"), "abort of a ref being written")
            other = await store.writer(NS, "free", 0, "", "")
            other.close()
        finally:
            w.close()
        w = await store.writer(NS, "busy", 0, "", "")
        try:
            assert w.status().offset == 4
        finally:
            w.close()


async def expected_already_exists(factory: Factory) -> None:
    """A writer expecting a digest the namespace has fails at once, and leaves no ingest."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        await ingest(store, NS, "first", data, dgst)
        await expect(AlreadyExists, store.writer(NS, "again", 256, dgst, ""), "writer for existing digest")
        await expect(AlreadyExists, store.writer(NS, "again", 0, dgst, ""), "writer without size")
        assert await store.list_statuses(NS, []) == [], "an ingest was left behind"


async def commit_error_state(factory: Factory) -> None:
    """containerd's CommitErrorState: after every failed or redundant commit the ref is reusable."""
    async with _fresh(factory) as store:
        c1, d1 = blob(256, seed=1)
        _, d2 = blob(256, seed=2)
        await ingest(store, NS, "c1", c1, d1)
        ref = "c1-commiterror-state"
        w = await store.writer(NS, ref, 0, "", "")
        await w.write(c1)
        await expect(Unavailable, store.writer(NS, ref, 0, "", ""), "ref in use")
        await expect(AlreadyExists, w.commit(len(c1), d1, {}), "commit of an existing digest")
        w.close()
        w = await store.writer(NS, ref, 0, "", "")
        await w.write(c1)
        await expect(AlreadyExists, w.commit(len(c1), "", {}), "commit existing without digest")
        w.close()
        w = await store.writer(NS, ref, 0, "", "")
        await w.write(c1 + b"more")
        await expect(FailedPrecondition, w.commit(len(c1) + 4, d2, {}), "wrong digest")
        w.close()
        w = await store.writer(NS, ref, 0, "", "")
        await expect(FailedPrecondition, w.commit(len(c1), "", {}), "wrong size")
        w.close()
        w = await store.writer(NS, ref, 0, "", "")
        await expect(Unavailable, store.writer(NS, ref, 0, "", ""), "ref in use")
        got = await w.commit(len(c1) + 4, "", {})
        w.close()
        assert got == digestmod.of(c1 + b"more")
        w = await store.writer(NS, ref, 0, "", "")
        assert w.status().offset == 0, "a committed ref must start afresh"
        w.close()
        assert sorted(i.digest for i in await store.list(NS, [])) == sorted([d1, got])


async def shared_commit_without_data(factory: Factory) -> None:
    """Blob in a; a writer in b expecting it is complete at once; commit adds it to b only."""
    async with _fresh(factory) as store:
        data, dgst = blob(1000)
        await ingest(store, NS, "ref-1000", data, dgst)
        await expect(NotFound, store.info(OTHER, dgst), "b sees a's blob before committing it")
        w = await store.writer(OTHER, "ref-1000", 1000, dgst, "")
        try:
            st = w.status()
            assert (st.offset, st.total) == (1000, 1000), f"shared writer status {st}"
            assert w.digest() == dgst
            status = await store.status(OTHER, "ref-1000")
            assert status.offset == 1000, f"shared ingest status {status}"
            t0 = time.time_ns()
            assert await w.commit(1000, dgst, {"b": "1"}) == dgst
            t1 = time.time_ns()
        finally:
            w.close()
        await check_info(store, OTHER, dgst, 1000, {"b": "1"}, t0, t1)
        assert (await store.info(NS, dgst)).labels == {}, "b's labels leaked into a"
        assert await read_all(store, OTHER, dgst) == data
        assert await store.list_statuses(OTHER, []) == []
        # The size a writer declares must match the blob for the shortcut to apply.
        data2, dgst2 = blob(500)
        await ingest(store, NS, "x", data2, dgst2)
        w = await store.writer(OTHER, "mismatch", 400, dgst2, "")
        try:
            assert w.status().offset == 0, "a size mismatch must not share"
        finally:
            w.close()


async def shared_write_copies_then_appends(factory: Factory) -> None:
    """A write in the shared case copies the existing bytes first, then appends (CrossNSAppend)."""
    async with _fresh(factory) as store:
        data, dgst = blob(1000)
        await ingest(store, NS, "ref-1000", data, dgst)
        extra = b"appended bytes"
        whole = data + extra
        w = await store.writer(OTHER, "ref-1000", 1000, dgst, "")
        try:
            assert w.status().offset == 1000
            await w.write(extra)
            assert w.status().offset == len(whole)
            assert w.digest() == digestmod.of(whole)
            assert await w.commit(len(whole), digestmod.of(whole), {}) == digestmod.of(whole)
        finally:
            w.close()
        assert await read_all(store, OTHER, digestmod.of(whole)) == whole
        assert await read_all(store, NS, dgst) == data, "the shared blob changed"
        await expect(NotFound, store.info(OTHER, dgst), "b gained the blob it only appended to")
        await expect(NotFound, store.info(NS, digestmod.of(whole)), "a gained b's blob")
        # Truncating a shared writer to 0 starts an empty ingest.
        w = await store.writer(OTHER, "t", 1000, dgst, "")
        try:
            await w.truncate(0)
            assert w.status().offset == 0
            await w.write(b"fresh")
            assert await w.commit(5, "", {}) == digestmod.of(b"fresh")
        finally:
            w.close()


async def namespace_isolation(factory: Factory) -> None:
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        w = await store.writer(NS, "c1", 0, "", "")
        try:
            await w.write(data)
            await expect(NotFound, store.info(NS, dgst), "info before commit")
            assert await store.status(NS, "c1")
            await expect(NotFound, store.status(OTHER, "c1"), "b sees a's ingest")
            assert await store.list_statuses(OTHER, []) == []
            await w.commit(0, "", {})
        finally:
            w.close()
        await expect(NotFound, store.info(OTHER, dgst), "info from b")
        await expect(NotFound, read_all(store, OTHER, dgst), "read from b")
        await expect(NotFound, store.update(OTHER, dgst, {"a": "b"}, []), "update from b")
        await expect(NotFound, store.delete(OTHER, dgst), "delete from b")
        assert await store.list(OTHER, []) == []
        assert [i.digest for i in await store.list(NS, [])] == [dgst]


async def labels_update(factory: Factory) -> None:
    """``labels`` replaces, ``labels.<k>`` sets one (empty deletes), no mask replaces, others fail."""
    async with _fresh(factory) as store:
        data, dgst = blob(256)
        await ingest(store, NS, "c1", data, dgst, {"k1": "v1", "k2": "v2"})

        async def labels() -> dict[str, str]:
            return (await store.info(NS, dgst)).labels

        before = (await store.info(NS, dgst)).updated_at
        got = await store.update(NS, dgst, {"k1": "new", "k3": "v3"}, [])
        assert got.labels == {"k1": "new", "k3": "v3"} == await labels()
        assert got.updated_at >= before and got.size == 256 and got.digest == dgst
        await store.update(NS, dgst, {"k4": "v4"}, ["labels"])
        assert await labels() == {"k4": "v4"}
        await store.update(
            NS, dgst, {"k1": "one", "a.b.c": "dots", "ignored": "x"}, ["labels.k1", "labels.a.b.c"]
        )
        assert await labels() == {"k4": "v4", "k1": "one", "a.b.c": "dots"}
        await store.update(NS, dgst, {"k1": ""}, ["labels.k1", "labels.k4"])
        assert await labels() == {"a.b.c": "dots"}
        await store.update(NS, dgst, {}, ["labels.missing"])
        assert await labels() == {"a.b.c": "dots"}
        await expect(InvalidArgument, store.update(NS, dgst, {"x": "y"}, ["size"]), "update of size")
        await expect(
            InvalidArgument, store.update(NS, dgst, {"x": "y"}, ["labels.x", "digest"]), "mixed mask"
        )
        assert await labels() == {"a.b.c": "dots"}, "a rejected update changed the labels"
        await expect(NotFound, store.update(NS, blob(3)[1], {}, []), "update of a missing digest")


async def list_filters(factory: Factory) -> None:
    async with _fresh(factory) as store:
        digests = []
        for i, lbls in enumerate([{"k": "v"}, {"k": "w"}, {"k": "v", "other": "1"}, {}]):
            data, dgst = blob(64, seed=i)
            await ingest(store, NS, f"r{i}", data, dgst, lbls)
            digests.append(dgst)

        async def listed(*fs: str) -> set[str]:
            return {i.digest for i in await store.list(NS, list(fs))}

        assert await listed() == set(digests)
        assert await listed(f"digest=={digests[1]}") == {digests[1]}
        assert await listed("labels.k==v") == {digests[0], digests[2]}
        assert await listed('labels."k"==w') == {digests[1]}
        assert await listed("labels.k==v,labels.other==1") == {digests[2]}
        assert await listed("labels.k==w", f"digest=={digests[3]}") == {digests[1], digests[3]}
        assert await listed("labels.other") == {digests[2]}
        assert await listed("labels.k!=v") == {digests[1], digests[3]}
        assert await listed("labels.k==nope") == set()


async def read_ranges(factory: Factory) -> None:
    async with _fresh(factory) as store:
        data, dgst = blob(3 * (1 << 20) + 17)  # more than one 1 MiB chunk
        await ingest(store, NS, "big", data, dgst)
        assert await read_all(store, NS, dgst) == data
        assert await read_all(store, NS, dgst, 100, 50) == data[100:150]
        assert await read_all(store, NS, dgst, (1 << 20) - 5, 10) == data[(1 << 20) - 5 : (1 << 20) + 5]
        assert await read_all(store, NS, dgst, len(data) - 7, 0) == data[-7:]
        assert await read_all(store, NS, dgst, len(data) - 7, 100) == data[-7:], "size past the end"
        assert await read_all(store, NS, dgst, len(data), 0) == b""
        await expect(OutOfRange, read_all(store, NS, dgst, len(data) + 1, 0), "read past end")
        await expect(OutOfRange, read_all(store, NS, dgst, -1, 0), "read at a negative offset")
        await expect(NotFound, read_all(store, NS, blob(5)[1]), "read of a missing digest")
        small, sdgst = blob(6)
        await ingest(store, NS, "small", small, sdgst)
        assert await read_all(store, NS, sdgst, 0, 7) == small, "SmallBlob"


async def truncate_to_zero(factory: Factory) -> None:
    async with _fresh(factory) as store:
        w = await store.writer(NS, "t", 0, "", "")
        try:
            await w.write(b"garbage that is thrown away")
            await w.truncate(0)
            assert w.status().offset == 0 and w.digest() == digestmod.of(b"")
            await expect(InvalidArgument, w.truncate(3), "truncate to a non-zero size")
            await w.write(b"kept")
            assert await w.commit(4, digestmod.of(b"kept"), {}) == digestmod.of(b"kept")
        finally:
            w.close()
        assert await read_all(store, NS, digestmod.of(b"kept")) == b"kept"


async def sha512_expected(factory: Factory) -> None:
    async with _fresh(factory) as store:
        data = os.urandom(3000)
        d512 = digestmod.of(data, "sha512")
        w = await store.writer(NS, "s512", len(data), d512, "")
        try:
            await w.write(data)
            assert await w.commit(len(data), d512, {"alg": "512"}) == d512
        finally:
            w.close()
        info = await store.info(NS, d512)
        assert (info.size, info.labels) == (len(data), {"alg": "512"})
        assert await read_all(store, NS, d512) == data
        assert os.path.exists(store.local.blob_path(d512))
        await expect(NotFound, store.info(NS, digestmod.of(data)), "sha256 twin of a sha512 commit")
        w = await store.writer(NS, "s512-bad", 0, "", "")
        try:
            await w.write(data + b"x")
            await expect(FailedPrecondition, w.commit(0, d512, {}), "wrong sha512")
        finally:
            w.close()


async def abort_removes_ingest(factory: Factory) -> None:
    async with _fresh(factory) as store:
        w = await store.writer(NS, "gone", 0, "", "")
        await w.write(b"partial")
        w.close()
        path = store.local.ingest_path(f"{NS}/gone")
        backend_dirs = os.listdir(os.path.dirname(path))
        await store.abort(NS, "gone")
        await expect(NotFound, store.status(NS, "gone"), "status after abort")
        assert await store.list_statuses(NS, []) == []
        assert len(os.listdir(os.path.dirname(path))) == len(backend_dirs) - 1, "ingest directory left"
        await expect(NotFound, store.abort(NS, "gone"), "second abort")
        await expect(NotFound, store.abort(NS, "never"), "abort of an unknown ref")
        w = await store.writer(NS, "gone", 0, "", "")
        try:
            assert w.status().offset == 0, "aborted bytes came back"
        finally:
            w.close()


async def list_statuses_filter(factory: Factory) -> None:
    async with _fresh(factory) as store:
        for ref, data in (("layer-1", b"a"), ("layer-22", b"bb"), ("manifest-1", b"ccc")):
            w = await store.writer(NS, ref, 10, "", "")
            await w.write(data)
            w.close()

        async def refs(*fs: str) -> dict[str, int]:
            return {s.ref: s.offset for s in await store.list_statuses(NS, list(fs))}

        assert await refs() == {"layer-1": 1, "layer-22": 2, "manifest-1": 3}
        assert await refs("ref~=layer") == {"layer-1": 1, "layer-22": 2}
        assert await refs("ref~=^layer-2") == {"layer-22": 2}
        assert await refs("ref==manifest-1") == {"manifest-1": 3}
        assert await refs("ref~=nothing") == {}
        assert all(s.total == 10 for s in await store.list_statuses(NS, []))


async def commit_same_digest_twice(factory: Factory) -> None:
    """Two ingests of the same bytes: the second commit is AlreadyExists; one row, one blob."""
    async with _fresh(factory) as store:
        data, dgst = blob(4096)
        w1 = await store.writer(NS, "one", 0, "", "")
        w2 = await store.writer(NS, "two", 0, "", "")
        try:
            await w1.write(data)
            await w2.write(data)
            assert await w1.commit(len(data), dgst, {"first": "1"}) == dgst
            await expect(AlreadyExists, w2.commit(len(data), dgst, {"second": "2"}), "second commit")
        finally:
            w1.close()
            w2.close()
        infos = await store.list(NS, [])
        assert [(i.digest, i.labels) for i in infos] == [(dgst, {"first": "1"})], infos
        assert blob_files(store) == [dgst]
        assert await store.list_statuses(NS, []) == [], "the redundant ingest was kept"
        assert os.listdir(os.path.join(store.local.root, "ingest")) == []
        assert hashlib.sha256(await read_all(store, NS, dgst)).hexdigest() == dgst.split(":")[1]
        w = await store.writer(NS, "two", 0, "", "")
        try:
            assert w.status().offset == 0
        finally:
            w.close()


async def delete_then_recommit(factory: Factory) -> None:
    async with _fresh(factory) as store:
        data, dgst = blob(128)
        await ingest(store, NS, "c", data, dgst)
        await store.delete(NS, dgst)
        await expect(NotFound, store.info(NS, dgst), "info after delete")
        await expect(NotFound, store.delete(NS, dgst), "second delete")
        # Without a collection the bytes are still on disk; committing again re-adds the row.
        assert await ingest(store, NS, "c", data, dgst) == dgst
        assert await read_all(store, NS, dgst) == data


async def reads_follow_deletions(factory: Factory) -> None:
    """Every read checks that the namespace still sees the blob, however the row went away."""
    async with _fresh(factory) as store:
        data, dgst = blob(100_000)
        await ingest(store, NS, "r", data, dgst)
        await ingest(store, OTHER, "r", data, dgst)
        for _ in range(3):  # whatever a store remembers between reads, it has now
            assert await read_all(store, NS, dgst, 0, 1000) == data[:1000]
            assert await read_all(store, OTHER, dgst, 7, 10) == data[7:17]
        await store.delete(NS, dgst)
        await expect(NotFound, read_all(store, NS, dgst, 0, 1000), "read after delete")
        assert await read_all(store, OTHER, dgst, 7, 10) == data[7:17]
        # The collector removes rows with SQL of its own, then the blob file.
        await store.db.update(
            lambda c: c.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (OTHER, dgst))
        )
        await expect(NotFound, read_all(store, OTHER, dgst, 7, 10), "read after the row was swept")
        await store.local.delete(dgst)
        # Committed again, the blob reads again (from its new file).
        await ingest(store, NS, "r2", data, dgst)
        assert await read_all(store, NS, dgst, 99_990, 10) == data[99_990:]
        await expect(NotFound, read_all(store, OTHER, dgst, 0, 10), "read in the other namespace")


CASES: list[tuple[str, Case]] = [
    (fn.__name__, fn)
    for fn in (
        write_commit_info_read,
        status_updates,
        resume_after_close,
        resume_variants,
        commit_wrong_digest,
        commit_wrong_size,
        commit_invalid_labels,
        locked_ref,
        expected_already_exists,
        commit_error_state,
        shared_commit_without_data,
        shared_write_copies_then_appends,
        namespace_isolation,
        labels_update,
        list_filters,
        read_ranges,
        truncate_to_zero,
        sha512_expected,
        abort_removes_ingest,
        list_statuses_filter,
        commit_same_digest_twice,
        delete_then_recommit,
        reads_follow_deletions,
    )
]


async def run_all(factory: Factory = local_store) -> None:
    for _, case in CASES:
        await case(factory)
