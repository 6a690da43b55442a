"""Apply an uncompressed OCI layer tar to a directory: the executor for :mod:`.plan`.

Blocking code for a worker thread (``loop.run_in_executor``). One forward-only ``tarfile`` pass,
1 MiB reads, our own create calls instead of ``extractall``. Two threads share the work: a reader
decompresses and hashes ahead (isal, zstandard and hashlib release the GIL), and the calling
thread parses headers and writes the tree. A fast path decodes plain ustar headers (tarfile's
own decoder is most of the parsing time) and file data goes from the read buffer straight to
``write``; anything unusual falls back to tarfile's code.

Syscalls per regular file: ``openat`` (O_EXCL; only an EEXIST looks at what was there), ``write``,
``fstat``, ``futimens``, ``close``. The file is created with its permission bits, and ``fchown``
and ``fchmod`` run only when ``fstat`` shows they would change something (a setgid parent, the
umask, a default ACL, set-id bits, xattrs). Nothing is fsynced, as in containerd: a layer counts
once its snapshot is committed, and a crash before that leaves an active snapshot that is removed.

Confinement. Every parent directory is resolved inside the root, component by component, with
``openat(dir_fd, name, O_NOFOLLOW|O_DIRECTORY)``. A symlink met on the way is followed *as if the
root were /* (``..`` stops at the root, an absolute target restarts at the root): the semantics of
openat2's RESOLVE_IN_ROOT and of containerd's ``fs.RootPath``, so ``var/run -> /run`` in a base
layer still works while ``evil -> /tmp/outside`` sends ``evil/pwned`` to ``<root>/tmp/outside``.
``..`` is never opened, only popped, and the final component is created with ``O_EXCL|O_NOFOLLOW``,
``mknod``, ``symlink`` or ``linkat`` relative to the parent's fd, so nothing outside can be
written, linked, chowned or removed.

Whiteouts, two strategies (containerd's ``ConvertWhiteout``):
    overlay=False  the root holds the full tree (native snapshotter): ``.wh.x`` removes ``x``
                   recursively; an opaque dir loses everything this layer did not write.
    overlay=True   the root is an overlayfs upper dir: ``.wh.x`` becomes a char device 0/0 at
                   ``x``; an opaque dir gets ``trusted.overlay.opaque=y``.
A whiteout never removes what this same layer wrote (image-spec: whiteouts apply to lower layers).

Where this differs from containerd's ``archive.Apply``, on purpose: a name whose ``..`` climbs above
the root is rejected, not clamped; containerd's naive strategy also deletes same-layer entries on
a whiteout, and creates the missing parents of a whiteout it has nothing to delete for. On overlay,
a directory written over this layer's own whiteout is made opaque (containerd lets the lower one
show through again), and ``.wh..wh..opq`` at the root, whose xattr overlayfs ignores on the upper
root, becomes whiteouts of the lower root's names when ``parents`` are given.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import shutil
import stat
import struct
import tarfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Self, cast

from pyctr.api.errdefs import Canceled, InvalidArgument
from pyctr.api.log import get_logger
from pyctr.snapshotter.layer import plan
from pyctr.snapshotter.layer.compression import CHUNK, Reader

log = get_logger("pyctrd.layer")

OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS
_CACHE_LIMIT = 256  # open directory fds kept between members
_READ_AHEAD = 4  # decompressed chunks the reader thread may be ahead
_FIRST_READ = 64 << 10  # then four times as much per read, up to CHUNK
_DEVICE_TYPES = {plan.Kind.CHAR: stat.S_IFCHR, plan.Kind.BLOCK: stat.S_IFBLK, plan.Kind.FIFO: stat.S_IFIFO}


@dataclass(frozen=True)
class ApplyResult:
    size: int  # bytes of the uncompressed stream, trailing padding included (the Diff service's size)
    digest: str  # "sha256:<hex>" of the same bytes: compare with the layer's diff_id
    entries: int  # members applied (written, whiteouts, opaque markers)
    skipped: tuple[str, ...] = ()  # "name: reason" for members skipped on purpose


def apply_layer(
    fileobj: Reader,
    root: str,
    *,
    overlay: bool,
    parents: Sequence[str] = (),
    cancel: threading.Event | None = None,
) -> ApplyResult:
    """Apply the uncompressed layer tar read from ``fileobj`` to the directory ``root``.

    ``overlay`` picks the whiteout strategy (see the module docstring). ``parents`` are the lower
    directories, top-most first, as in overlayfs' ``lowerdir=``: a directory this layer needs but
    does not carry is created with the metadata the lowers have for it (containerd's
    ``WithParents``). ``cancel`` is checked between members. ``fileobj`` is read by a thread of
    this call's own, which has stopped when the call returns.

    Raises InvalidArgument for an invalid archive (a rejected member, a bad header, a hardlink to
    nothing), DataLoss from a decompressor for a truncated stream, Canceled; OSError otherwise.
    """
    reader = _ReadAhead(fileobj)
    try:
        applier = _Applier(root, overlay=overlay, parents=parents)
        try:
            stream = _ForwardReader(reader)
            tar = tarfile.open(
                fileobj=cast(IO[bytes], stream),
                mode="r:",
                encoding="utf-8",
                errors="surrogateescape",
                tarinfo=_StrictTarInfo,
            )
            members = cast(Any, tar).members
            while True:
                if cancel is not None and cancel.is_set():
                    raise Canceled(f"apply layer to {root}")
                info = tar.next()
                if info is None:
                    break
                members.clear()  # a stream has no index to keep; 100k TarInfos would stay in memory
                applier.apply(plan.plan_member(info), tar, stream, info)
            applier.finish()
            reader.drain()
        except tarfile.TarError as e:
            raise InvalidArgument(f"layer tar: {e}") from None
        finally:
            applier.close()
    finally:
        reader.close()
    return ApplyResult(reader.size, reader.digest, applier.count, tuple(applier.skipped))


class _ReadAhead:
    """Reads ``source`` to its end in a thread, hashing every byte, up to ``_READ_AHEAD`` chunks
    ahead of the consumer: decompression and sha256 run beside the tar work instead of before it.

    ``read`` hands out the chunks in order (``b""`` at the end) and raises whatever reading the
    source raised. ``size`` and ``digest`` cover the whole stream once :meth:`drain` returned.
    :meth:`close` stops the thread and waits for it, wherever it is.
    """

    _END = b""

    def __init__(self, source: Reader, algorithm: str = "sha256") -> None:
        self._source = source
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(_READ_AHEAD)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layer-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: bytes | BaseException
        size = _FIRST_READ  # small at first, so the tar work starts early
        try:
            while not self._stop.is_set():
                chunk = self._source.read(size)
                size = min(size * 4, CHUNK)
                if not chunk:
                    break
                self._hash.update(chunk)
                self.size += len(chunk)
                self._chunks.put(chunk)
            item = self._END
        except BaseException as e:  # handed to the consumer, which raises it
            item = e
        if not self._stop.is_set():
            self._chunks.put(item)

    def read(self, size: int = -1, /) -> bytes:
        """The next chunk of the stream, whatever ``size`` asks for."""
        if self._done:
            return self._END
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def drain(self) -> None:
        """Read to the end: the digest covers the whole stream, padding after the tar included."""
        while self.read():
            pass
        self._thread.join()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a put on a full queue
                while True:
                    self._chunks.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.01)

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"


class _ForwardReader:
    """A stream that tarfile's seekable mode (``r:``) accepts: ``seek`` may only go forward, and
    skipping reads. Stream mode (``r|``) would do, but it copies the rest of its buffer on every
    read: with 1 MiB upstream reads that costs more than the untar itself (measured: 40% of the
    time for 8k files). Here a read copies only what it returns, and :meth:`copy_to` writes file
    data from the buffer without copying it at all."""

    def __init__(self, source: Reader) -> None:
        self._source = source
        self._buf = b""
        self._off = 0  # into _buf
        self._pos = 0  # in the stream

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        avail = len(self._buf) - self._off
        if avail >= size:
            out = self._buf[self._off : self._off + size]
            self._off += size
        else:
            parts, need = [self._buf[self._off :]], size - avail
            self._buf, self._off = b"", 0
            while need > 0 and (chunk := self._source.read(CHUNK)):
                if len(chunk) > need:
                    parts.append(chunk[:need])
                    self._buf, self._off = chunk, need
                    break
                parts.append(chunk)
                need -= len(chunk)
            out = b"".join(parts)
        self._pos += len(out)
        return out

    def copy_to(self, fd: int, size: int) -> int:
        """Write the next ``size`` bytes of the stream to ``fd``; returns how many were written,
        fewer only where the stream ended."""
        done = 0
        while done < size:
            avail = len(self._buf) - self._off
            if not avail:
                chunk = self._source.read(CHUNK)
                if not chunk:
                    break
                self._buf, self._off, avail = chunk, 0, len(chunk)
            n = min(avail, size - done)
            view = memoryview(self._buf)[self._off : self._off + n]
            while view:
                view = view[os.write(fd, view) :]
            self._off += n
            done += n
        self._pos += done
        return done

    def seek(self, pos: int, whence: int = io.SEEK_SET, /) -> int:
        target = pos if whence == io.SEEK_SET else self._pos + pos
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._pos:
            raise io.UnsupportedOperation("a layer stream only seeks forward")
        while self._pos < target:
            avail = len(self._buf) - self._off
            if not avail:
                chunk = self._source.read(CHUNK)
                if not chunk:
                    break
                self._buf, self._off, avail = chunk, 0, len(chunk)
            n = min(avail, target - self._pos)
            self._off += n
            self._pos += n
        return self._pos

    def tell(self) -> int:
        return self._pos


# tarfile's header errors are undocumented (and not in typeshed), but TarFile.next() tells them apart.
_EOFHeaderError = cast("type[Exception]", vars(tarfile)["EOFHeaderError"])

# A ustar/GNU header block: name, mode, uid, gid, size, mtime, chksum, type, linkname, (magic,
# version), uname, gname, devmajor, devminor, prefix.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s12x")
_GNU_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)


def _byte_sum(block: bytes | bytearray) -> int:
    """The sum of a 512-byte block's bytes. adler32's low half is 1 + the sum of the bytes,
    modulo 65521, which is exact for 256 bytes (at most 65280): two halves give the sum
    without a Python loop over 512 bytes, which was a tenth of the header decoding."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _octal(field: bytes) -> int:
    """A numeric header field in its plain octal form (digits, then NULs or spaces), as tarfile
    reads it; ValueError for anything else (base-256, a NUL before the end, garbage), which
    tarfile's own decoder then judges."""
    digits = field.rstrip(b"\0 ")
    return int(digits, 8) if digits else 0


