"""The calls the keeper serves without a worker: it runs runc itself and finishes on runc's exit.

Why: a worker costs ~4 ms before runc even starts (the fork, its copy-on-write faults, a loop and a
reaper thread), a third of a ``runc start`` or ``runc delete``. These calls need nothing the keeper
lacks: the table, one runc command with no stdio of its own, at most a few files. So Start of an
init, Kill, Delete, Pause, Resume and the internal "killall" run here; Create, Exec, an exec's Start
and that of an init created from a checkpoint (stdio, consoles), Update, Pids, Stats and Checkpoint
still go to a worker.

Each handler takes the job the keeper made current (so exits stay held during a Start, as with a
worker) and ends it with :meth:`Keeper.finish` and the same result a worker would send: reply or
error, events, table updates, fds. runc's output goes to a memfd read once it exited; the keeper
reaps runc like any child (``Keeper.spawn``), so there is still one ``waitpid`` caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyctr.api import mount
from pyctr.api import pblite as pw
from pyctr.api.errdefs import FailedPrecondition, NotFound, Unknown
from pyctr.shim.process.init import kill_error, runtime_error
from pyctr.shim.process.state import Op
from pyctr.shim.runc import RuncError, command_line, log_size, logged_error
from pyctr.shim.table import Container, Proc

if TYPE_CHECKING:
    from pyctr.shim.keeper import Job, Keeper

log = logging.getLogger("pyctr.shim")

_UNMOUNT_RETRIES = 50
_UNMOUNT_PAUSE = 0.05


def _timestamp(ts: float | None) -> bytes | None:
    return None if ts is None else pw.timestamp(ts)


def guard(k: Keeper, job: Job, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` for a later callback: whatever it raises fails the job instead of the keeper's loop."""

    def call(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("shim: %s failed", job.method)
            if k.job is job:
                k.finish_error(job, exc)

    return call


def runc(
    k: Keeper, job: Job, container: Container, args: list[str], done: Callable[[RuncError | None], None]
) -> None:
    """Runs ``runc <global flags> args`` for ``container``; ``done(None)`` on success, else the error
    (worded as :class:`pyctr.shim.runc.Runc` words it). ``done`` runs guarded for ``job``."""
    done = guard(k, job, done)
    cfg = container.config
    binary = cfg.get("command") or "runc"  # resolved by the Create worker
    log_file = cfg["log"]
    argv = command_line(
        binary, cfg["root"], log_file, cfg.get("systemd_cgroup", False), cfg.get("criu", ""), args
    )
    since = log_size(log_file)
    out = os.memfd_create("runc-output", os.MFD_CLOEXEC)

    def exited(status: int) -> None:
        try:
            if status == 0:
                error = None
            else:
                output = os.pread(out, 65536, 0).decode(errors="replace")
                error = RuncError(args[0], status, output, logged_error(log_file, since))
        finally:
            os.close(out)
        done(error)

    try:
        k.spawn(argv, out, exited)
    except OSError as exc:
        os.close(out)
        # runc never ran (missing, not executable): worded as Go's, as the worker's driver does.
        done(RuncError(args[0], 127, f"fork/exec {binary}: {exc.strerror}", ""))


def _request(payload: bytes) -> dict[int, Any]:
    return dict(pw.fields(payload))


def start(k: Keeper, job: Job, container: Container, proc: Proc) -> bool:
    if not proc.init or container.config.get("restore"):
        return False  # runc exec or runc restore: stdio and maybe a console, a worker's job
    before, after = proc.state, proc.check(Op.START)

    def started(err: RuncError | None) -> None:
        if err is not None:
            k.finish_error(job, runtime_error(err, "OCI runtime start failed"))
            return
        # The cgroup and its OOM watch come with Create (worker.py): nothing else to do here.
        event = pw.string(1, container.id) + pw.uint(2, proc.pid)
        k.finish(
            job,
            {
                "reply": pw.uint(1, proc.pid),
                "events": [("/tasks/start", "containerd.events.TaskStart", event)],
                "updates": [("state", container.id, "", before.value, after.value)],
            },
        )

    runc(k, job, container, ["start", container.id], started)
    return True


def kill(k: Keeper, job: Job, container: Container, proc: Proc) -> bool:
    request = _request(job.payload)
    signum = request.get(3, 0)
    proc.check(Op.KILL)
    if proc.init:

        def killed(err: RuncError | None) -> None:
            if err is not None:
                k.finish_error(job, kill_error(err))
            else:
                k.finish(job, {"reply": b""})

        runc(
            k,
            job,
            container,
            ["kill", *(["--all"] if request.get(4) else []), container.id, str(signum)],
            killed,
        )
        return True
    if proc.pid == 0:
        raise FailedPrecondition("process not created")
    if proc.exited_at is not None:
        raise NotFound("process already finished")
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        raise NotFound("process already finished") from None
    k.finish(job, {"reply": b""})
    return True


def killall(k: Keeper, job: Job) -> None:
    """Init exited and the container has no PID namespace of its own: SIGKILL what is left."""
    container = k.table.containers.get(job.payload.decode())
    if container is None:
        k.finish(job, {"reply": b""})
        return

    def killed(err: RuncError | None) -> None:
        if err is not None:
            log.warning("OCI runtime killall failed for %s: %s", container.id, err.text)
        k.finish(job, {"reply": b""})

    runc(k, job, container, ["kill", "--all", container.id, str(int(signal.SIGKILL))], killed)


def delete(k: Keeper, job: Job, container: Container, proc: Proc) -> bool:
    proc.check(Op.DELETE)
    reply = pw.uint(1, proc.pid) + pw.uint(2, proc.exit_status) + pw.message(3, _timestamp(proc.exited_at))
    if not proc.init:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(container.bundle, f"{proc.id}.pid"))
        k.finish(job, {"reply": reply, "updates": [("deleted", container.id, proc.id)]})
        return True

    def deleted(err: RuncError | None) -> None:
        error: Exception | None = None
        if err is not None and "does not exist" not in f"{err.output} {err.logged}":
            error = runtime_error(err, "failed to delete task")
        unmount(k, container.config.get("rootfs", ""), guard(k, job, lambda exc: unmounted(error, exc)))

    def unmounted(error: Exception | None, exc: OSError | None) -> None:
        if error is None and exc is not None:
            error = Unknown(f"failed rootfs umount: {exc}")
        if error is not None:
            k.finish_error(job, error)
            return
        event = (
            pw.string(1, container.id)
            + pw.uint(2, proc.pid)
            + pw.uint(3, proc.exit_status)
            + pw.message(4, _timestamp(proc.exited_at))
            + pw.string(5, container.id)
        )
        k.finish(
            job,
            {
                "reply": reply,
                "events": [("/tasks/delete", "containerd.events.TaskDelete", event)],
                "updates": [("deleted", container.id, "")],
            },
        )

    runc(k, job, container, ["delete", container.id], deleted)
    return True


