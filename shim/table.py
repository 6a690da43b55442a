"""The keeper's process table: containers, their init and exec processes, and who owns which exit.

Plain data and plain code (no I/O, no event loop), shared by the keeper, which applies every change,
and its workers, which read the copy they inherited when they were forked.

Exit ownership (the Go shim's pending-exit logic, containerd 1.7's ``exitSubscribers``): the keeper
reaps every child, but it learns the pid of a container process only when the worker that ran
``runc create`` or ``runc exec`` reports it, and the process may exit first. While such a worker
runs, the table keeps a *window* open that records every exit nobody claimed; ``register`` looks the
new pid up there, so the exit lands either in the window or with the registered process. Exits
nobody claims outside a window belong to re-parented grandchildren and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyctr.shim.process.state import EXEC, INIT, State, Table, Transitions

# Exit status reported for an exec whose ``runc exec`` failed (it never ran).
START_FAILED_STATUS = 255


@dataclass(slots=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number (what containerd reports)
    timestamp: float  # Unix time the keeper collected it


def exit_status(wait_status: int) -> int:
    """containerd's exit status from a waitpid status: the code, or 128 + the signal."""
    if wait_status & 0x7F == 0:
        return (wait_status >> 8) & 0xFF
    return 128 + (wait_status & 0x7F)


@dataclass(eq=False, slots=True)
class Proc(Transitions):
    """One init or exec process. ``io`` is the keeper's copy state (opaque here)."""

    id: str  # the container id for an init, the exec id otherwise
    container_id: str
    init: bool
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    pid: int = 0
    state: State = State.CREATED
    exit_status: int = 0
    exited_at: float | None = None
    pausing: bool = False
    stdin_closed: bool = False  # CloseIO came (maybe before the exec started)
    spec: str = ""  # exec: the OCI process JSON
    # An exit is being finished (output drained, event queued); Wait and Delete wait for it.
    exiting: bool = False
    released: bool = False
    waiters: list[Any] = field(default_factory=list)
    io: Any = None

    @property
    def table(self) -> Table:
        return INIT if self.init else EXEC

    @property
    def settled(self) -> bool:
        """No exit is half-reported: a Delete may go ahead (its /tasks/delete follows /tasks/exit)."""
        return not self.exiting


@dataclass(eq=False, slots=True)
class Container:
    id: str
    bundle: str
    init: Proc
    execs: dict[str, Proc] = field(default_factory=dict)
    kill_all_on_exit: bool = True
    # What the workers need again after Create (runc flags, io uid/gid, rootfs, cgroup); opaque here.
    config: dict[str, Any] = field(default_factory=dict)
    oom: Any = None

    def process(self, exec_id: str) -> Proc | None:
        return self.execs.get(exec_id) if exec_id else self.init

    def all(self) -> list[Proc]:
        return [self.init, *self.execs.values()]


class ProcessTable:
    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Proc] = {}
        self._window: list[Exit] | None = None

    def open_window(self) -> None:
        self._window = []

    def close_window(self) -> None:
        self._window = None

    def on_exit(self, exit: Exit) -> Proc | None:
        """The process owning ``exit`` if this is news for it (it is then marked exited), else None."""
        proc = self.by_pid.pop(exit.pid, None)
        if proc is None:
            if self._window is not None:
                self._window.append(exit)
            return None
        return proc if proc.mark_exited(exit.status, exit.timestamp) else None

    def register(self, pid: int, proc: Proc) -> Exit | None:
        """Owns ``pid`` from now on; returns its exit when it already came (the caller finishes it)."""
        proc.pid = pid
        if self._window is not None:
            for i, exit in enumerate(self._window):
                if exit.pid == pid:
                    del self._window[i]
                    return exit if proc.mark_exited(exit.status, exit.timestamp) else None
        self.by_pid[pid] = proc
        return None

    def forget(self, procs: list[Proc]) -> None:
        """A deleted process's late exit is nobody's business any more (no /tasks/exit after delete)."""
        for proc in procs:
            if proc.pid and self.by_pid.get(proc.pid) is proc:
                del self.by_pid[proc.pid]
