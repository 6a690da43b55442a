"""``containerd.task.v2.Task``: decodes each request, calls the container/process code, publishes the
event, encodes the reply. Errors are raised as errdefs categories; the ttrpc server maps them to codes.

Exits: the reaper hands every exit to :meth:`TaskService.on_exit` on the loop thread. A claimed exit
marks the process STOPPED at once, then (in a task) kills leftovers of a container without its own
PID namespace, lets the output copies finish, queues ``/tasks/exit`` and finally releases Wait, so
a client sees all output before Wait answers and ``/tasks/exit`` always precedes ``/tasks/delete``.
While a Create or Start is in flight exit events are held back, so ``/tasks/create`` and
``/tasks/start`` (or ``exec-started``) precede the exit of the process (the Go shim's ``eventSendMu``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator

import betterproto2

from pyctr.api import ttrpc
from pyctr.api._pb.containerd import events as ev
from pyctr.api._pb.containerd.runc.v1 import CheckpointOptions, Options, ProcessDetails
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.v1.types import ProcessInfo, Status
from pyctr.api._pb.google.protobuf import Any as AnyMessage
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, NotFound, NotImplementedErr, Unknown
from pyctr.shim import mount
from pyctr.shim.bundle import RuncOptions, find_binary, runc_root, write_bundle_files
from pyctr.shim.cgroups import OomWatcher
from pyctr.shim.container import Container, mount_rootfs
from pyctr.shim.events import Publisher, type_url
from pyctr.shim.io import Stdio
from pyctr.shim.process.exec import ExecProcess
from pyctr.shim.process.init import InitConfig, InitProcess, unmount_rootfs
from pyctr.shim.process.state import Lifecycle
from pyctr.shim.reaper import Exit, Reaper, Subscription
from pyctr.shim.runc import Runc, RuncError

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
_OPTIONS_URL = "containerd.runc.v1.Options"
_STATUS = {
    "created": Status.CREATED,
    "running": Status.RUNNING,
    "stopped": Status.STOPPED,
    "paused": Status.PAUSED,
    "pausing": Status.PAUSING,
}
Handler = Callable[[bytes, ttrpc.Context], Awaitable[bytes]]


def _time(ts: float | None) -> datetime.datetime | None:
    # Unset stays unset on the wire: containerd reads an absent exited_at as "not exited".
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC)


def _any(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage(type_url=type_url(message), value=bytes(message))


def parse_runc_options(options: AnyMessage | None) -> RuncOptions:
    if options is None or not options.type_url:
        return RuncOptions()
    url = options.type_url.removeprefix("type.googleapis.com/")
    if url != _OPTIONS_URL:
        raise InvalidArgument(f"unsupported runtime options type {url}")
    o = Options.parse(options.value)
    return RuncOptions(
        no_pivot_root=o.no_pivot_root,
        no_new_keyring=o.no_new_keyring,
        shim_cgroup=o.shim_cgroup,
        io_uid=o.io_uid,
        io_gid=o.io_gid,
        binary_name=o.binary_name,
        root=o.root,
        criu_path=o.criu_path,
        systemd_cgroup=o.systemd_cgroup,
        criu_image_path=o.criu_image_path,
        criu_work_path=o.criu_work_path,
    )


def _container_id(proc: Lifecycle) -> str:
    return proc.parent.id if isinstance(proc, ExecProcess) else proc.id


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        address: str,
        reaper: Reaper,
        publisher: Publisher,
        shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.address = address
        self._reaper = reaper
        reaper.on_exit = self.on_exit
        self._publisher = publisher
        self._shutdown = shutdown
        self.containers: dict[str, Container] = {}
        self._by_pid: dict[int, Lifecycle] = {}
        self._create_lock = asyncio.Lock()
        self._starts = 0
        self._no_starts = asyncio.Event()
        self._no_starts.set()
        self._exit_tasks: dict[Lifecycle, asyncio.Task[None]] = {}
        self._oom = OomWatcher(self._on_oom)

    def methods(self) -> dict[str, Handler]:
        return {
            "State": self.state,
            "Create": self.create,
            "Start": self.start,
            "Delete": self.delete,
            "Pids": self.pids,
            "Pause": self.pause,
            "Resume": self.resume,
            "Checkpoint": self.checkpoint,
            "Kill": self.kill,
            "Exec": self.exec,
            "ResizePty": self.resize_pty,
            "CloseIO": self.close_io,
            "Update": self.update,
            "Wait": self.wait,
            "Stats": self.stats,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
        }

    def close(self) -> None:
        self._oom.close()

    # -- exits (process.state.Monitor) ------------------------------------------------------------

    def subscribe(self) -> Subscription:
        return self._reaper.subscribe()

    def register(self, pid: int, process: Lifecycle, subscription: Subscription | None) -> None:
        """Owns ``pid`` from now on; delivers its exit if it came while runc was still running."""
        exits = subscription.close() if subscription is not None else []
        self._by_pid[pid] = process
        for exit in exits:
            if exit.pid == pid:
                self.on_exit(exit)
                break

    def on_exit(self, exit: Exit) -> bool:
        proc = self._by_pid.pop(exit.pid, None)
        if proc is None:
            return False
        if proc.mark_exited(exit.status, exit.timestamp):
            log.debug(
                "process %s of %s (pid %d) exited with %d",
                proc.id,
                _container_id(proc),
                exit.pid,
                exit.status,
            )
            task = asyncio.get_running_loop().create_task(self._finish_exit(proc, exit))
            self._exit_tasks[proc] = task
            task.add_done_callback(lambda _: self._exit_tasks.pop(proc, None))
        return True

    async def _finish_exit(self, proc: Lifecycle, exit: Exit) -> None:
        try:
            container = self.containers.get(_container_id(proc))
            if isinstance(proc, InitProcess) and container is not None and container.kill_all_on_exit:
                await proc.kill_all()
            if isinstance(proc, InitProcess | ExecProcess):
                await proc.finish_io()
            await self._no_starts.wait()
            self._publish(
                "/tasks/exit",
                ev.TaskExit(
                    container_id=_container_id(proc),
                    id=proc.id,
                    pid=exit.pid,
                    exit_status=exit.status,
                    exited_at=_time(exit.timestamp),
                ),
            )
        finally:
            proc.release()  # Wait must answer whatever went wrong above

    @contextlib.contextmanager
    def _holding_exits(self) -> Iterator[None]:
        """While Create or Start runs, exit events wait: /tasks/create and /tasks/start come first."""
        self._starts += 1
        self._no_starts.clear()
        try:
            yield
        finally:
            self._starts -= 1
            if self._starts == 0:
                self._no_starts.set()

    def _publish(self, topic: str, event: betterproto2.Message) -> None:
        self._publisher.publish(topic, event)

    def _on_oom(self, container_id: str) -> None:
        self._publish("/tasks/oom", ev.TaskOom(container_id=container_id))

    def _container(self, id: str) -> Container:
        container = self.containers.get(id)
        if container is None:
            raise NotFound("container not created")
        return container

    # -- RPCs --------------------------------------------------------------------------------------

    async def create(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.CreateTaskRequest.parse(payload)
        if req.checkpoint:
            raise NotImplementedErr("restoring a task from a checkpoint is not supported")
        async with self._create_lock:
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id}")
            with self._holding_exits():
                container = await self._new_container(req)
                log.debug("created %s (pid %d) in %s", req.id, container.init.pid, req.bundle)
                self.containers[req.id] = container
                io = ev.TaskIo(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
                self._publish(
                    "/tasks/create",
                    ev.TaskCreate(
                        container_id=req.id,
                        bundle=req.bundle,
                        rootfs=req.rootfs,
                        io=io,
                        checkpoint=req.checkpoint,
                        pid=container.init.pid,
                    ),
                )
        return bytes(task.CreateTaskResponse(pid=container.init.pid))

    async def _new_container(self, req: task.CreateTaskRequest) -> Container:
        """Writes options.json/runtime, mounts the rootfs, runs ``runc create``; undoes it all on failure."""
        options = parse_runc_options(req.options)
        write_bundle_files(req.bundle, options)
        mounts = [mount.Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        rootfs = await mount_rootfs(req.bundle, mounts)
        runc = Runc(
            self._reaper,
            command=options.binary_name or "runc",
            root=runc_root(options.root, self.address, self.namespace),
            log=os.path.join(req.bundle, "log.json"),
            systemd_cgroup=options.systemd_cgroup,
            criu=options.criu_path,
        )
        config = InitConfig(
            id=req.id,
            bundle=req.bundle,
            stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
            rootfs=rootfs,
            io_uid=options.io_uid,
            io_gid=options.io_gid,
            no_pivot_root=options.no_pivot_root,
            no_new_keyring=options.no_new_keyring,
        )
        init = InitProcess(config, runc, self)
        try:
            await init.create()
        except BaseException:
            await self._undo_create(runc, req.id, rootfs)
            raise
        container = Container(req.id, req.bundle, init)
        container.load_cgroup()
        return container

    async def _undo_create(self, runc: Runc, id: str, rootfs: str) -> None:
        with contextlib.suppress(RuncError):
            await runc.delete(id, force=True)
        if rootfs:
            try:
                await unmount_rootfs(rootfs)
            except OSError as exc:
                log.warning("failed to cleanup rootfs mount %s: %s", rootfs, exc)

    async def start(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.StartRequest.parse(payload)
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        with self._holding_exits():
            await proc.start()
            if req.exec_id:
                self._publish(
                    "/tasks/exec-started",
                    ev.TaskExecStarted(container_id=container.id, exec_id=req.exec_id, pid=proc.pid),
                )
            else:
                container.load_cgroup()
                if container.cgroup is not None:
                    self._oom.add(container.id, container.cgroup)
                self._publish("/tasks/start", ev.TaskStart(container_id=container.id, pid=proc.pid))
        return bytes(task.StartResponse(pid=proc.pid))

    async def delete(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.DeleteRequest.parse(payload)
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        await proc.delete()
        await self._settle_exit(proc)
        if req.exec_id:
            container.execs.pop(req.exec_id, None)
            self._forget([proc])
        else:
            self.containers.pop(req.id, None)
            self._oom.remove(req.id)
            self._forget(container.all())
            for other in container.execs.values():
                other.release()  # nothing will report their exits any more: Wait must not hang
            self._publish(
                "/tasks/delete",
                ev.TaskDelete(
                    container_id=container.id,
                    pid=proc.pid,
                    exit_status=proc.exit_status,
                    exited_at=_time(proc.exited_at),
                    id=container.id,
                ),
            )
        return bytes(
            task.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status, exited_at=_time(proc.exited_at))
        )

    async def _settle_exit(self, proc: Lifecycle) -> None:
        """After a delete: /tasks/exit of an exit already claimed goes out before /tasks/delete, and
        Wait callers of a process that never ran are released."""
        pending = self._exit_tasks.get(proc)
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending), 5)
        proc.release()

    def _forget(self, procs: list[Lifecycle]) -> None:
        """A deleted process's late exit is nobody's business any more (no /tasks/exit after delete)."""
        for pid, owner in list(self._by_pid.items()):
            if any(owner is p for p in procs):
                del self._by_pid[pid]

    async def exec(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.ExecProcessRequest.parse(payload)
        container = self._container(req.id)
        if not container.reserve(req.exec_id):
            raise AlreadyExists(f"id {req.exec_id}")
        try:
            container.init.check_exec()
            try:
                spec = json.loads(req.spec.value) if req.spec is not None else {}
            except ValueError as exc:
                raise InvalidArgument(f"exec process spec: {exc}") from None
            stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
            proc = ExecProcess(req.exec_id, container.init, spec, stdio, self)
        except BaseException:
            container.unreserve(req.exec_id)
            raise
        container.add_exec(proc)
        self._publish("/tasks/exec-added", ev.TaskExecAdded(container_id=container.id, exec_id=req.exec_id))
        return b""

    async def state(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.StateRequest.parse(payload)
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        stdio = proc.stdio
        return bytes(
            task.StateResponse(
                id=proc.id,
                bundle=container.bundle,
                pid=proc.pid,
                status=_STATUS.get(proc.status(), Status.UNKNOWN),
                stdin=stdio.stdin,
                stdout=stdio.stdout,
                stderr=stdio.stderr,
                terminal=stdio.terminal,
                exit_status=proc.exit_status,
                exited_at=_time(proc.exited_at),
                exec_id=req.exec_id,
            )
        )

    async def pids(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.PidsRequest.parse(payload)
        container = self._container(req.id)
        try:
            pids = await container.init.runc.ps(container.id)
        except RuncError as err:
            raise Unknown(f"failed to list pids: {err.text}") from None
        by_pid = {p.pid: p.id for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = None
            if pid in by_pid:
                info = _any(ProcessDetails(exec_id=by_pid[pid]))
            processes.append(ProcessInfo(pid=pid, info=info))
        return bytes(task.PidsResponse(processes=processes))

    async def pause(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.PauseRequest.parse(payload)
        container = self._container(req.id)
        await container.init.pause()
        self._publish("/tasks/paused", ev.TaskPaused(container_id=container.id))
        return b""

    async def resume(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.ResumeRequest.parse(payload)
        container = self._container(req.id)
        await container.init.resume()
        self._publish("/tasks/resumed", ev.TaskResumed(container_id=container.id))
        return b""

    async def checkpoint(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.CheckpointTaskRequest.parse(payload)
        container = self._container(req.id)
        if shutil.which("criu", path=f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin") is None:
            raise NotImplementedErr("checkpoint needs criu, which is not installed")
        opts = CheckpointOptions()
        if req.options is not None and req.options.type_url:
            opts = CheckpointOptions.parse(req.options.value)
        # The image goes to req.path; CheckpointOptions.image_path is for the daemon, not the shim.
        await container.init.checkpoint(
            req.path,
            work_path=opts.work_path,
            exit=opts.exit,
            tcp=opts.open_tcp,
            unix_sockets=opts.external_unix_sockets,
            terminal=opts.terminal,
            file_locks=opts.file_locks,
            empty_namespaces=tuple(opts.empty_namespaces),
        )
        return b""

    async def kill(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.KillRequest.parse(payload)
        container = self._container(req.id)
        await container.process(req.exec_id).kill(req.signal, req.all)
        return b""

    async def resize_pty(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.ResizePtyRequest.parse(payload)
        container = self._container(req.id)
        container.process(req.exec_id).resize(req.width, req.height)
        return b""

    async def close_io(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.CloseIoRequest.parse(payload)
        container = self._container(req.id)
        if req.stdin:
            container.process(req.exec_id).close_io()
        return b""

    async def update(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.UpdateTaskRequest.parse(payload)
        container = self._container(req.id)
        if req.resources is None:
            raise InvalidArgument("update: no resources")
        await container.init.update(req.resources.value)
        return b""

    async def wait(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.WaitRequest.parse(payload)
        container = self._container(req.id)
        proc = container.process(req.exec_id)
        await proc.wait()
        return bytes(task.WaitResponse(exit_status=proc.exit_status, exited_at=_time(proc.exited_at)))

    async def stats(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.StatsRequest.parse(payload)
        container = self._container(req.id)
        if container.cgroup is None:
            raise NotFound("cgroup does not exist")
        url, data = container.cgroup.metrics()
        return bytes(task.StatsResponse(stats=AnyMessage(type_url=url, value=data)))

    async def connect(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        req = task.ConnectRequest.parse(payload)
        container = self.containers.get(req.id)
        return bytes(
            task.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0)
        )

    async def shutdown(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        # `now` is ignored, as in the runc shim: a shim with containers keeps serving them.
        if not self.containers:
            self._shutdown()
        return b""


__all__ = ["TASK_SERVICE", "TaskService", "find_binary"]
