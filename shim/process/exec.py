"""An additional process in a running container: registered by Exec, run by Start (``runc exec``).

Its pid file is ``<bundle>/<exec-id>.pid``. It is signalled with kill(2) directly, not through runc.
Its reported status follows the init's while the container is paused.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from pyctr.api.errdefs import FailedPrecondition, NotFound
from pyctr.shim.io import ConsoleSocket, ProcessIO, Stdio
from pyctr.shim.process.init import InitProcess, launch, runtime_error
from pyctr.shim.process.state import EXEC, Lifecycle, Monitor, Op
from pyctr.shim.runc import RuncError

# Exit status reported for an exec whose ``runc exec`` failed (it never ran).
START_FAILED_STATUS = 255


class ExecProcess(Lifecycle):
    table = EXEC

    def __init__(
        self, id: str, parent: InitProcess, spec: dict[str, Any], stdio: Stdio, monitor: Monitor
    ) -> None:
        super().__init__(id)
        self.parent = parent
        self.spec = dict(spec, terminal=stdio.terminal)
        self.stdio = stdio
        self._monitor = monitor
        self.io: ProcessIO | None = None
        self._stdin_closed_early = False

    @property
    def pid_file(self) -> str:
        return os.path.join(self.parent.config.bundle, f"{self.id}.pid")

    def status(self) -> str:
        parent = self.parent.status()
        return parent if parent in ("paused", "pausing") else self.state.value

    async def start(self) -> None:
        async with self.lock:
            before, after = self.state, self.check(Op.START)
            cfg = self.parent.config
            io = self.io = ProcessIO(self.stdio, uid=cfg.io_uid, gid=cfg.io_gid)
            if self._stdin_closed_early:
                io.close_stdin()
            console = ConsoleSocket() if self.stdio.terminal else None

            async def run() -> None:
                try:
                    await self.parent.runc.exec(
                        self.parent.id,
                        self.spec,
                        pid_file=self.pid_file,
                        stdio=io.runc_stdio(),
                        console_socket=console.path if console else "",
                    )
                except RuncError as err:
                    # Never ran: Wait must still answer.
                    self.mark_exited(START_FAILED_STATUS, time.time())
                    self.release()
                    raise runtime_error(err, "OCI runtime exec failed") from None

            await launch(self, self._monitor, io, console, self.pid_file, run)
            self.commit(before, after)

    async def delete(self) -> None:
        async with self.lock:
            after = self.check(Op.DELETE)
            if self.io is not None:
                await self.io.finish()
                await self.io.close()
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)
            self.state = after

    async def kill(self, signal: int, all: bool = False) -> None:
        async with self.lock:
            self.check(Op.KILL)
            if self.pid == 0:
                raise FailedPrecondition("process not created")
            if self.exited_at is not None:
                raise NotFound("process already finished")
            try:
                os.kill(self.pid, signal)
            except ProcessLookupError:
                raise NotFound("process already finished") from None

    def resize(self, width: int, height: int) -> None:
        self.check(Op.RESIZE)
        if self.io is not None:
            self.io.resize(width, height)

    def close_io(self) -> None:
        if self.io is not None:
            self.io.close_stdin()
        else:
            self._stdin_closed_early = True

    async def finish_io(self) -> None:
        if self.io is not None:
            await self.io.finish()
