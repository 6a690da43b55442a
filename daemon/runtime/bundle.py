"""Task bundles: the directory a shim and runc work in.

    <state>/io.containerd.runtime.v2.task/<ns>/<id>/      the bundle (0700)
        config.json           the OCI runtime spec, as the container record holds it
        rootfs/               the shim mounts the task's rootfs here
        work -> <root>/io.containerd.runtime.v2.task/<ns>/<id>   persistent scratch space
        log                   FIFO: the shim's stderr, copied into the daemon's log
        address               written by the shim: its ttrpc socket
        shim-binary-path      the shim executable, for cleanup after a restart
The state part lives on tmpfs in production and does not survive a reboot; the work part does.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass

from pyctr.api import identifiers
from pyctr.api.errdefs import AlreadyExists
from pyctr.api.mount import MNT_DETACH, umount_syscall

STATE_DIR = "io.containerd.runtime.v2.task"


@dataclass(frozen=True)
class Bundle:
    namespace: str
    id: str
    path: str
    work: str

    @property
    def address_path(self) -> str:
        return os.path.join(self.path, "address")

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def delete(self) -> None:
        """Remove the bundle: renamed away first, so a half-deleted one is never loaded again.

        A rootfs still mounted (a shim that died before unmounting it) is detached first, so the
        removal never reaches into the container's filesystem.
        """
        table = _mount_targets()  # read once: with many containers running it is long
        for path in (self.path, self.work):
            doomed = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
            if os.path.lexists(doomed):  # debris of an earlier delete, which may still hold a mount
                unmount(doomed, table)
                shutil.rmtree(doomed, ignore_errors=True)
            if not os.path.lexists(path):
                continue
            unmount(path, table)
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def unmount(path: str, table: list[str] | None = None) -> None:
    """Lazily detach everything mounted at or below ``path``, every layer of it, deepest first.

    Mounts are read from /proc/self/mountinfo (or ``table``, a fresh read of it, for the first
    pass): ``os.path.ismount`` misses a bind mount from the same filesystem (the native
    snapshotter's rootfs), and rmtree would then delete through it.
    """
    real = os.path.realpath(path)
    for _ in range(100):  # stacked mounts come off one layer per pass
        mounts = table if table is not None else _mount_targets()
        table = None
        targets = [t for t in mounts if t == real or t.startswith(real + "/")]
        if not targets:
            return
        for target in sorted(targets, key=len, reverse=True):
            err = umount_syscall(target.encode(), MNT_DETACH)
            if err:
                if err != errno.EINVAL:  # EINVAL: already gone with its parent
                    raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    raise OSError(errno.EBUSY, f"unmount {path}: mounts keep coming back")


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mount_targets() -> list[str]:
    """Mount points of this mount namespace (mountinfo escapes space, tab, newline, backslash)."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split(" ", 5)[4] for line in f]
    return [_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), t) if "\\" in t else t for t in fields]


def bundle_for(state: str, root: str, ns: str, task_id: str) -> Bundle:
    return Bundle(ns, task_id, os.path.join(state, ns, task_id), os.path.join(root, ns, task_id))


def create(state: str, root: str, ns: str, task_id: str, spec: bytes) -> Bundle:
    identifiers.validate(task_id)
    b = bundle_for(state, root, ns, task_id)
    os.makedirs(os.path.dirname(b.path), mode=0o711, exist_ok=True)
    os.makedirs(os.path.dirname(b.work), mode=0o711, exist_ok=True)
    try:
        os.mkdir(b.path, 0o700)
    except FileExistsError:
        raise AlreadyExists(f"bundle for task {task_id}") from None
    try:
        os.makedirs(b.work, mode=0o711, exist_ok=True)
        os.mkdir(os.path.join(b.path, "rootfs"), 0o711)
        os.symlink(b.work, os.path.join(b.path, "work"))
        with open(os.path.join(b.path, "config.json"), "wb") as f:
            f.write(spec)
        os.mkfifo(os.path.join(b.path, "log"), 0o700)
    except BaseException:
        b.delete()
        raise
    return b


def any_left(state: str) -> bool:
    """Whether the state directory holds a bundle: a restart with tasks to reconnect."""
    try:
        namespaces = [e for e in os.scandir(state) if e.is_dir() and not e.name.startswith(".")]
        return any(not t.startswith(".") for ns in namespaces for t in os.listdir(ns.path))
    except OSError:
        return False


def existing(state: str, root: str) -> list[Bundle]:
    """Every bundle left in the state directory (after a daemon restart)."""
    out: list[Bundle] = []
    if not os.path.isdir(state):
        return out
    for ns in sorted(os.listdir(state)):
        nsdir = os.path.join(state, ns)
        if not os.path.isdir(nsdir) or ns.startswith("."):
            continue
        for task_id in sorted(os.listdir(nsdir)):
            if task_id.startswith("."):
                shutil.rmtree(os.path.join(nsdir, task_id), ignore_errors=True)  # an interrupted delete
                continue
            out.append(bundle_for(state, root, ns, task_id))
    return out
