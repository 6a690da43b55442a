"""Following a task's process from the client: the one stdio loop of ``run``, ``tasks start``,
``tasks attach`` and ``exec``.

The Wait call goes out before Start, so a quick exit cannot be missed. With a terminal on our
side, the process's terminal follows our window size (SIGWINCH); when our keys also reach it
(``-t -i``), our terminal goes raw and Ctrl-C is a byte for the process. Otherwise Ctrl-C is
forwarded as SIGINT (see :class:`Interrupter`), and so are the signals the caller lists. The
process's exit status becomes ours. Who created the FIFOs and the task cleans them up: the
callers, not this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.ctr import stdio
from pyctr.ctr.client import Client

# What tasks start/attach/exec forward besides SIGINT, as ctr's ForwardAllSignals would.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def ignores_sigint(pid: int) -> bool:
    """True when the kernel drops a SIGINT sent to this process: a pid namespace's init without a
    handler for it (``sleep`` as a container's process). False when we cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except OSError:
        return False
    nspid = fields.get("NSpid", "").split()
    caught = int(fields.get("SigCgt", "0").strip() or "0", 16)
    return len(nspid) > 1 and nspid[-1] == "1" and not caught & (1 << (signal.SIGINT - 1))


class Interrupter:
    """Ctrl-C for a followed process: SIGINT is forwarded; a container init that would ignore it
    is killed instead, and the command then exits 130 as an interrupted shell command does."""

    def __init__(self, client: Client, cid: str, exec_id: str = "") -> None:
        self.client, self.cid, self.exec_id = client, cid, exec_id
        self.pid = 0
        self.killed = False
        self._pending: set[asyncio.Future[None]] = set()

    def __call__(self) -> None:
        fut = asyncio.ensure_future(self._interrupt())
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def _interrupt(self) -> None:
        req = tpb.KillRequest(container_id=self.cid, exec_id=self.exec_id, signal=signal.SIGINT)
        with contextlib.suppress(Exception):
            await self.client.tasks.kill(req)
            if self.pid and ignores_sigint(self.pid):
                self.killed = True
                req = tpb.KillRequest(
                    container_id=self.cid, exec_id=self.exec_id, signal=signal.SIGKILL, all=not self.exec_id
                )
                await self.client.tasks.kill(req)

    def exit_code(self, status: int) -> int:
        return 128 + signal.SIGINT if self.killed and status == 128 + signal.SIGKILL else status


async def resize(client: Client, cid: str, exec_id: str = "") -> None:
    try:
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return
    await client.tasks.resize_pty(
        tpb.ResizePtyRequest(container_id=cid, exec_id=exec_id, width=cols, height=rows)
    )


def stdin_closer(client: Client, cid: str, exec_id: str = "") -> Callable[[], Awaitable[None]]:
    """CloseIO for the process's stdin: what to do at the end of our input."""

    async def close() -> None:
        await client.tasks.close_io(tpb.CloseIoRequest(container_id=cid, exec_id=exec_id, stdin=True))

    return close


async def follow(
    client: Client,
    cid: str,
    exec_id: str,
    fifos: stdio.FifoSet,
    *,
    terminal: bool,
    start: bool,
    on_stdin_eof: Callable[[], Awaitable[None]] | None = None,
    pid: int = 0,
    forward: Sequence[int] = FORWARDED,
) -> int:
    """Copy a process's stdio until it exits (starting it first if ``start``); its exit status.

    ``pid`` names an already started process (for Ctrl-C's check of a pid 1 that ignores
    SIGINT); ``forward`` lists the signals besides SIGINT passed on to the process when our
    terminal is not raw; ``on_stdin_eof`` runs once our stdin ends (CloseIO, or nothing for
    FIFOs someone else owns).
    """
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(client.tasks.wait(tpb.WaitRequest(container_id=cid, exec_id=exec_id)))
    saved_tty = None
    feeder: asyncio.Future[None] | None = None
    handled: list[int] = []
    pending: set[asyncio.Future[Any]] = set()  # forwarded signals in flight
    try:
        interrupter = Interrupter(client, cid, exec_id)
        interrupter.pid = pid
        if start:
            interrupter.pid = (
                await client.tasks.start(tpb.StartRequest(container_id=cid, exec_id=exec_id))
            ).pid
        if terminal and os.isatty(0):
            await resize(client, cid, exec_id)
            loop.add_signal_handler(
                signal.SIGWINCH, lambda: asyncio.ensure_future(resize(client, cid, exec_id))
            )
            handled.append(signal.SIGWINCH)
        if terminal and fifos.stdin and os.isatty(0):
            saved_tty = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSADRAIN)  # TCSAFLUSH (the default) would drop typed-ahead input
        else:
            loop.add_signal_handler(signal.SIGINT, interrupter)
            handled.append(signal.SIGINT)
            for signum in forward:

                def forward_one(sig: int = signum) -> None:
                    request = tpb.KillRequest(container_id=cid, exec_id=exec_id, signal=sig)
                    fut = asyncio.ensure_future(client.tasks.kill(request))
                    pending.add(fut)
                    fut.add_done_callback(pending.discard)

                loop.add_signal_handler(signum, forward_one)
                handled.append(signum)
        if fifos.stdin:

            async def eof() -> None:
                if on_stdin_eof is not None:
                    await on_stdin_eof()

            feeder = asyncio.ensure_future(stdio.copy_stdin(fifos, eof))
        status = await waiter
        if feeder is not None and not feeder.done():
            feeder.cancel()
        await stdio.wait_output(fifos)
        return interrupter.exit_code(int(status.exit_status))
    finally:
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        for sig in handled:
            loop.remove_signal_handler(sig)
        if not waiter.done():
            waiter.cancel()
