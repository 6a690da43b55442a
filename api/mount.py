"""A mount, as containerd passes them around: a serialised mount(2) call; and the two calls.

Snapshotters emit mounts and never mount for their caller; clients (``ctr``, the shim, the
differ) consume them. :func:`mount_syscall` and :func:`umount_syscall` are mount(2) and
umount2(2) through libc, for every part that mounts (the shim, pyctr, the daemon's bundle
clean-up, the overlay snapshotter's check); libc is loaded on first use, so importing this
module does not load ctypes (the daemon's start-up leaves it out).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MNT_DETACH = 0x2  # umount2: detach now, finish when the mount is no longer busy


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
