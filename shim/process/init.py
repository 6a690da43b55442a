"""Helpers for the container's init process: runc's errors as containerd reports them, and the rootfs
unmount at delete (the runc calls themselves are direct.py's and worker.py's)."""

from __future__ import annotations

import asyncio

from pyctr.api import mount
from pyctr.api.errdefs import ContainerdError, NotFound, Unknown
from pyctr.shim.runc import RuncError


async def unmount_rootfs(target: str, *, retries: int = 50) -> None:
    """mount.unmount_all for the loop: umount2 itself is quick, only EBUSY pauses must not block."""
    path = target.encode()
    busy = 0
    while not mount.unmount_step(target, path, busy, retries):
        busy += 1
        await asyncio.sleep(0.05)


def runtime_error(err: RuncError, what: str) -> Unknown:
    return Unknown(f"{what}: {err.text}")


def kill_error(err: RuncError) -> ContainerdError:
    """runc kill failures the way containerd categorises them (``checkKillError``)."""
    text = f"{err.output} {err.logged}".lower()
    if "container not running" in text or "no such process" in text or "process already finished" in text:
        return NotFound("process already finished")
    if "does not exist" in text:
        return NotFound("no such container")
    return Unknown(f"unknown error after kill: {err.text}")