def unmount(k: Keeper, target: str, then: Callable[[OSError | None], None], busy: int = 0) -> None:
    """:func:`pyctr.api.mount.unmount_all` on the keeper's loop: EBUSY pauses become timers."""
    if not target:
        then(None)
        return
    try:
        done = mount.unmount_step(target, target.encode(), busy, _UNMOUNT_RETRIES)
    except OSError as exc:
        then(exc)
        return
    if done:
        then(None)
    else:
        k.later(_UNMOUNT_PAUSE, unmount, k, target, then, busy + 1)


def _pause_or_resume(
    k: Keeper, job: Job, container: Container, op: Op, command: str, topic: str, event: str
) -> bool:
    init = container.init
    before, after = init.state, init.check(op)

    def done(err: RuncError | None) -> None:
        if err is not None:
            k.finish_error(job, runtime_error(err, f"OCI runtime {command} failed"))
            return
        k.finish(
            job,
            {
                "reply": b"",
                "events": [(topic, event, pw.string(1, container.id))],
                "updates": [("state", container.id, "", before.value, after.value)],
            },
        )

    runc(k, job, container, [command, container.id], done)
    return True


def pause(k: Keeper, job: Job, container: Container, proc: Proc) -> bool:
    return _pause_or_resume(
        k, job, container, Op.PAUSE, "pause", "/tasks/paused", "containerd.events.TaskPaused"
    )


def resume(k: Keeper, job: Job, container: Container, proc: Proc) -> bool:
    return _pause_or_resume(
        k, job, container, Op.RESUME, "resume", "/tasks/resumed", "containerd.events.TaskResumed"
    )


# Method -> handler(keeper, job, container, process); False hands the job to a worker.
HANDLERS: dict[str, Callable[[Keeper, Job, Container, Proc], bool]] = {
    "Start": start,
    "Kill": kill,
    "Delete": delete,
    "Pause": pause,
    "Resume": resume,
}
