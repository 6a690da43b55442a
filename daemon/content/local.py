"""The local content store: blobs on disk by digest, ingests by ref.

Layout under the plugin root (``<root>/io.containerd.content.v1.content``), as containerd's:

    blobs/<algorithm>/<hex>          committed blobs, read-only (0444), immutable
    ingest/<sha256(ref)>/ref         the ingest's (backend) ref
    ingest/<sha256(ref)>/data        bytes received so far
    ingest/<sha256(ref)>/startedat   RFC3339Nano, written once
    ingest/<sha256(ref)>/total       expected size, if known

Invariants: a blob path exists only with exactly the bytes its digest names — data is
fsynced and its digest verified in the ingest directory, then renamed into place (atomic on
one filesystem), so a crash leaves at worst an ingest to resume or expire. One writer per ref
at a time (a second gets Unavailable). This layer knows nothing of namespaces; the metadata
layer (``daemon/content/store.py``) decides who sees what.

Blocking I/O runs in worker threads; every call here that touches file data is ``async``.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyctr.api import digest as digestmod
from pyctr.api.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

T = TypeVar("T")
CHUNK = 1 << 20
INLINE_READ = 64 << 10  # reads up to this size run on the loop (see read_at)
OPEN_READERS = 32  # blob descriptors kept open for those reads


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    created_at: int  # ns


@dataclass(frozen=True)
class IngestStatus:
    ref: str
    offset: int
    total: int
    started_at: int  # ns
    updated_at: int  # ns


def _rfc3339(ns: int) -> str:
    dt = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns % 1_000_000_000:09d}Z"


def _parse_rfc3339(text: str) -> int:
    text = text.strip()
    base, _, frac = text.rstrip("Z").partition(".")
    dt = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return int(dt.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def _space_error(exc: OSError) -> Exception:
    """Disk-full is the one OS error with a category of its own here: the caller can retry later."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"content store: {os.strerror(exc.errno)}")
    return exc


