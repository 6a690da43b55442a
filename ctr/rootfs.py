"""A snapshot's root filesystem, mounted read-only on a temp dir for the client to read from.

As containerd's client does for ``WithUser`` (``mount.WithTempMount`` over the snapshot's
Mounts): the mounts come from the daemon, are mounted here on ``/tmp/pyctr-rootfs-<name>-*``,
read, and always unmounted and the directory removed, also when reading fails.

Read-only, whatever the snapshot is: an overlay loses its upperdir and workdir, and the upper
directory becomes its top lower one (containerd 2's way; containerd 1.6 adds ``ro`` and keeps
them, but a second overlay on a live container's workdir would reset that workdir). A bind is
remounted read-only, since the kernel ignores ``MS_RDONLY`` on the first bind. ``ctr`` may not
import ``shim``, whose mount module the shim owns; this is the small part of it a reader needs.

Paths inside are resolved as continuity's ``fs.RootPath`` resolves them: every symlink, absolute
or relative, stays inside the root (``/etc/passwd -> /lib/passwd`` reads the image's file, never
the host's).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from pyctr.api._pb.containerd.types import Mount as PbMount
from pyctr.api.mount import MNT_DETACH, Mount, umount_syscall
from pyctr.api.mount import mount_syscall as _mount
from pyctr.ctr import users

T = TypeVar("T")

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
# option -> (clear?, flag); the rest of containerd's table (mount_linux.go) never reaches a reader
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "bind": (False, MS_BIND),
    "rbind": (False, MS_BIND | MS_REC),
    "nosuid": (False, 0x2),
    "nodev": (False, 0x4),
    "noexec": (False, 0x8),
    "noatime": (False, 0x400),
    "relatime": (False, 0x200000),
    "suid": (True, 0x2),
    "dev": (True, 0x4),
    "exec": (True, 0x8),
    "defaults": (False, 0),
}
_PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"}
_OVERLAY_DROPPED = ("upperdir=", "workdir=")
_DATA_LIMIT = os.sysconf("SC_PAGESIZE") - 512  # longer overlay data goes through /proc/self/fd
MAX_LINKS = 255
MAX_FILE = 16 << 20  # an /etc/passwd larger than this is not one


def readonly(mounts: Sequence[Mount]) -> list[Mount]:
    """The same root filesystem as read-only mounts (see the module's notes)."""
    out = []
    for m in mounts:
        options = [o for o in m.options if o not in ("rw", "ro", "volatile")]
        if m.type == "overlay":
            upper, lower = m.option("upperdir"), m.option("lowerdir")
            lowers = ":".join(d for d in (upper, lower) if d)
            options = [o for o in options if not o.startswith((*_OVERLAY_DROPPED, "lowerdir="))]
            options.insert(0, f"lowerdir={lowers}")
        out.append(Mount(m.type, m.source, m.target, (*options, "ro")))
    return out


def _short_lowerdirs(data: list[str]) -> tuple[list[str], int]:
    """Overlay lowerdirs under their common parent, opened and named /proc/self/fd/<n>; the fd."""
    idx = next(i for i, o in enumerate(data) if o.startswith("lowerdir="))
    dirs = data[idx].removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs) if len(dirs) > 1 else os.path.dirname(dirs[0])
    if common in ("", "/"):
        return data, -1
    fd = os.open(common, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out = list(data)
    out[idx] = "lowerdir=" + ":".join(f"/proc/self/fd/{fd}{d[len(common) :]}" for d in dirs)
    return out, fd


def mount_one(m: Mount, target: str) -> None:
    flags, data = 0, []
    for option in m.options:
        if option in _FLAGS:
            clear, bit = _FLAGS[option]
            flags = flags & ~bit if clear else flags | bit
        elif option not in _PROPAGATION:
            data.append(option)
    fd = -1
    if m.type == "overlay" and len(",".join(data)) >= _DATA_LIMIT:
        data, fd = _short_lowerdirs(data)
    try:
        _mount(m.source, target, m.type, flags, ",".join(data))
    finally:
        if fd >= 0:
            os.close(fd)
    if flags & MS_BIND and flags & MS_RDONLY:
        _mount("", target, "", flags | MS_REMOUNT, "")


def unmount(target: str) -> None:
    """Unmounts everything stacked on ``target``; a mount still busy after a while is detached."""
    path = target.encode()
    busy = 0
    while True:
        err = umount_syscall(path)
        if err == 0:
            continue
        if err in (errno.EINVAL, errno.ENOENT):
            return  # no longer a mount point
        if err == errno.EBUSY and busy < 20:
            busy += 1
            time.sleep(0.01)
            continue
        if err == errno.EBUSY and umount_syscall(path, MNT_DETACH) == 0:
            continue
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def temp_mount(mounts: Sequence[Mount], name: str) -> Iterator[str]:
    """The mounts, made read-only, mounted on a new temp dir for the duration of the block."""
    target = tempfile.mkdtemp(prefix=f"pyctr-rootfs-{name}-")
    try:
        try:
            for m in readonly(mounts):
                mount_one(m, target)
            yield target
        finally:
            unmount(target)
    finally:
        os.rmdir(target)


def read_with(mounts: Sequence[Mount], name: str, read: Callable[[str], T]) -> T:
    """``read(root)`` on the mounted root filesystem (blocking: call it in a thread)."""
    with temp_mount(mounts, name) as root:
        return read(root)


async def read_snapshot(mounts: Sequence[PbMount], name: str, read: Callable[[str], T]) -> T:
    """:func:`read_with` in a thread, for the mounts a Snapshots call returned."""
    ms = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in mounts]
    return await asyncio.to_thread(read_with, ms, name, read)


def resolve_in_root(root: str, path: str) -> str:
    """``path`` inside ``root`` with every symlink followed as if ``root`` were ``/``."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        full = os.path.join(root, *done, name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            done.append(name)
            done.extend(todo)
            break
        if not stat.S_ISLNK(st.st_mode):
            done.append(name)
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(errno.ELOOP, f"too many links resolving {path} in {root}")
        target = os.readlink(full)
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p not in ("", ".")] + todo
    return os.path.join(root, *done)


def read_text(root: str, path: str) -> str:
    """A regular file's text inside ``root``; FileNotFoundError when it is not there."""
    fd = os.open(resolve_in_root(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} in the image is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_FILE).decode(errors="replace")
    finally:
        os.close(fd)


class RootFiles:
    """:class:`users.Files` of a mounted root filesystem, each file read at most once."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._passwd: list[users.Passwd] | None = None
        self._group: list[users.Group] | None = None

    def passwd(self) -> list[users.Passwd]:
        if self._passwd is None:
            self._passwd = users.parse_passwd(read_text(self.root, "/etc/passwd"))
        return self._passwd

    def group(self) -> list[users.Group]:
        if self._group is None:
            self._group = users.parse_group(read_text(self.root, "/etc/group"))
        return self._group
