"""The container's init process: created and started through runc, deleted with the container."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pyctr.api.errdefs import ContainerdError, NotFound, Unknown
from pyctr.shim import mount
from pyctr.shim.bundle import INIT_PID_FILE, read_pid_file
from pyctr.shim.io import ConsoleSocket, ProcessIO, Stdio
from pyctr.shim.process.state import INIT, Lifecycle, Monitor, Op, State
from pyctr.shim.runc import Runc, RuncError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InitConfig:
    """What Create fixes for the container's lifetime (runc Options included)."""

    id: str
    bundle: str
    stdio: Stdio
    rootfs: str = ""  # <bundle>/rootfs when the shim mounted it, unmounted again at delete
    io_uid: int = 0
    io_gid: int = 0
    no_pivot_root: bool = False
    no_new_keyring: bool = False


async def unmount_rootfs(target: str, *, retries: int = 50) -> None:
    """mount.unmount_all for the loop: umount2 itself is quick, only EBUSY pauses must not block."""
    path = target.encode()
    busy = 0
    while not mount.unmount_step(target, path, busy, retries):
        busy += 1
        await asyncio.sleep(0.05)


async def launch(
    proc: Lifecycle,
    monitor: Monitor,
    io: ProcessIO,
    console: ConsoleSocket | None,
    pid_file: str,
    run: Callable[[], Awaitable[None]],
) -> None:
    """Runs ``run`` (runc create or exec, writing ``pid_file``) and takes the new process on: its
    stdio starts copying (from the terminal master when there is a ``console``) and its exit goes
    to ``proc``. The exit subscription is open before runc runs: the process may exit before runc
    returns (see the reaper). On failure the stdio is closed and the error propagates."""
    subscription = monitor.subscribe()
    try:
        try:
            await run()
        finally:
            io.close_runc_ends()
        master = await console.receive_master() if console else -1
        io.start(master)
        pid = read_pid_file(pid_file)
    except BaseException:
        subscription.close()
        await io.close()
        raise
    finally:
        if console is not None:
            console.close()
    proc.pid = pid
    monitor.register(pid, proc, subscription)


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


