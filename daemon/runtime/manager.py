"""The runtime manager: one shim per task, found again after a restart.

Tasks live in memory, keyed by (namespace, id); the bundles on disk are the durable record. On
start-up every bundle is visited: a live shim is reconnected (and a task that exited while we
were down is reported with its real exit status), a dead one is cleaned up with ``shim delete``
and reported as exited. A shim whose connection drops unexpectedly is treated the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from pyctr.api import errdefs, pbutil
from pyctr.api.log import get_logger
from pyctr.api.mount import Mount
from pyctr.daemon.events import Exchange
from pyctr.daemon.runtime import bundle as bundlemod
from pyctr.daemon.runtime.bundle import Bundle

if TYPE_CHECKING:
    from pyctr.api._pb.containerd.task import v2 as task
    from pyctr.api._pb.containerd.types import Mount as PbMount
    from pyctr.api._pb.google.protobuf import Any as PbAny
    from pyctr.daemon.runtime.shim import ShimBinary, ShimConnection

# The shim client and the task API's messages are imported by the first task (created, or found
# at start-up), not by every daemon start: a daemon with no tasks never needs them.

log = get_logger("pyctrd.runtime")

DEFAULT_RUNTIMES = {"io.containerd.runc.v2": "containerd-shim-pyrunc-v2"}


def binary_name(runtime: str) -> str:
    """containerd's convention: ``io.containerd.runc.v2`` → ``containerd-shim-runc-v2``."""
    parts = runtime.split(".")
    if len(parts) < 2 or not all(parts[-2:]):
        raise errdefs.InvalidArgument(
            f"invalid runtime name {runtime}, correct runtime name should be either format like "
            "`io.containerd.runc.v1` or a full path to the binary"
        )
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


class Task:
    """One task the manager tracks: its bundle, its shim binary and, once connected, its shim."""

    __slots__ = ("binary", "bundle", "deleting", "exited", "id", "log_fd", "namespace", "pid", "shim")

    def __init__(self, namespace: str, id: str, bundle: Bundle, binary: ShimBinary) -> None:
        self.namespace = namespace
        self.id = id
        self.bundle = bundle
        self.binary = binary
        self.shim: ShimConnection | None = None
        self.pid = 0
        self.deleting = False
        self.log_fd = -1
        self.exited = asyncio.Event()


