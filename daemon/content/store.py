"""The namespaced content store: what the Content service and the image code use.

Blobs are shared on disk (``LocalStore``) and visible per namespace through metadata rows, as in
containerd. Writing a digest that another namespace already has is the "shared" case: the writer
reports the whole blob as written and a commit only adds the row, unless the client sends data
anyway, in which case the existing bytes are copied into a fresh ingest first.

Commit publishes bytes before metadata; the collector's lock (held shared by commits, exclusive by
the sweep) keeps a sweep from deleting a blob between those two steps. Opening a writer holds it
shared too (a shared writer's blob is kept by its ingest row only once that row is written), so
never open a writer while already holding the lock: a waiting sweep would deadlock the two.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyctr.api import digest as digestmod
from pyctr.api import filters
from pyctr.api import labels as labelrules
from pyctr.api.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from pyctr.daemon.content.local import CHUNK, IngestStatus, LocalStore, Writer
from pyctr.daemon.metadata import content as meta
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.rwlock import RWLock

SIZE_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Status:
    ref: str
    offset: int
    total: int
    expected: str
    started_at: int
    updated_at: int


class NamespacedWriter:
    """One Write session: an ingest in a namespace, backed by a local writer (or shared bytes)."""

    def __init__(
        self,
        store: ContentStore,
        ns: str,
        ingest: meta.Ingest,
        lease: str,
        writer: Writer | None,
        shared: tuple[str, int] | None,
    ) -> None:
        self.store = store
        self.ns = ns
        self.ingest = ingest
        self.lease = lease
        self._w = writer
        self._shared = shared  # (digest, size) of bytes another namespace already has
        self._started = time.time_ns()

    def status(self) -> IngestStatus:
        if self._w is not None:
            # The backend knows the namespaced ref; callers asked for their own.
            return dataclasses.replace(self._w.status(), ref=self.ingest.ref)
        assert self._shared is not None
        return IngestStatus(self.ingest.ref, self._shared[1], self._shared[1], self._started, self._started)

    def digest(self) -> str:
        if self._w is not None:
            return self._w.digest()
        assert self._shared is not None
        return self._shared[0]

    async def _unshare(self, keep: int) -> Writer:
        """Leave the shared case: a real ingest holding the first ``keep`` shared bytes."""
        assert self._shared is not None
        w = await self.store.local.writer(self.ingest.bref)
        if w.offset:
            await w.truncate(0)
        pos = 0
        while pos < keep:
            chunk = await self.store.local.read_at(self._shared[0], pos, min(CHUNK, keep - pos))
            if not chunk:
                break
            await w.write(chunk)
            pos += len(chunk)
        self._w, self._shared = w, None
        return w

    async def write(self, data: bytes) -> int:
        if not data:
            return 0
        w = self._w or await self._unshare(self._shared[1] if self._shared else 0)
        return await w.write(data)

    async def truncate(self, size: int) -> None:
        if self._w is not None:
            await self._w.truncate(size)
        else:
            await self._unshare(size)

    async def commit(self, size: int, expected: str, lbls: dict[str, str]) -> str:
        """Commit into the namespace; AlreadyExists (after a successful commit) if it was there."""
        if expected:
            digestmod.validate(expected)
        # Before anything is published: a refused commit must leave the ingest to retry.
        labelrules.validate_all(lbls)
        store = self.store
        async with store.lock.reader():
            already = False
            if self._w is None:
                assert self._shared is not None
                dgst, blob_size = self._shared
                if size and size != blob_size:
                    raise FailedPrecondition(
                        f"{self.ingest.ref!r} failed size validation: {blob_size} != {size}"
                    )
                if expected and expected != dgst:
                    raise FailedPrecondition(f"{self.ingest.ref!r} unexpected digest")
                size = blob_size
            else:
                offset = self._w.offset
                if size and size != offset:
                    self.close()
                    raise FailedPrecondition(
                        f"{self.ingest.ref!r} failed size validation: {offset} != {size}"
                    )
                size = offset
                try:
                    dgst = await self._w.commit(size, expected)
                except AlreadyExists:
                    dgst = self._w.digest() if not expected else expected
            ns, ref, lease = self.ns, self.ingest.ref, self.lease

            def tx(c: Any) -> bool:
                meta.remove_ingest(c, ns, ref, lease)
                try:
                    meta.insert(c, ns, dgst, size, lbls, lease)
                except AlreadyExists:
                    return True
                return False

            already = await store.db.update(tx)
        if already:
            raise AlreadyExists(f"content {dgst}")
        store.on_create(ns, dgst, size)
        return dgst

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


class ContentStore:
    def __init__(
        self,
        db: DB,
        local: LocalStore,
        lock: RWLock | None = None,
        on_create: Callable[[str, str, int], None] | None = None,
        on_delete: Callable[[str, str], None] | None = None,
    ) -> None:
        self.db = db
        self.local = local
        self.lock = lock or db.gc_lock
        self.on_create = on_create or (lambda ns, dgst, size: None)
        self.on_delete = on_delete or (lambda ns, dgst: None)
        # Read checks that the namespace sees the blob on every call, and ctr reads 32 KiB per
        # call: the sizes of visible blobs are remembered until any content row is deleted (by
        # Delete or by a collection; a trigger counts them, see meta.watch_deletes). A blob's
        # size never changes, and a row that appears needs no forgetting.
        self._sizes: dict[tuple[str, str], int] = {}
        self._sizes_valid_at = 0  # the deletion count _sizes was filled under
        self._deletions = 0  # bumped on the metadata thread
        self._watching = False

    async def info(self, ns: str, dgst: str) -> meta.Info:
        digestmod.validate(dgst)
        return await self.db.view(lambda c: meta.get(c, ns, dgst))

    async def update(self, ns: str, dgst: str, lbls: dict[str, str], paths: Sequence[str]) -> meta.Info:
        digestmod.validate(dgst)
        return await self.db.update(lambda c: meta.update(c, ns, dgst, lbls, paths))

    async def list(self, ns: str, fs: Sequence[str]) -> list[meta.Info]:
        return await self.db.view(lambda c: meta.list_infos(c, ns, fs))

    async def delete(self, ns: str, dgst: str) -> None:
        digestmod.validate(dgst)
        await self.db.update(lambda c: meta.delete(c, ns, dgst))
        self.on_delete(ns, dgst)

    async def read(
        self, ns: str, dgst: str, offset: int = 0, size: int = 0
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(offset, chunk) pairs of at most 1 MiB; size <= 0 reads to the end."""
        length = await self.visible_size(ns, dgst)
        if offset < 0 or offset > length:
            raise OutOfRange(f"read past object length {length} bytes")
        if size <= 0 or offset + size > length:
            size = length - offset
        return self._chunks(dgst, offset, size)

    async def visible_size(self, ns: str, dgst: str) -> int:
        """The size of a blob ``ns`` sees (NotFound otherwise), usually without a metadata query."""
        if self._sizes_valid_at != self._deletions:
            self._sizes.clear()
            self._sizes_valid_at = self._deletions
        size = self._sizes.get((ns, dgst))
        if size is not None:
            return size
        if not self._watching:
            name = f"pyctr_content_deleted_{id(self):x}"
            await self.db.update(lambda c: meta.watch_deletes(c, name, self._deleted))
            self._watching = True
        before = self._deletions
        info = await self.info(ns, dgst)
        # A deletion counted meanwhile may have been this row's: then it is not remembered.
        if before == self._deletions == self._sizes_valid_at:
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                self._sizes.clear()
            self._sizes[(ns, dgst)] = info.size
        return info.size

    def _deleted(self) -> None:
        self._deletions += 1

    async def _chunks(self, dgst: str, offset: int, size: int) -> AsyncIterator[tuple[int, bytes]]:
        end = offset + size
        while offset < end:
            data = await self.local.read_at(dgst, offset, min(CHUNK, end - offset))
            if not data:
                raise OutOfRange(f"content {dgst} is shorter than its recorded size")
            yield offset, data
            offset += len(data)

    async def writer(self, ns: str, ref: str, total: int, expected: str, lease: str) -> NamespacedWriter:
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected:
            digestmod.validate(expected)

        def tx(c: Any) -> tuple[bool, meta.Ingest | None]:
            if expected and meta.exists(c, ns, expected):
                if lease:
                    meta.add_to_lease(c, ns, lease, "content", expected)
                return True, None
            return False, meta.open_ingest(c, ns, ref, expected, lease)

        # Shared like a commit: a sweep must not delete the blob between the check that finds it
        # here and the ingest row (which keeps it) becoming visible to the collector.
        async with self.lock.reader():
            exists, ingest = await self.db.update(tx)
            if exists:
                raise AlreadyExists(f"content {expected}")
            assert ingest is not None
            shared = None
            if expected and self.local.exists(expected):
                blob = self.local.info(expected)
                if total in (0, blob.size) and not self.local.locked(ingest.bref):
                    shared = (expected, blob.size)
            if shared is not None:
                return NamespacedWriter(self, ns, ingest, lease, None, shared)
            w = await self.local.writer(ingest.bref, total)
        return NamespacedWriter(self, ns, ingest, lease, w, None)

    async def commit_file(
        self, ns: str, path: str, dgst: str, size: int, lbls: dict[str, str], lease: str
    ) -> meta.Info:
        """Publish a file the daemon wrote itself (a diff, an export) as content in ``ns``."""
        async with self.lock.reader():
            await self.local.adopt(path, dgst)

            def tx(c: Any) -> meta.Info:
                try:
                    return meta.insert(c, ns, dgst, size, lbls, lease)
                except AlreadyExists:
                    return meta.update(c, ns, dgst, lbls, [f"labels.{k}" for k in lbls])

            info = await self.db.update(tx)
        self.on_create(ns, dgst, size)
        return info

    def blob_path(self, dgst: str) -> str:
        return self.local.blob_path(dgst)

    async def status(self, ns: str, ref: str) -> Status:
        ingest = await self.db.view(lambda c: meta.get_ingest(c, ns, ref))
        return self._status(ingest)

    def _status(self, ingest: meta.Ingest) -> Status:
        try:
            st = self.local.status(ingest.bref)
        except NotFound:
            # A shared ingest has no bytes of its own: it stands for the whole existing blob.
            if ingest.expected and self.local.exists(ingest.expected):
                blob = self.local.info(ingest.expected)
                return Status(
                    ingest.ref, blob.size, blob.size, ingest.expected, blob.created_at, blob.created_at
                )
            raise NotFound(f"ingest ref {ingest.ref!r}") from None
        return Status(ingest.ref, st.offset, st.total, ingest.expected, st.started_at, st.updated_at)

    async def list_statuses(self, ns: str, fs: Sequence[str]) -> builtins.list[Status]:
        flt = filters.parse_all(fs)
        ingests = await self.db.view(lambda c: meta.list_ingests(c, ns))
        out = []
        for ingest in ingests:
            if not flt.match(filters.DictAdaptor({"ref": ingest.ref})):
                continue
            try:
                out.append(self._status(ingest))
            except NotFound:
                continue
        return out

    async def abort(self, ns: str, ref: str, lease: str = "") -> None:
        ingest = await self.db.view(lambda c: meta.get_ingest(c, ns, ref))
        if self.local.locked(ingest.bref):
            raise Unavailable(f"ref {ref} is being written")
        try:
            await self.local.abort(ingest.bref)
        except NotFound:
            pass
        await self.db.update(lambda c: meta.remove_ingest(c, ns, ref, lease))
