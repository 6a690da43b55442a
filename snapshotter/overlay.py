"""The overlayfs snapshotter: layers share their files; an active snapshot is an upper dir.

Mounts, as containerd's overlay snapshotter returns them:
* no parent: a bind mount of the snapshot's own dir (``rw``, or ``ro`` for a view);
* a view of exactly one parent: a read-only bind of that parent (overlay needs two layers);
* otherwise ``overlay`` with ``lowerdir=<nearest parent>:…:<base>`` and, when active,
  ``upperdir``/``workdir``; ``index=off`` where the kernel supports it, ``userxattr`` inside a
  user namespace.
Long lowerdir lists are the mounter's problem (the option page is 4 KiB): consumers mount with
paths relative to a common parent directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from pyctr.api.errdefs import FailedPrecondition
from pyctr.api.mount import Mount, mount_syscall, umount_syscall
from pyctr.snapshotter import storage
from pyctr.snapshotter.base import Kind
from pyctr.snapshotter.dirs import DirSnapshotter

PLUGIN_ID = "overlayfs"


def supports_index_off() -> bool:
    return os.path.exists("/sys/module/overlay/parameters/index")


def in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def check_supported(root: str) -> None:
    """Mount a tiny overlay under ``root``; raise FailedPrecondition saying why not, if it fails.

    mount(2) and umount2(2) directly, as containerd's check does: spawning mount, umount and rm
    cost three process starts at every daemon start.
    """
    base = tempfile.mkdtemp(prefix="overlay-check-", dir=root)
    try:
        for d in ("lower1", "lower2", "merged"):
            os.mkdir(os.path.join(base, d))
        merged = f"{base}/merged"
        try:
            mount_syscall("overlay", merged, "overlay", 0, f"lowerdir={base}/lower2:{base}/lower1")
        except OSError as exc:
            raise FailedPrecondition(
                f"overlay is not supported here: {os.strerror(exc.errno or 0)}"
            ) from None
        err = umount_syscall(merged.encode())
        if err:
            raise OSError(err, f"unmounting the overlay check at {merged}: {os.strerror(err)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


class OverlaySnapshotter(DirSnapshotter):
    index_off = supports_index_off()
    userxattr = in_user_namespace()
    populate_blocks = False  # two mkdirs

    def _populate(self, tmp: str, s: storage.Snapshot) -> None:
        os.makedirs(os.path.join(tmp, "fs"), mode=0o755)
        if s.kind == Kind.ACTIVE:
            os.makedirs(os.path.join(tmp, "work"), mode=0o711)

    def _mounts(self, s: storage.Snapshot) -> list[Mount]:
        if not s.parent_ids:
            flag = "ro" if s.kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=self.fs_path(s.id), options=(flag, "rbind"))]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if self.userxattr:
            options.append("userxattr")
        if s.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(s.id)}", f"upperdir={self.fs_path(s.id)}"]
        elif len(s.parent_ids) == 1:
            return [Mount(type="bind", source=self.fs_path(s.parent_ids[0]), options=("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self.fs_path(p) for p in s.parent_ids))
        return [Mount(type="overlay", source="overlay", options=tuple(options))]