class _StrictTarInfo(tarfile.TarInfo):
    """Header errors as Go's archive/tar reports them. tarfile treats a bad header after the first
    as the end of the archive, which would drop the rest of a layer without a word.

    ``frombuf`` decodes the common header (octal numbers, unsigned checksum, no sparse map) in
    one ``struct`` call and builds the same TarInfo that tarfile's decoder builds; any other
    block goes to tarfile's decoder, which also raises the errors."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chksum, typ, linkname, uname, gname, major, minor, prefix) = (
            _HEADER.unpack(buf)
        )
        try:
            checksum = _octal(chksum)
            numbers = [_octal(f) for f in (mode, uid, gid, size, mtime, major, minor)]
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        if checksum != 256 + _byte_sum(buf) - sum(chksum):  # signed sums, the zero block: tarfile's
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.devmajor, obj.devminor = numbers
        obj.chksum = checksum
        obj.type = typ
        obj.name = name.split(b"\0", 1)[0].decode(encoding, errors)
        obj.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors)
        obj.uname = uname.split(b"\0", 1)[0].decode(encoding, errors)
        obj.gname = gname.split(b"\0", 1)[0].decode(encoding, errors)
        # The same fix-ups as tarfile's decoder, in its order.
        if typ == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix[0] and typ not in _GNU_TYPES:
            obj.name = prefix.split(b"\0", 1)[0].decode(encoding, errors) + "/" + obj.name
        return obj

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            kind = type(e).__name__
            if kind == "EmptyHeaderError":
                # The stream ends at a header boundary, without the zero blocks: Go accepts it too,
                # and so does a zero-byte layer (Docker's empty layers).
                raise _EOFHeaderError("end of stream") from None
            if kind in ("InvalidHeaderError", "TruncatedHeaderError"):
                raise tarfile.ReadError(f"bad header at offset {tf.offset}: {e}") from None
            raise


MakeDir = Callable[[int, str, str, bool], None]  # (parent fd, name, physical path, over a whiteout)


class _Tree:
    """A directory tree whose lookups never leave it.

    ``lookup_dir`` returns an fd owned by the tree, valid until the next ``begin_member``: cache
    entries dropped by ``invalidate`` (after a directory or symlink is removed) are closed only
    then, so a caller's fd never closes under it mid-member. With ``whiteouts_are_absent`` (an
    overlay upper dir), a creating lookup treats a char device 0/0 on its way as a missing
    directory: it replaces the whiteout.
    """

    def __init__(self, root: str, *, whiteouts_are_absent: bool = False) -> None:
        self.fd = os.open(root, _DIR_FLAGS)
        self.whiteouts_are_absent = whiteouts_are_absent
        self._cache: dict[str, tuple[int, str]] = {}  # lexical path -> (fd, physical path)
        self._retired: list[int] = []

    def lookup_dir(self, path: str, mkdir: MakeDir | None = None) -> tuple[int, str]:
        """(fd, physical root-relative path) of the directory at clean ``path``, following
        symlinks inside the root. A missing component is created by ``mkdir`` or raises
        FileNotFoundError; a non-directory raises NotADirectoryError."""
        if path == "":
            return self.fd, ""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        found = self._walk(path.split("/"), mkdir)
        self._cache[path] = found
        return found

    def _walk(self, parts: list[str], mkdir: MakeDir | None) -> tuple[int, str]:
        fds: list[int] = []  # opened by this walk; fds[i] is the directory phys[: i + 1]
        phys: list[str] = []
        todo = parts[::-1]
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if phys:  # above the root stays at the root
                        phys.pop()
                        os.close(fds.pop())
                    continue
                cur = fds[-1] if fds else self.fd
                try:
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    if mkdir is None:
                        raise
                    mkdir(cur, name, "/".join([*phys, name]), False)
                else:
                    if stat.S_ISLNK(st.st_mode):
                        links += 1
                        if links > _MAX_SYMLINKS:
                            raise InvalidArgument(f"too many levels of symbolic links in {'/'.join(parts)}")
                        target = os.readlink(name, dir_fd=cur)
                        if target.startswith("/"):
                            while fds:
                                os.close(fds.pop())
                            phys.clear()
                        todo.extend(reversed(target.split("/")))
                        continue
                    if not stat.S_ISDIR(st.st_mode):
                        if mkdir is None or not (self.whiteouts_are_absent and _is_whiteout(st)):
                            raise NotADirectoryError(
                                errno.ENOTDIR, "not a directory", "/".join([*phys, name])
                            )
                        os.unlink(name, dir_fd=cur)
                        mkdir(cur, name, "/".join([*phys, name]), True)
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=cur))
                phys.append(name)
            return (fds.pop() if fds else os.dup(self.fd)), "/".join(phys)
        finally:
            for fd in fds:
                os.close(fd)

    def invalidate(self) -> None:
        self._retired.extend(fd for fd, _ in self._cache.values())
        self._cache.clear()

    def begin_member(self) -> None:
        if len(self._cache) > _CACHE_LIMIT:
            self.invalidate()
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def close(self) -> None:
        self.invalidate()
        self.begin_member()
        os.close(self.fd)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Applier:
    def __init__(self, root: str, *, overlay: bool, parents: Sequence[str]) -> None:
        self.overlay = overlay
        self.tree = _Tree(root, whiteouts_are_absent=overlay)
        self.parents: list[_Tree] = []
        try:
            self.parents.extend(_Tree(p) for p in parents)
        except BaseException:
            self.close()
            raise
        self.trees = [self.tree, *self.parents]
        self.unpacked: set[str] = set()  # physical paths this layer wrote
        self.kept: set[str] = set()  # their ancestors, which an opaque directory keeps
        self.dir_times: list[tuple[str, int, int]] = []  # set last: creating entries bumps mtimes
        self.skipped: list[str] = []
        self.count = 0
        self._buf = memoryview(bytearray(CHUNK))

    def close(self) -> None:
        for t in [self.tree, *self.parents]:
            t.close()
        self.parents = []
        self.trees = []

    def apply(
        self, action: plan.Action, tar: tarfile.TarFile, stream: _ForwardReader, info: tarfile.TarInfo
    ) -> None:
        for t in self.trees:
            t.begin_member()
        try:
            if type(action) is plan.Write:
                self._write(action, tar, stream, info)
            elif type(action) is plan.Whiteout:
                self._whiteout(action)
            elif type(action) is plan.Opaque:
                self._opaque(action)
            elif type(action) is plan.Skip:
                log.debug("layer member skipped", name=action.name, reason=action.reason)
                self.skipped.append(f"{action.name}: {action.reason}")
                return
            else:
                assert isinstance(action, plan.Reject)
                raise InvalidArgument(f"layer member {action.name!r}: {action.reason}")
        except OSError as e:
            e.add_note(f"applying layer member {info.name!r}")
            raise
        self.count += 1

    def finish(self) -> None:
        for phys, atime_ns, mtime_ns in self.dir_times:
            self.tree.begin_member()
            try:
                fd, _ = self.tree.lookup_dir(phys)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed by a later member
            os.utime(fd, ns=(atime_ns, mtime_ns))

    # -- members

    def _write(
        self, action: plan.Write, tar: tarfile.TarFile, stream: _ForwardReader, info: tarfile.TarInfo
    ) -> None:
        e = action.entry
        kind = e.kind
        parent, base = plan.split(action.path)
        link_from: tuple[int, str] | None = None
        if kind is plan.Kind.HARDLINK:
            link_from = self._link_source(action)
        dfd, pphys = self.tree.lookup_dir(parent, self._mkparent)
        phys = plan.join(pphys, base)

        # Each create is tried first: only when the name is taken does the old entry get looked
        # at (and removed, unless a directory merges with a directory).
        if kind is plan.Kind.FILE:
            try:
                fd = os.open(base, _FILE_FLAGS, e.mode & 0o777, dir_fd=dfd)
            except FileExistsError:
                self._replace(dfd, base)
                fd = os.open(base, _FILE_FLAGS, e.mode & 0o777, dir_fd=dfd)
            try:
                if e.size:
                    self._copy(tar, stream, info, fd, e.size)
                self._set_metadata_fd(fd, e, phys)
                os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        elif kind is plan.Kind.DIR:
            hides_lower = False
            try:
                os.mkdir(base, e.mode & 0o777, dir_fd=dfd)
            except FileExistsError:
                existing = _lstat(dfd, base)
                # On overlay, a directory written where this layer put a whiteout must not merge
                # with the lower directory the whiteout hid: it becomes opaque, as after rmdir +
                # mkdir.
                hides_lower = self.overlay and existing is not None and _is_whiteout(existing)
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    if existing is not None:
                        self._remove(dfd, base, existing)
                    os.mkdir(base, e.mode & 0o777, dir_fd=dfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=dfd)
            try:
                if hides_lower:
                    os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
                self._set_metadata_fd(fd, e, phys)
            finally:
                os.close(fd)
            self.dir_times.append((phys, e.atime_ns, e.mtime_ns))
        elif kind is plan.Kind.SYMLINK:
            try:
                os.symlink(e.linkname, base, dir_fd=dfd)
            except FileExistsError:
                self._replace(dfd, base)
                os.symlink(e.linkname, base, dir_fd=dfd)
            self._set_metadata_at(dfd, base, e, phys)
        elif kind is plan.Kind.HARDLINK:
            assert link_from is not None
            src_fd, src_base = link_from
            try:
                try:
                    os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    self._replace(dfd, base)
                    os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidArgument(f"hardlink {action.path} -> {e.linkname}: target not found") from None
            # As containerd and tarfile do: the link header's metadata lands on the shared inode.
            self._set_metadata_at(dfd, base, e, phys)
        else:
            dev = os.makedev(e.devmajor, e.devminor) if kind is not plan.Kind.FIFO else 0
            try:
                os.mknod(base, _DEVICE_TYPES[kind] | (e.mode & 0o777), dev, dir_fd=dfd)
            except FileExistsError:
                self._replace(dfd, base)
                os.mknod(base, _DEVICE_TYPES[kind] | (e.mode & 0o777), dev, dir_fd=dfd)
            self._set_metadata_at(dfd, base, e, phys)
        self._mark(phys)

    def _replace(self, dfd: int, name: str) -> None:
        """Make room for a new non-directory at ``name``: whatever is there goes."""
        existing = _lstat(dfd, name)
        if existing is not None:
            self._remove(dfd, name, existing)

    def _link_source(self, action: plan.Write) -> tuple[int, str]:
        parent, base = plan.split(action.entry.linkname)
        try:
            fd, _ = self.tree.lookup_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidArgument(
                f"hardlink {action.path} -> {action.entry.linkname}: target not found"
            ) from None
        return fd, base

    def _whiteout(self, action: plan.Whiteout) -> None:
        parent, base = plan.split(action.path)
        if self.overlay:
            dfd, pphys = self.tree.lookup_dir(parent, self._mkparent)
        else:
            try:
                dfd, pphys = self.tree.lookup_dir(parent)
            except (FileNotFoundError, NotADirectoryError):
                return  # nothing below to delete
        if plan.join(pphys, base) in self.unpacked:
            return
        existing = _lstat(dfd, base)
        if existing is not None:
            self._remove(dfd, base, existing)
        if self.overlay:
            os.mknod(base, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dfd)
            os.chown(base, action.uid, action.gid, dir_fd=dfd, follow_symlinks=False)

    def _opaque(self, action: plan.Opaque) -> None:
        if self.overlay:
            fd, _ = self.tree.lookup_dir(action.path, self._mkparent)
            os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            if action.path == "":
                self._opaque_overlay_root()
            return
        try:
            fd, phys = self.tree.lookup_dir(action.path)
        except (FileNotFoundError, NotADirectoryError):
            return
        self._clear(fd, phys)

    def _opaque_overlay_root(self) -> None:
        """overlayfs ignores the opaque xattr on the upper root, so hide the lower root's names
        one by one: a whiteout where the upper has nothing, the opaque xattr on the upper's own
        directories. Without the lower dirs this cannot be done (containerd does not do it)."""
        if not self.parents:
            self.skipped.append(f"{plan.WHITEOUT_OPAQUE}: an overlay root needs the lower dirs to be opaque")
            return
        names = sorted({name for lower in self.parents for name in os.listdir(lower.fd)})
        for name in names:
            st = _lstat(self.tree.fd, name)
            if st is None:
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=self.tree.fd)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=self.tree.fd)
                try:
                    os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
                finally:
                    os.close(fd)

    def _clear(self, dfd: int, phys: str) -> None:
        """Remove what the lower layers have under the directory ``dfd``, keeping this layer's
        entries (the marker may come after them) and the directories leading to them."""
        with os.scandir(dfd) as it:
            children = list(it)
        for child in children:
            path = plan.join(phys, child.name)
            if path in self.unpacked or path in self.kept:
                if child.is_dir(follow_symlinks=False):
                    sub = os.open(child.name, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        self._clear(sub, path)
                    finally:
                        os.close(sub)
                continue
            self._remove(dfd, child.name, child.stat(follow_symlinks=False))

    # -- helpers

    def _remove(self, dfd: int, name: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)  # fd-based walk: never follows a symlink out
            self.tree.invalidate()
        else:
            os.unlink(name, dir_fd=dfd)
            if stat.S_ISLNK(st.st_mode):
                self.tree.invalidate()

    def _mark(self, phys: str) -> None:
        self.unpacked.add(phys)
        while True:
            phys = phys.rpartition("/")[0]
            if not phys or phys in self.kept:
                return
            self.kept.add(phys)

    def _copy(
        self, tar: tarfile.TarFile, stream: _ForwardReader, info: tarfile.TarInfo, fd: int, size: int
    ) -> None:
        if info.sparse is None and stream.tell() == info.offset_data:
            if stream.copy_to(fd, size) != size:
                raise InvalidArgument(f"layer tar ends inside {info.name!r}")
            return
        # A sparse file: tarfile's reader fills in the holes.
        src = cast(io.BufferedReader, tar.extractfile(info))
        remaining = size
        while remaining:
            n = src.readinto(self._buf[: min(CHUNK, remaining)])
            if not n:
                raise InvalidArgument(f"layer tar ends inside {info.name!r}")
            chunk = self._buf[:n]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            remaining -= n

    def _set_metadata_fd(self, fd: int, e: plan.Entry, phys: str) -> None:
        """Owner, xattrs and mode of an inode this member created (or a directory it merges
        with), skipping the calls that would not change anything: on such an inode a chown
        has nothing to clear, so the result is the same as chown + xattrs + chmod."""
        st = os.fstat(fd)
        chown = st.st_uid != e.uid or st.st_gid != e.gid
        if chown:  # owner first: chown clears setuid/setgid and security.capability
            os.fchown(fd, e.uid, e.gid)
        if e.xattrs:  # an ACL xattr can change the mode bits too
            self._set_xattrs(fd, e, phys)
        if chown or e.xattrs or stat.S_IMODE(st.st_mode) != e.mode:
            os.fchmod(fd, e.mode)

    def _set_metadata_at(self, dfd: int, name: str, e: plan.Entry, phys: str) -> None:
        """The same for a name that cannot be opened (symlink, device, fifo, hardlink). A
        hardlink's inode existed before this member, so its chown always runs: it clears the
        set-id bits and capabilities the link header does not carry again."""
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        chown = e.kind is plan.Kind.HARDLINK or st.st_uid != e.uid or st.st_gid != e.gid
        if chown:
            os.chown(name, e.uid, e.gid, dir_fd=dfd, follow_symlinks=False)
        if e.xattrs:
            # No lsetxattrat: go through the parent fd's /proc link; the last name is not followed.
            self._set_xattrs(f"/proc/self/fd/{dfd}/{name}", e, phys)
        # Never through a symlink: the lstat above says what this name is, and chmod follows.
        if not stat.S_ISLNK(st.st_mode) and (chown or e.xattrs or stat.S_IMODE(st.st_mode) != e.mode):
            os.chmod(name, e.mode, dir_fd=dfd)
        os.utime(name, ns=(e.atime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _set_xattrs(self, target: int | str, e: plan.Entry, phys: str) -> None:
        for key, value in e.xattrs:
            if not plan.xattr_applied(key):
                self.skipped.append(f"{phys}: xattr {key} refused")
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                # As containerd: a filesystem without xattrs, or user.* on a symlink or device.
                unsupported = err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
                if not unsupported and not (err.errno == errno.EPERM and key.startswith("user.")):
                    raise
                self.skipped.append(f"{phys}: xattr {key} not supported here")

    def _mkparent(self, dfd: int, name: str, phys: str, over_whiteout: bool) -> None:
        """Create a directory the layer uses without carrying it: 0755 root, or the metadata of
        the top-most lower directory at the same place. Over a whiteout of this layer, an
        opaque directory: the lower one stays hidden."""
        os.mkdir(name, 0o700, dir_fd=dfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            if over_whiteout:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            src = None if over_whiteout else self._lower_dir(phys)
            if src is None:
                os.fchmod(fd, 0o755)
                return
            src_fd, st = src
            os.fchown(fd, st.st_uid, st.st_gid)
            for key in os.listxattr(src_fd):
                if plan.xattr_applied(key):
                    try:
                        os.setxattr(fd, key, os.getxattr(src_fd, key))
                    except OSError as err:
                        if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                            raise
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            self.dir_times.append((phys, st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)

    def _lower_dir(self, phys: str) -> tuple[int, os.stat_result] | None:
        for lower in self.parents:
            try:
                fd, _ = lower.lookup_dir(phys)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                return None  # replaced by a non-directory: nothing to inherit
            return fd, os.fstat(fd)
        return None
