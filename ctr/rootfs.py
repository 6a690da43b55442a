"""A snapshot's root filesystem, mounted read-only on a temp dir for the client to read from.

As containerd's client does for ``WithUser`` (``mount.WithTempMount`` over the snapshot's
Mounts): the mounts come from the daemon, are mounted here on ``/tmp/pyctr-rootfs-<name>-*``,
read, and always unmounted and the directory removed, also when reading fails.

Read-only, whatever the snapshot is: an overlay loses its upperdir and workdir, and the upper
directory becomes its top lower one (containerd 2's way; containerd 1.6 adds ``ro`` and keeps
them, but a second overlay on a live container's workdir would reset that workdir). A bind is
remounted read-only, since the kernel ignores ``MS_RDONLY`` on the first bind (the mount code is
``pyctr.api.mount``'s, shared with the shim).

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
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from pyctr.api._pb.containerd.types import Mount as PbMount
from pyctr.api.mount import Mount, mount_all, unmount_all
from pyctr.ctr import users

T = TypeVar("T")

_OVERLAY_DROPPED = ("upperdir=", "workdir=")
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


@contextlib.contextmanager
def temp_mount(mounts: Sequence[Mount], name: str) -> Iterator[str]:
    """The mounts, made read-only, mounted on a new temp dir for the duration of the block."""
    target = tempfile.mkdtemp(prefix=f"pyctr-rootfs-{name}-")
    try:
        try:
            mount_all(readonly(mounts), target)
            yield target
        finally:
            # A reader's mount is busy only briefly (a file still being closed): short pauses.
            unmount_all(target, retries=20, pause=0.01)
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
