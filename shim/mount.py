"""mount(2)/umount2(2) for the rootfs, with containerd's option parsing (``mount/mount_linux.go``).

Options that are mount flags (``ro``, ``nosuid``, ``rbind``...) become flag bits, propagation options
(``rprivate``...) a second mount call, the rest the filesystem's data string. A read-only bind mount
needs a remount, as the kernel ignores ``MS_RDONLY`` on the initial bind.

Overlay lowerdir lists longer than a page do not fit in mount(2)'s data. containerd forks a child that
chdirs to the common parent and passes relative paths; the shim is threaded and cannot fork, and a
chdir would move every thread. Instead the common parent is opened and named ``/proc/self/fd/<n>``,
which the kernel resolves for the calling process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyctr.api.mount import MNT_DETACH, libc
from pyctr.api.mount import mount_syscall as mount
from pyctr.api.mount import umount_syscall as _umount

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

libc()  # now, in the launcher: a lookup after the fork would cost every shim private pages


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


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
    rewritten = [prefix + d[len(common) :] for d in dirs]
    out = list(data)
    out[idx] = "lowerdir=" + ":".join(rewritten)
    return out, fd


def mount_one(m: Mount, target: str) -> None:
    flags, propagation, data = parse_options(m.options)
    fd = -1
    if m.type == "overlay" and len(",".join(data)) >= _DATA_LIMIT:
        data, fd = _compact_lowerdirs(data)
    try:
        if not flags & MS_REMOUNT or data:
            # The initial bind ignores MS_RDONLY; it is applied by the remount below.
            mount(m.source, target, m.type, flags & ~_PROPAGATION, ",".join(data))
    finally:
        if fd >= 0:
            os.close(fd)
    if propagation:
        mount("", target, "", propagation, "")
    if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        mount("", target, "", flags | MS_REMOUNT, "")


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
    """Unmounts until ``target`` is no mount point (True), or EBUSY asks for a pause first (False)."""
    while True:
        err = _umount(path)
        if err == 0:
            continue  # mounts stack: unmount the next one
        if err in (errno.EINVAL, errno.ENOENT):
            return True
        if err == errno.EBUSY:
            if busy < retries:
                return False
            err = _umount(path, MNT_DETACH)  # still busy after the retries: detach lazily
            if err == 0:
                continue
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str, *, retries: int = 50) -> None:
    """Unmounts every mount stacked on ``target`` until it is no longer a mount point (idempotent)."""
    path = target.encode()
    busy = 0
    while not unmount_step(target, path, busy, retries):
        busy += 1
        time.sleep(0.05)
