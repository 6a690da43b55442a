"""Mounts as containerd passes them around, and the code that performs them.

A :class:`Mount` is a serialised mount(2) call. Snapshotters emit mounts and never mount for
their caller; clients (``pyctr``, the shim, the differ) consume them with :func:`mount_all`,
which parses the options as containerd does (``mount/mount_linux.go``): options that are mount
flags (``ro``, ``nosuid``, ``rbind``...) become flag bits, propagation options (``rprivate``...) a
second mount call, the rest the filesystem's data string. A read-only bind needs a remount, as
the kernel ignores ``MS_RDONLY`` on the initial bind.

Overlay lowerdir lists longer than a page do not fit in mount(2)'s data. containerd forks a
child that chdirs to the common parent and passes relative paths; the shim is threaded and
cannot fork, and a chdir would move every thread. Instead the common parent is opened and named
``/proc/self/fd/<n>``, which the kernel resolves for the calling process.

:func:`mount_syscall` and :func:`umount_syscall` are mount(2) and umount2(2) through libc, for
every part that mounts (the shim, pyctr, the daemon's bundle clean-up, the overlay snapshotter's
check); libc is loaded on first use, so importing this module does not load ctypes (the daemon's
start-up leaves it out).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MNT_DETACH = 0x2  # umount2: detach now, finish when the mount is no longer busy

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION_FLAGS = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
_DATA_LIMIT = os.sysconf("SC_PAGESIZE") - 512  # containerd's threshold for compacting overlay options


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = field(default_factory=tuple)

    def option(self, prefix: str) -> str | None:
        """The value of the first ``prefix=value`` option, if any."""
        for opt in self.options:
            if opt.startswith(prefix + "="):
                return opt[len(prefix) + 1 :]
        return None

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


_libc: Any = None
_get_errno: Any = None


def libc() -> Any:
    """libc with mount(2) and umount2(2) typed; loaded once. The shim launcher calls it before it
    forks: a lookup in a forked shim would cost that shim private pages."""
    global _libc, _get_errno
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _get_errno = ctypes.get_errno
        _libc = lib
    return _libc


def mount_syscall(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); OSError with its errno, naming the call."""
    result = libc().mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if result != 0:
        err = _get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def umount_syscall(path: bytes, flags: int = 0) -> int:
    """0, or the errno of one umount2(2) call."""
    return 0 if libc().umount2(path, flags) == 0 else int(_get_errno())


def parse_options(options: Iterable[str]) -> tuple[int, int, list[str]]:
    """(flags, propagation flags, data options) for a containerd mount's options."""
    flags = propagation = 0
    data: list[str] = []
    for option in options:
        if option in _FLAGS:
            clear, bit = _FLAGS[option]
            flags = flags & ~bit if clear else flags | bit
        elif option in _PROPAGATION_FLAGS:
            propagation |= _PROPAGATION_FLAGS[option]
        else:
            data.append(option)
    return flags, propagation, data


def _compact_lowerdirs(data: list[str]) -> tuple[list[str], int]:
    """Rewrites overlay lowerdirs under their common parent as /proc/self/fd/<n>/...; returns the fd."""
    idx = next((i for i, o in enumerate(data) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return data, -1
    dirs = data[idx].removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs) if len(dirs) > 1 else os.path.dirname(dirs[0])
    if not common or common == "/":
        return data, -1
    fd = os.open(common, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    prefix = f"/proc/self/fd/{fd}"
    out = list(data)
    out[idx] = "lowerdir=" + ":".join(prefix + d[len(common) :] for d in dirs)
    return out, fd


def mount_one(m: Mount, target: str) -> None:
    """One mount on ``target`` (its own target is ignored: callers choose where)."""
    flags, propagation, data = parse_options(m.options)
    fd = -1
    if m.type == "overlay" and len(",".join(data)) >= _DATA_LIMIT:
        data, fd = _compact_lowerdirs(data)
    try:
        if not flags & MS_REMOUNT or data:
            # The initial bind ignores MS_RDONLY; it is applied by the remount below.
            mount_syscall(m.source, target, m.type, flags & ~_PROPAGATION, ",".join(data))
    finally:
        if fd >= 0:
            os.close(fd)
    if propagation:
        mount_syscall("", target, "", propagation, "")
    if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        mount_syscall("", target, "", flags | MS_REMOUNT, "")


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mounts each in order on ``target``; on failure unmounts what it mounted and re-raises."""
    done = 0
    try:
        for m in mounts:
            mount_one(m, target)
            done += 1
    except BaseException:
        if done:
            with contextlib.suppress(OSError):
                unmount_all(target)
        raise


def unmount_step(target: str, path: bytes, busy: int, retries: int) -> bool:
    """Unmounts until ``target`` is no mount point (True), or EBUSY asks for a pause first (False).

    The pause is the caller's: a thread sleeps (:func:`unmount_all`), a loop sets a timer.
    ``busy`` counts the pauses so far; after ``retries`` of them the mount is detached lazily.
    """
    while True:
        err = umount_syscall(path)
        if err == 0:
            continue  # mounts stack: unmount the next one
        if err in (errno.EINVAL, errno.ENOENT):
            return True
        if err == errno.EBUSY:
            if busy < retries:
                return False
            err = umount_syscall(path, MNT_DETACH)  # still busy after the retries: detach lazily
            if err == 0:
                continue
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str, *, retries: int = 50, pause: float = 0.05) -> None:
    """Unmounts every mount stacked on ``target`` until it is no longer a mount point (idempotent)."""
    path = target.encode()
    busy = 0
    while not unmount_step(target, path, busy, retries):
        busy += 1
        time.sleep(pause)
