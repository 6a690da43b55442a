"""A container's rootfs: the layers of CreateTaskRequest.rootfs, mounted in its bundle (see bundle.py)."""

from __future__ import annotations

import contextlib
import os

from pyctr.api import mount


async def mount_rootfs(bundle: str, mounts: list[mount.Mount]) -> str:
    """Mounts the rootfs layers on <bundle>/rootfs; returns that path ("" when there are none)."""
    if not mounts:
        return ""
    rootfs = os.path.join(bundle, "rootfs")
    with contextlib.suppress(FileExistsError):
        os.mkdir(rootfs, 0o711)
    # Inline: a thread would cost a malloc arena and a stack in every shim for a millisecond's work.
    mount.mount_all(mounts, rootfs)
    return rootfs