class TaskManager:
    def __init__(
        self,
        root: str,
        state: str,
        grpc_address: str,
        ttrpc_address: str,
        exchange: Exchange,
        runtimes: Mapping[str, str] | None = None,
        search_path: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.state = state
        self.grpc_address = grpc_address
        self.ttrpc_address = ttrpc_address
        self.exchange = exchange
        self.runtimes = dict(DEFAULT_RUNTIMES if runtimes is None else runtimes)
        self.search_path = list(search_path)
        self.tasks: dict[tuple[str, str], Task] = {}
        self.debug = False

    # -- resolving shims ---------------------------------------------------------------------

    def resolve(self, runtime: str) -> str:
        if not runtime:
            raise errdefs.InvalidArgument("no runtime name")
        name = self.runtimes.get(runtime, runtime)
        if os.path.isabs(name):
            if not os.path.exists(name):
                raise errdefs.NotFound(f"invalid custom binary path: {name}")
            return name
        if not name.startswith("containerd-shim-"):
            name = binary_name(name)
        for d in [*self.search_path, *os.environ.get("PATH", "").split(os.pathsep)]:
            candidate = os.path.join(d, name)
            if d and os.access(candidate, os.X_OK):
                return candidate
        raise errdefs.NotFound(f"runtime {runtime!r} binary not installed {name!r}")

    # -- lifecycle ---------------------------------------------------------------------------

    def get(self, ns: str, task_id: str) -> Task:
        t = self.tasks.get((ns, task_id))
        if t is None or t.shim is None:
            raise errdefs.NotFound(f"task {task_id} not found")
        return t

    def list(self, ns: str) -> list[Task]:
        return [t for (tns, _), t in sorted(self.tasks.items()) if tns == ns and t.shim is not None]

    async def create(
        self,
        ns: str,
        task_id: str,
        spec: bytes,
        runtime: str,
        request: task.CreateTaskRequest,
        runtime_options: PbAny | None,
        prepare: Callable[[Bundle], Awaitable[None]] | None = None,
    ) -> Task:
        """Starts the task's shim on a new bundle and creates the task in it. ``prepare`` runs on
        the bundle before the shim starts (a restore unpacks its checkpoint there); what it raises
        undoes the task as a failed create does."""
        from pyctr.api._pb.containerd.task import v2 as task
        from pyctr.daemon.runtime.shim import ShimBinary, ShimConnection

        if (ns, task_id) in self.tasks:
            raise errdefs.AlreadyExists(f"task {task_id}")
        binary = ShimBinary(self.resolve(runtime), self.grpc_address, self.ttrpc_address, self.debug)
        b = bundlemod.create(self.state, self.root, ns, task_id, spec)
        t = Task(ns, task_id, b, binary)
        self.tasks[(ns, task_id)] = t
        try:
            if prepare is not None:
                await prepare(b)
            self._open_log(t)
            options = request.options if request.options is not None else runtime_options
            address = await binary.start(b, options)
            t.shim = await ShimConnection.connect(address, ns, on_close=lambda: self._on_close(t))
            request.id = task_id
            request.bundle = b.path
            request.options = options
            try:
                resp = await t.shim.call("Create", request, task.CreateTaskResponse)
            except errdefs.ContainerdError as exc:
                # containerd 1.6 names the failed step, keeping the category; dockerd and ctr
                # print the text as they get it.
                raise type(exc)(f"failed to create shim task: {exc}") from None
            t.pid = resp.pid
        except BaseException:
            await self._abandon(t)
            raise
        return t

    async def _abandon(self, t: Task) -> None:
        """Undo a failed create: the shim goes, the bundle goes, nothing is reported."""
        from pyctr.api._pb.containerd.task import v2 as task
        from pyctr.daemon.runtime.shim import ShimConnection

        t.deleting = True
        if t.shim is None and os.path.exists(t.bundle.address_path):
            # The shim came up but we never got to talk to it: reach it to tell it to go.
            with contextlib.suppress(Exception):
                t.shim = await ShimConnection.connect(t.bundle.read("address"), t.namespace)
        if t.shim is not None:
            with contextlib.suppress(Exception):
                await t.shim.empty("Shutdown", task.ShutdownRequest(id=t.id, now=True), timeout=5)
            t.shim.close()
        with contextlib.suppress(Exception):
            if os.path.exists(os.path.join(t.bundle.path, "shim-binary-path")):
                await t.binary.delete(t.bundle)
        self._close_log(t)
        self.tasks.pop((t.namespace, t.id), None)
        await asyncio.to_thread(t.bundle.delete)

    async def delete(self, ns: str, task_id: str) -> task.DeleteResponse:
        """Delete the task's init process; the shim then exits and the bundle goes."""
        from pyctr.api._pb.containerd.task import v2 as task

        t = self.get(ns, task_id)
        assert t.shim is not None
        resp = await t.shim.call("Delete", task.DeleteRequest(id=task_id), task.DeleteResponse)
        t.deleting = True
        with contextlib.suppress(Exception):
            await t.shim.empty("Shutdown", task.ShutdownRequest(id=task_id), timeout=5)
        t.shim.close()
        self._close_log(t)
        self.tasks.pop((ns, task_id), None)
        await asyncio.to_thread(t.bundle.delete)
        return resp

    # -- shim logs ---------------------------------------------------------------------------

    def _open_log(self, t: Task) -> None:
        path = os.path.join(t.bundle.path, "log")
        if not os.path.exists(path):
            return
        # Read-write, so the FIFO never reports EOF when a shim restarts its end.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        t.log_fd = fd
        loop = asyncio.get_running_loop()
        tid = t.id

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                loop.remove_reader(fd)
                return
            for line in data.decode(errors="replace").splitlines():
                if line.strip():
                    log.info("shim", id=tid, line=line)

        loop.add_reader(fd, readable)

    def _close_log(self, t: Task) -> None:
        if t.log_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(t.log_fd)
            os.close(t.log_fd)
            t.log_fd = -1

    # -- dead shims and restarts ---------------------------------------------------------------

    def _on_close(self, t: Task) -> None:
        if t.deleting:
            return
        log.warning("shim disconnected", id=t.id, namespace=t.namespace)
        t.deleting = True
        asyncio.get_running_loop().create_task(self._cleanup_dead(t))

    async def _cleanup_dead(self, t: Task, exit_status: int | None = None) -> None:
        """The shim is gone: let its binary clean up, then report the task as exited."""
        from pyctr.api._pb.containerd.events import TaskDelete, TaskExit

        pid, status, exited_at = t.pid, 137 if exit_status is None else exit_status, time.time_ns()
        try:
            resp = await t.binary.delete(t.bundle)
            pid = resp.pid or pid
            if exit_status is None:
                status = resp.exit_status
            exited_at = pbutil.nanoseconds(resp.exited_at) or exited_at
        except Exception as exc:
            log.warning("cleaning up after dead shim failed", id=t.id, error=str(exc))
        if t.shim is not None:
            t.shim.close()
        self._close_log(t)
        self.tasks.pop((t.namespace, t.id), None)
        await asyncio.to_thread(t.bundle.delete)
        ts = pbutil.timestamp(exited_at)
        self.exchange.publish(
            t.namespace,
            "/tasks/exit",
            TaskExit(container_id=t.id, id=t.id, pid=pid, exit_status=status, exited_at=ts),
        )
        self.exchange.publish(
            t.namespace,
            "/tasks/delete",
            TaskDelete(container_id=t.id, pid=pid, exit_status=status, exited_at=ts, id=t.id),
        )

    async def restore(self) -> None:
        """Find every task the state directory knows about; called once at start-up."""
        bundles = await asyncio.to_thread(bundlemod.existing, self.state, self.root)
        await asyncio.gather(*(self._restore_one(b) for b in bundles))

    async def _restore_one(self, b: Bundle) -> None:
        from pyctr.api._pb.containerd.task import v2 as task
        from pyctr.api._pb.containerd.v1.types import Status
        from pyctr.daemon.runtime.shim import ShimBinary, ShimConnection

        try:
            binary_path = b.read("shim-binary-path")
        except OSError:
            binary_path = ""
        binary = ShimBinary(binary_path or "/bin/false", self.grpc_address, self.ttrpc_address, self.debug)
        t = Task(b.namespace, b.id, b, binary)
        self.tasks[(b.namespace, b.id)] = t
        try:
            address = b.read("address")
            self._open_log(t)
            t.shim = await ShimConnection.connect(address, b.namespace, on_close=lambda: self._on_close(t))
            state = await t.shim.call("State", task.StateRequest(id=b.id), task.StateResponse, timeout=10)
        except Exception as exc:
            log.info("cleaning up dead task", id=b.id, namespace=b.namespace, error=str(exc))
            t.deleting = True
            if not binary_path:
                # The daemon stopped before this shim was started: nothing ran, nothing to report.
                self.tasks.pop((b.namespace, b.id), None)
                self._close_log(t)
                await asyncio.to_thread(b.delete)
                return
            await self._cleanup_dead(t)
            return
        t.pid = state.pid
        log.info(
            "reconnected to task", id=b.id, namespace=b.namespace, pid=state.pid, status=state.status.name
        )
        if state.status == Status.STOPPED:
            # The event messages (~6 ms to import) load only when a task exited while we were away.
            from pyctr.api._pb.containerd.events import TaskExit

            # It exited while we were away; its shim may never have reached us with the event.
            self.exchange.publish(
                b.namespace,
                "/tasks/exit",
                TaskExit(
                    container_id=b.id,
                    id=b.id,
                    pid=state.pid,
                    exit_status=state.exit_status,
                    exited_at=state.exited_at,
                ),
            )

    async def close(self) -> None:
        """Disconnect from every shim, leaving them (and their containers) running."""
        for t in list(self.tasks.values()):
            t.deleting = True
            if t.shim is not None:
                t.shim.close()
            self._close_log(t)


def mounts_message(mounts: Sequence[Mount]) -> list[PbMount]:
    from pyctr.api._pb.containerd.types import Mount as PbMount

    return [PbMount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]
