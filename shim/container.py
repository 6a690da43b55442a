"""One container in the shim: its bundle (see bundle.py), init process, exec processes and cgroup."""

from __future__ import annotations

import contextlib
import logging
import os

from pyctr.api.errdefs import NotFound
from pyctr.shim import mount
from pyctr.shim.bundle import kill_all_on_exit
from pyctr.shim.cgroups import Cgroup
from pyctr.shim.process.exec import ExecProcess
from pyctr.shim.process.init import InitProcess
from pyctr.shim.process.state import Lifecycle

log = logging.getLogger(__name__)


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


class Container:
    def __init__(self, id: str, bundle: str, init: InitProcess) -> None:
        self.id = id
        self.bundle = bundle
        self.init = init
        self.execs: dict[str, ExecProcess] = {}
        self._reserved: set[str] = set()
        self.cgroup: Cgroup | None = None
        self.kill_all_on_exit = kill_all_on_exit(bundle)

    def process(self, exec_id: str) -> InitProcess | ExecProcess:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"process does not exist {exec_id}")
        return proc

    def reserve(self, exec_id: str) -> bool:
        if exec_id in self.execs or exec_id in self._reserved:
            return False
        self._reserved.add(exec_id)
        return True

    def unreserve(self, exec_id: str) -> None:
        self._reserved.discard(exec_id)

    def add_exec(self, proc: ExecProcess) -> None:
        self._reserved.discard(proc.id)
        self.execs[proc.id] = proc

    def all(self) -> list[Lifecycle]:
        return [self.init, *self.execs.values()]

    def load_cgroup(self) -> None:
        if self.cgroup is None and self.init.pid > 0:
            try:
                self.cgroup = Cgroup.for_pid(self.init.pid)
            except OSError as exc:
                log.warning("loading cgroup of %s (pid %d): %s", self.id, self.init.pid, exc)
