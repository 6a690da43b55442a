"""The worker's reaper: the only code in a worker that waits for children, and the only way to spawn
them (the keeper reaps its own children in its epoll loop, keeper.py).

Why a thread: a worker drives runc from an asyncio loop, and every runc command it starts must be
reaped exactly once. One daemon thread blocks in ``waitid(P_ALL, WEXITED)`` and hands each exit to
the loop with ``call_soon_threadsafe``. No ``subprocess`` or ``asyncio.create_subprocess_*`` in a
worker: their own ``waitpid(pid)`` would race this one. Children are started with
``os.posix_spawn`` (vfork-based, safe with threads).

Why it is race-free: a command we spawn is registered (pid -> future) on the loop thread right after
``posix_spawn`` returns, before the loop can run the exit callback the thread posts for it. Any other
exit is reaped and dropped: a worker is not a subreaper, so the container processes runc forks are
re-parented to the keeper, which owns their exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Signals Python ignores in-process; a spawned child must start with the default action (runc and the
# container processes expect SIGPIPE to kill them).
DEFAULT_SIGNALS = tuple(s for s in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None)) if s is not None)


@dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number (what containerd reports)
    timestamp: float  # Unix time the reaper collected it


class Reaper:
    """Spawns children and delivers their exits, on the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[Exit]] = {}
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdio: tuple[int, int, int] | None = None,
    ) -> tuple[int, asyncio.Future[Exit]]:
        """Starts ``argv`` with ``stdio`` as its fds 0, 1, 2 (/dev/null when None); returns (pid, exit).

        Every other fd of the shim is close-on-exec (Python's default), so nothing else leaks.
        Must run on the loop thread: the registration below relies on it.
        """
        actions: list[tuple[int, ...]] = []
        devnull = -1
        if stdio is None:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            stdio = (devnull, devnull, devnull)
        for target, fd in enumerate(stdio):
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        try:
            pid = os.posix_spawnp(
                argv[0],
                list(argv),
                dict(os.environ if env is None else env),
                file_actions=actions,
                setsigdef=DEFAULT_SIGNALS,
                setsigmask=(),
            )
        finally:
            if devnull >= 0:
                os.close(devnull)
        fut: asyncio.Future[Exit] = self._loop.create_future()
        self._waiters[pid] = fut
        self._kick.set()
        return pid, fut

    def _dispatch(self, exit: Exit) -> None:
        fut = self._waiters.pop(exit.pid, None)
        if fut is not None and not fut.done():
            fut.set_result(exit)

    def _run(self) -> None:
        while True:
            # Cleared before waiting: a child spawned after this point is seen by waitid, one spawned
            # after an ECHILD sets the event again, so no exit is missed and no CPU is burnt idle.
            self._kick.clear()
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED)
            except ChildProcessError:
                self._kick.wait()
                continue
            if info is None:
                continue
            now = time.time()
            if info.si_code == os.CLD_EXITED:
                status = info.si_status
            else:  # CLD_KILLED / CLD_DUMPED
                status = 128 + info.si_status
            try:
                self._loop.call_soon_threadsafe(self._dispatch, Exit(info.si_pid, status, now))
            except RuntimeError:
                return  # the loop is closed: the shim is exiting
