"""Process states and every allowed transition, as two tables (init and exec processes).

Each operation first looks up ``(state, op)``: a :class:`State` is where the process goes when the
operation succeeds (the same state for operations that change nothing), a :class:`Refuse` is the error
the runc shim answers with. The error texts are containerd's (``pkg/process/*_state.go``); most are
plain errors, i.e. ttrpc Unknown, and those on a deleted process are NotFound.

The exit of a process is the ``EXIT`` operation: it is never refused. An operation that waited for runc
commits its target state only if no exit arrived meanwhile (:meth:`Transitions.commit`), so an init
that dies during ``runc start`` stays STOPPED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyctr.api.errdefs import ContainerdError, NotFound, Unknown


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class Op(enum.Enum):
    START = "start"
    DELETE = "delete"
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    EXEC = "exec"
    RESIZE = "resize"
    EXIT = "exit"


@dataclass(frozen=True, slots=True)
class Refuse:
    message: str
    error: type[ContainerdError] = Unknown


Table = dict[State, dict[Op, State | Refuse]]

CREATED, RUNNING, PAUSED, STOPPED, DELETED = State
_DELETED_ROW: dict[Op, State | Refuse] = {
    Op.START: Refuse("cannot start a deleted process"),
    Op.DELETE: Refuse("cannot delete a deleted process", NotFound),
    Op.KILL: Refuse("cannot kill a deleted process", NotFound),
    Op.PAUSE: Refuse("cannot pause a deleted process"),
    Op.RESUME: Refuse("cannot resume a deleted process"),
    Op.UPDATE: Refuse("cannot update a deleted process"),
    Op.CHECKPOINT: Refuse("cannot checkpoint a deleted process"),
    Op.EXEC: Refuse("cannot exec in a deleted state"),
    Op.RESIZE: Refuse("cannot resize a deleted process"),
    Op.EXIT: DELETED,
}

INIT: Table = {
    CREATED: {
        Op.START: RUNNING,
        Op.DELETE: DELETED,
        Op.KILL: CREATED,
        Op.PAUSE: Refuse("cannot pause task in created state"),
        Op.RESUME: Refuse("cannot resume task in created state"),
        Op.UPDATE: CREATED,
        Op.CHECKPOINT: Refuse("cannot checkpoint a task in created state"),
        Op.EXEC: CREATED,
        Op.RESIZE: CREATED,
        Op.EXIT: STOPPED,
    },
    RUNNING: {
        Op.START: Refuse("cannot start a running process"),
        Op.DELETE: Refuse("cannot delete a running process"),
        Op.KILL: RUNNING,
        Op.PAUSE: PAUSED,
        Op.RESUME: Refuse("cannot resume a running process"),
        Op.UPDATE: RUNNING,
        Op.CHECKPOINT: RUNNING,
        Op.EXEC: RUNNING,
        Op.RESIZE: RUNNING,
        Op.EXIT: STOPPED,
    },
    PAUSED: {
        Op.START: Refuse("cannot start a paused process"),
        Op.DELETE: Refuse("cannot delete a paused process"),
        Op.KILL: PAUSED,
        Op.PAUSE: Refuse("cannot pause a paused container"),
        Op.RESUME: RUNNING,
        Op.UPDATE: PAUSED,
        Op.CHECKPOINT: PAUSED,
        Op.EXEC: Refuse("cannot exec in a paused state"),
        Op.RESIZE: PAUSED,
        Op.EXIT: STOPPED,
    },
    STOPPED: {
        Op.START: Refuse("cannot start a stopped process"),
        Op.DELETE: DELETED,
        Op.KILL: STOPPED,  # runc answers "container not running", mapped to NotFound by the caller
        Op.PAUSE: Refuse("cannot pause a stopped container"),
        Op.RESUME: Refuse("cannot resume a stopped container"),
        Op.UPDATE: Refuse("cannot update a stopped container"),
        Op.CHECKPOINT: Refuse("cannot checkpoint a stopped container"),
        Op.EXEC: Refuse("cannot exec in a stopped state"),
        Op.RESIZE: STOPPED,
        Op.EXIT: STOPPED,
    },
    DELETED: _DELETED_ROW,
}

# Exec processes are never paused themselves (their status follows the init's), and have no
# update/checkpoint/exec of their own: those rows are absent and refused generically.
EXEC: Table = {
    CREATED: {
        Op.START: RUNNING,
        Op.DELETE: DELETED,
        Op.KILL: CREATED,  # refused by the process itself: no pid yet (FailedPrecondition)
        Op.RESIZE: CREATED,
        Op.EXIT: STOPPED,
    },
    RUNNING: {
        Op.START: Refuse("cannot start a running process"),
        Op.DELETE: Refuse("cannot delete a running process"),
        Op.KILL: RUNNING,
        Op.RESIZE: RUNNING,
        Op.EXIT: STOPPED,
    },
    STOPPED: {
        Op.START: Refuse("cannot start a stopped process"),
        Op.DELETE: DELETED,
        Op.KILL: STOPPED,  # refused by the process itself: already finished (NotFound)
        Op.RESIZE: Refuse("cannot resize a stopped container"),
        Op.EXIT: STOPPED,
    },
    DELETED: _DELETED_ROW,
}


def transition(table: Table, state: State, op: Op) -> State:
    """The state ``op`` leads to from ``state``; raises the table's error when it is refused."""
    target = table.get(state, {}).get(op)
    if target is None:
        raise Unknown(f"invalid operation {op.value} in state {state.value}")
    if isinstance(target, Refuse):
        raise target.error(target.message)
    return target


class Transitions:
    """The state moves of a process record (the keeper's ``table.Proc``, which provides the attributes)."""

    state: State
    exit_status: int
    exited_at: float | None

    @property
    def table(self) -> Table:
        raise NotImplementedError

    def check(self, op: Op) -> State:
        return transition(self.table, self.state, op)

    def commit(self, before: State, after: State) -> None:
        """Enters ``after`` unless the state moved on meanwhile (an exit came while runc or a worker
        ran)."""
        if self.state is before:
            self.state = after

    def mark_exited(self, status: int, timestamp: float) -> bool:
        """Records the exit once; returns False for a duplicate."""
        if self.exited_at is not None:
            return False
        self.exit_status = status
        self.exited_at = timestamp
        self.state = self.check(Op.EXIT)
        return True