async def _thread(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[..., int] | None = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range out now (sync_file_range, SYNC_FILE_RANGE_WRITE).

    Nothing is durable until the fsync at commit; but by then most bytes are already on their way
    to the disk, where otherwise the whole blob would sit dirty in the page cache until that fsync.
    Best effort: where the call is missing, the fsync does all the work as before.
    """
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes  # here, not at start-up: only ingests need it

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = lambda *args: 0  # noqa: E731
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Writer:
    """An open ingest; obtained from :meth:`LocalStore.writer`, released by :meth:`close`."""

    def __init__(
        self, store: LocalStore, ref: str, path: str, total: int, fd: int, offset: int, h: Any
    ) -> None:
        self.store = store
        self.ref = ref
        self.path = path
        self.total = total
        self._fd = fd
        self.offset = offset
        self._hash = h
        self.started_at = store._read_time(path, "startedat")
        self.updated_at = self.started_at
        self._closed = False

    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"

    def status(self) -> IngestStatus:
        return IngestStatus(self.ref, self.offset, self.total, self.started_at, self.updated_at)

    async def write(self, data: bytes) -> int:
        if self._closed:
            raise FailedPrecondition("cannot write on closed writer")
        if not data:
            return 0
        offset = self.offset

        def job() -> None:
            try:
                view = memoryview(data)
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(self._fd, view[pos:], offset + pos)
            except OSError as exc:
                raise _space_error(exc) from exc
            _start_writeback(self._fd, offset, len(view))
            self._hash.update(data)

        await _thread(job)
        self.offset += len(data)
        self.updated_at = time.time_ns()
        return len(data)

    async def truncate(self, size: int) -> None:
        if size != 0:
            raise InvalidArgument("truncate is only supported to offset 0")

        def job() -> None:
            os.ftruncate(self._fd, 0)

        await _thread(job)
        self.offset = 0
        self._hash = hashlib.sha256()
        self.updated_at = time.time_ns()

    async def commit(self, size: int, expected: str) -> str:
        """Verify, make durable and publish the blob; returns its digest.

        AlreadyExists means the bytes were fine and the blob was already there; the ingest is
        gone either way.
        """
        if self._closed:
            raise FailedPrecondition("cannot commit on closed writer")
        if size and size != self.offset:
            raise FailedPrecondition(f"unexpected commit size {self.offset}, expected {size}")
        algorithm = "sha256"
        if expected:
            algorithm, _ = digestmod.parse(expected)
        actual = self.digest() if algorithm == "sha256" else await self._rehash(algorithm)
        if expected and actual != expected:
            raise FailedPrecondition(f"unexpected commit digest {actual}, expected {expected}")
        target = self.store.blob_path(actual)
        fd = self._fd

        def job() -> bool:
            os.fsync(fd)
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            data = os.path.join(self.path, "data")
            if os.path.exists(target):
                shutil.rmtree(self.path, ignore_errors=True)
                return False
            os.chmod(data, 0o444)
            os.rename(data, target)
            # The rename is durable once the directory entry is.
            dirfd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
            shutil.rmtree(self.path, ignore_errors=True)
            return True

        try:
            created = await _thread(job)
        except OSError as exc:
            raise _space_error(exc) from exc
        finally:
            self.close()
        if not created:
            raise AlreadyExists(f"content {actual}")
        return actual

    async def _rehash(self, algorithm: str) -> str:
        path = os.path.join(self.path, "data")

        def job() -> str:
            h = digestmod.hasher(algorithm)
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            return f"{algorithm}:{h.hexdigest()}"

        return await _thread(job)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            self.store._unlock(self.ref)


class LocalStore:
    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "blobs"), mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(root, "ingest"), mode=0o700, exist_ok=True)
        self._locks: dict[str, int] = {}
        self._readers: dict[str, int] = {}  # digest -> open descriptor (see _reader)
        # Files the daemon was producing when it last stopped are debris: nobody will finish them.
        for name in os.listdir(os.path.join(root, "ingest")):
            if name.startswith("local-"):
                os.unlink(os.path.join(root, "ingest", name))

    # -- blobs ------------------------------------------------------------------------------------

    def blob_path(self, dgst: str) -> str:
        alg, enc = digestmod.parse(dgst)
        return os.path.join(self.root, "blobs", alg, enc)

    def info(self, dgst: str) -> BlobInfo:
        """A stat; cheap enough to call on the event loop."""
        try:
            st = os.stat(self.blob_path(dgst))
        except FileNotFoundError:
            raise NotFound(f"content {dgst}") from None
        return BlobInfo(dgst, st.st_size, st.st_mtime_ns)

    def temp_path(self) -> str:
        """A fresh path in the store's filesystem, for content produced locally (then :meth:`adopt`)."""
        import tempfile

        fd, path = tempfile.mkstemp(prefix="local-", dir=os.path.join(self.root, "ingest"))
        os.close(fd)
        return path

    async def adopt(self, path: str, dgst: str) -> bool:
        """Publish a locally written file as blob ``dgst`` (the caller computed the digest while
        writing it). Returns False when the blob already existed (``path`` is then removed)."""
        target = self.blob_path(dgst)

        def job() -> bool:
            if os.path.exists(target):
                os.unlink(path)
                return False
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            os.chmod(path, 0o444)
            os.rename(path, target)
            return True

        try:
            return await _thread(job)
        except OSError as exc:
            raise _space_error(exc) from exc

    def exists(self, dgst: str) -> bool:
        return os.path.exists(self.blob_path(dgst))

    async def read_at(self, dgst: str, offset: int, size: int) -> bytes:
        if size <= INLINE_READ:
            # ctr reads in 32 KiB pieces: a page-cache read costs microseconds, a thread hop more,
            # and so does opening the blob each time (its descriptor stays open, see _reader).
            return os.pread(self._reader(dgst), size, offset)
        path = self.blob_path(dgst)

        def job() -> bytes:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"content {dgst}") from None
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        return await _thread(job)

    def _reader(self, dgst: str) -> int:
        """A descriptor of blob ``dgst`` for reads on the event loop (only there: never closed
        under a thread). Blobs are immutable, so an open one reads right until it is deleted."""
        fd = self._readers.get(dgst)
        if fd is None:
            try:
                fd = os.open(self.blob_path(dgst), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"content {dgst}") from None
            if len(self._readers) >= OPEN_READERS:
                self.close_readers()
            self._readers[dgst] = fd
        return fd

    def close_readers(self) -> None:
        readers, self._readers = self._readers, {}
        for fd in readers.values():
            os.close(fd)

    async def delete(self, dgst: str) -> None:
        path = self.blob_path(dgst)
        fd = self._readers.pop(dgst, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NotFound(f"content {dgst}") from None

    def walk(self) -> list[str]:
        """Every committed digest on disk."""
        out = []
        blobs = os.path.join(self.root, "blobs")
        for alg in sorted(os.listdir(blobs)):
            if alg not in digestmod.ALGORITHMS:
                continue
            for enc in sorted(os.listdir(os.path.join(blobs, alg))):
                out.append(f"{alg}:{enc}")
        return out

    # -- ingests ----------------------------------------------------------------------------------

    def ingest_path(self, ref: str) -> str:
        return os.path.join(self.root, "ingest", hashlib.sha256(ref.encode()).hexdigest())

    def _read_time(self, path: str, name: str) -> int:
        try:
            with open(os.path.join(path, name)) as f:
                return _parse_rfc3339(f.read())
        except (OSError, ValueError):
            return 0

    def _unlock(self, ref: str) -> None:
        self._locks.pop(ref, None)

    def locked(self, ref: str) -> bool:
        return ref in self._locks

    async def writer(self, ref: str, total: int = 0) -> Writer:
        """Open (or resume) the ingest ``ref``; only one writer per ref at a time."""
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if ref in self._locks:
            since = _rfc3339(self._locks[ref])
            raise Unavailable(
                f"ref {ref} locked for {(time.time_ns() - self._locks[ref]) / 1e9:.3f}s (since {since})"
            )
        self._locks[ref] = time.time_ns()
        path = self.ingest_path(ref)

        def job() -> tuple[int, int, Any, int]:
            fresh = not os.path.exists(os.path.join(path, "ref"))
            if fresh:
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path, mode=0o700)
                now = _rfc3339(time.time_ns())
                for name, value in (("ref", ref), ("startedat", now), ("updatedat", now)):
                    with open(os.path.join(path, name), "w") as f:
                        f.write(value)
            if total:
                with open(os.path.join(path, "total"), "w") as f:
                    f.write(str(total))
            fd = os.open(os.path.join(path, "data"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # Resuming: the digest so far is rebuilt from the bytes already written.
            h = hashlib.sha256()
            offset = 0
            while chunk := os.pread(fd, CHUNK, offset):
                h.update(chunk)
                offset += len(chunk)
            stored_total = total
            if not stored_total:
                try:
                    with open(os.path.join(path, "total")) as f:
                        stored_total = int(f.read() or 0)
                except (OSError, ValueError):
                    stored_total = 0
            return fd, offset, h, stored_total

        try:
            fd, offset, h, stored_total = await _thread(job)
        except OSError as exc:
            self._unlock(ref)
            raise _space_error(exc) from exc
        except BaseException:
            self._unlock(ref)
            raise
        return Writer(self, ref, path, stored_total, fd, offset, h)

    def status(self, ref: str) -> IngestStatus:
        path = self.ingest_path(ref)
        try:
            with open(os.path.join(path, "ref")) as f:
                stored = f.read()
            st = os.stat(os.path.join(path, "data"))
        except FileNotFoundError:
            raise NotFound(f"ingest ref {ref!r}") from None
        total = 0
        try:
            with open(os.path.join(path, "total")) as f:
                total = int(f.read() or 0)
        except (OSError, ValueError):
            pass
        return IngestStatus(stored, st.st_size, total, self._read_time(path, "startedat"), st.st_mtime_ns)

    async def abort(self, ref: str) -> None:
        path = self.ingest_path(ref)
        if not os.path.exists(path):
            raise NotFound(f"ingest ref {ref!r}")
        await _thread(lambda: shutil.rmtree(path))

    def ingest_refs(self) -> list[str]:
        out = []
        base = os.path.join(self.root, "ingest")
        for name in sorted(os.listdir(base)):
            if name.startswith("local-"):
                continue  # a file being produced locally, not an ingest
            try:
                with open(os.path.join(base, name, "ref")) as f:
                    out.append(f.read())
            except OSError:
                continue
        return out