class InitProcess(Lifecycle):
    table = INIT

    def __init__(self, config: InitConfig, runc: Runc, monitor: Monitor) -> None:
        super().__init__(config.id)
        self.config = config
        self.runc = runc
        self._monitor = monitor
        self.io: ProcessIO | None = None
        self.pausing = False

    @property
    def stdio(self) -> Stdio:
        return self.config.stdio

    def status(self) -> str:
        return "pausing" if self.pausing else self.state.value

    async def create(self) -> None:
        cfg = self.config
        pid_file = os.path.join(cfg.bundle, INIT_PID_FILE)
        io = self.io = ProcessIO(cfg.stdio, uid=cfg.io_uid, gid=cfg.io_gid)
        console = ConsoleSocket() if cfg.stdio.terminal else None

        async def run() -> None:
            try:
                await self.runc.create(
                    cfg.id,
                    cfg.bundle,
                    pid_file=pid_file,
                    stdio=io.runc_stdio(),
                    console_socket=console.path if console else "",
                    no_pivot=cfg.no_pivot_root,
                    no_new_keyring=cfg.no_new_keyring,
                )
            except RuncError as err:
                raise runtime_error(err, "OCI runtime create failed") from None

        await launch(self, self._monitor, io, console, pid_file, run)

    async def start(self) -> None:
        async with self.lock:
            before, after = self.state, self.check(Op.START)
            try:
                await self.runc.start(self.id)
            except RuncError as err:
                raise runtime_error(err, "OCI runtime start failed") from None
            self.commit(before, after)

    async def delete(self) -> None:
        async with self.lock:
            after = self.check(Op.DELETE)
            error: ContainerdError | None = None
            if self.io is not None:
                await self.io.finish()
            try:
                await self.runc.delete(self.id)
            except RuncError as err:
                if "does not exist" not in f"{err.output} {err.logged}":
                    error = runtime_error(err, "failed to delete task")
            if self.io is not None:
                await self.io.close()
            if self.config.rootfs:
                try:
                    await unmount_rootfs(self.config.rootfs)
                except OSError as exc:
                    log.warning("failed to cleanup rootfs mount: %s", exc)
                    error = error or Unknown(f"failed rootfs umount: {exc}")
            if error is not None:
                raise error
            # Unconditionally: deleting a created task kills its init, whose exit may have come in.
            self.state = after

    async def kill(self, signal: int, all: bool = False) -> None:
        async with self.lock:
            self.check(Op.KILL)
            await self._kill(signal, all)

    async def _kill(self, signal: int, all: bool) -> None:
        try:
            await self.runc.kill(self.id, signal, all=all)
        except RuncError as err:
            raise kill_error(err) from None

    async def kill_all(self) -> None:
        """SIGKILL to every process left in the container (init exited, no own PID namespace)."""
        try:
            await self.runc.kill(self.id, 9, all=True)
        except RuncError as err:
            log.warning("OCI runtime killall failed for %s: %s", self.id, err.text)

    async def pause(self) -> None:
        async with self.lock:
            before, after = self.state, self.check(Op.PAUSE)
            self.pausing = True
            try:
                await self.runc.pause(self.id)
            except RuncError as err:
                raise runtime_error(err, "OCI runtime pause failed") from None
            finally:
                self.pausing = False
            self.commit(before, after)

    async def resume(self) -> None:
        async with self.lock:
            before, after = self.state, self.check(Op.RESUME)
            try:
                await self.runc.resume(self.id)
            except RuncError as err:
                raise runtime_error(err, "OCI runtime resume failed") from None
            self.commit(before, after)

    async def update(self, resources: bytes) -> None:
        async with self.lock:
            self.check(Op.UPDATE)
            try:
                await self.runc.update(self.id, resources)
            except RuncError as err:
                raise runtime_error(err, "OCI runtime update failed") from None

    async def checkpoint(
        self,
        image_path: str,
        *,
        work_path: str = "",
        exit: bool = False,
        tcp: bool = False,
        unix_sockets: bool = False,
        terminal: bool = False,
        file_locks: bool = False,
        empty_namespaces: tuple[str, ...] = (),
    ) -> None:
        async with self.lock:
            self.check(Op.CHECKPOINT)
            # A work dir of our own (under the bundle's ``work``) is removed afterwards; criu's log is
            # kept as <bundle>/criu-dump.log when the dump fails, as the Go shim does.
            own_work = not work_path
            work = work_path or os.path.join(self.config.bundle, "work", "criu-work")
            try:
                await self.runc.checkpoint(
                    self.id,
                    image_path=image_path,
                    work_path=work,
                    leave_running=not exit,
                    tcp=tcp,
                    unix_sockets=unix_sockets,
                    terminal=terminal,
                    file_locks=file_locks,
                    empty_namespaces=empty_namespaces,
                )
            except RuncError as err:
                dump_log = os.path.join(self.config.bundle, "criu-dump.log")
                with contextlib.suppress(OSError):
                    shutil.copyfile(os.path.join(work, "dump.log"), dump_log)
                raise Unknown(
                    f"{err.text.splitlines()[0] if err.text else 'checkpoint failed'} path= {dump_log}"
                ) from None
            finally:
                if own_work:
                    shutil.rmtree(work, ignore_errors=True)

    def check_exec(self) -> None:
        self.check(Op.EXEC)

    def resize(self, width: int, height: int) -> None:
        self.check(Op.RESIZE)
        if self.io is not None:
            self.io.resize(width, height)

    def close_io(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    async def finish_io(self) -> None:
        if self.io is not None:
            await self.io.finish()

    @property
    def deleted(self) -> bool:
        return self.state is State.DELETED
