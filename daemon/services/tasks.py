"""containerd.services.tasks.v1.Tasks: containers' processes, through their shims.

Every call resolves the container record first (so an unknown container is NotFound with
containerd's message), then its task, then forwards to the shim's task API. Task events come
from the shims themselves, over the ttrpc Events.Forward endpoint.
"""

from __future__ import annotations

import asyncio
import shutil
import time

from pyctr.api import filters, namespaces, pbutil
from pyctr.api._pb.containerd.services.tasks import v1 as pb
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.types import Metric
from pyctr.api._pb.containerd.v1.types import Process, ProcessInfo, Status
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import AlreadyExists, ContainerdError, FailedPrecondition, NotFound, NotImplementedErr
from pyctr.daemon import plugin
from pyctr.daemon.metadata import containers as cstore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.runtime.manager import Task, TaskManager
from pyctr.daemon.runtime.shim import ShimConnection


def _process(cid: str, exec_id: str, st: task.StateResponse) -> Process:
    return Process(
        container_id=cid,
        id=exec_id or cid,
        pid=st.pid,
        status=Status(int(st.status)),
        stdin=st.stdin,
        stdout=st.stdout,
        stderr=st.stderr,
        terminal=st.terminal,
        exit_status=st.exit_status,
        exited_at=st.exited_at,
    )


class TasksService(pb.TasksBase):
    def __init__(self, db: DB, runtime: TaskManager) -> None:
        self.db = db
        self.runtime = runtime

    async def _container(self, ns: str, cid: str) -> cstore.Container:
        return await self.db.view(lambda c: cstore.get(c, ns, cid))

    async def _task(self, cid: str) -> tuple[Task, ShimConnection]:
        ns = namespaces.required()
        await self._container(ns, cid)
        try:
            t = self.runtime.get(ns, cid)
        except NotFound:
            raise NotFound(f"task {cid} not found") from None
        assert t.shim is not None
        return t, t.shim

    async def create(self, message: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        ns = namespaces.required()
        container = await self._container(ns, message.container_id)
        if message.checkpoint is not None and message.checkpoint.digest:
            raise NotImplementedErr("restoring from a checkpoint is not supported")
        if (ns, message.container_id) in self.runtime.tasks:
            raise AlreadyExists(f"task {message.container_id}")
        spec = container.spec[1] if container.spec else b"{}"
        request = task.CreateTaskRequest(
            rootfs=list(message.rootfs),
            terminal=message.terminal,
            stdin=message.stdin,
            stdout=message.stdout,
            stderr=message.stderr,
            options=message.options,
        )
        runtime_options = None
        if container.runtime_options is not None:
            runtime_options = PbAny(type_url=container.runtime_options[0], value=container.runtime_options[1])
        t = await self.runtime.create(
            ns, message.container_id, spec, container.runtime_name, request, runtime_options
        )
        return pb.CreateTaskResponse(container_id=message.container_id, pid=t.pid)

    async def start(self, message: pb.StartRequest) -> pb.StartResponse:
        _, shim = await self._task(message.container_id)
        resp = await shim.call(
            "Start", task.StartRequest(id=message.container_id, exec_id=message.exec_id), task.StartResponse
        )
        return pb.StartResponse(pid=resp.pid)

    async def delete(self, message: pb.DeleteTaskRequest) -> pb.DeleteResponse:
        ns = namespaces.required()
        await self._task(message.container_id)
        resp = await self.runtime.delete(ns, message.container_id)
        return pb.DeleteResponse(
            id=message.container_id, pid=resp.pid, exit_status=resp.exit_status, exited_at=resp.exited_at
        )

    async def delete_process(self, message: pb.DeleteProcessRequest) -> pb.DeleteResponse:
        _, shim = await self._task(message.container_id)
        resp = await shim.call(
            "Delete",
            task.DeleteRequest(id=message.container_id, exec_id=message.exec_id),
            task.DeleteResponse,
        )
        return pb.DeleteResponse(
            id=message.exec_id, pid=resp.pid, exit_status=resp.exit_status, exited_at=resp.exited_at
        )

    async def get(self, message: pb.GetRequest) -> pb.GetResponse:
        _, shim = await self._task(message.container_id)
        try:
            st = await shim.call(
                "State",
                task.StateRequest(id=message.container_id, exec_id=message.exec_id),
                task.StateResponse,
            )
        except NotFound:
            raise NotFound(f"process {message.exec_id or message.container_id} not found") from None
        return pb.GetResponse(process=_process(message.container_id, message.exec_id, st))

    async def list(self, message: pb.ListTasksRequest) -> pb.ListTasksResponse:
        ns = namespaces.required()
        tasks = self.runtime.list(ns)

        async def state(t: Task) -> task.StateResponse:
            assert t.shim is not None
            return await t.shim.call("State", task.StateRequest(id=t.id), task.StateResponse, timeout=10)

        # Every shim at once: each answers in its own process, so the list costs one round trip.
        states = await asyncio.gather(*(state(t) for t in tasks), return_exceptions=True)
        out = []
        for t, st in zip(tasks, states, strict=True):
            if isinstance(st, BaseException):
                if not isinstance(st, Exception):
                    raise st  # cancellation of the call itself
                continue  # a task going away while we list it is simply not listed
            out.append(_process(t.id, "", st))
        return pb.ListTasksResponse(tasks=out)

    async def kill(self, message: pb.KillRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty(
            "Kill",
            task.KillRequest(
                id=message.container_id, exec_id=message.exec_id, signal=message.signal, all=message.all
            ),
        )
        return Empty()

    async def exec(self, message: pb.ExecProcessRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty(
            "Exec",
            task.ExecProcessRequest(
                id=message.container_id,
                exec_id=message.exec_id,
                terminal=message.terminal,
                stdin=message.stdin,
                stdout=message.stdout,
                stderr=message.stderr,
                spec=message.spec,
            ),
        )
        return Empty()

    async def resize_pty(self, message: pb.ResizePtyRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty(
            "ResizePty",
            task.ResizePtyRequest(
                id=message.container_id, exec_id=message.exec_id, width=message.width, height=message.height
            ),
        )
        return Empty()

    async def close_io(self, message: pb.CloseIoRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty(
            "CloseIO",
            task.CloseIoRequest(id=message.container_id, exec_id=message.exec_id, stdin=message.stdin),
        )
        return Empty()

    async def pause(self, message: pb.PauseTaskRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty("Pause", task.PauseRequest(id=message.container_id))
        return Empty()

    async def resume(self, message: pb.ResumeTaskRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty("Resume", task.ResumeRequest(id=message.container_id))
        return Empty()

    async def list_pids(self, message: pb.ListPidsRequest) -> pb.ListPidsResponse:
        _, shim = await self._task(message.container_id)
        resp = await shim.call("Pids", task.PidsRequest(id=message.container_id), task.PidsResponse)
        return pb.ListPidsResponse(processes=[ProcessInfo(pid=p.pid, info=p.info) for p in resp.processes])

    async def update(self, message: pb.UpdateTaskRequest) -> Empty:
        _, shim = await self._task(message.container_id)
        await shim.empty(
            "Update",
            task.UpdateTaskRequest(
                id=message.container_id, resources=message.resources, annotations=dict(message.annotations)
            ),
        )
        return Empty()

    async def metrics(self, message: pb.MetricsRequest) -> pb.MetricsResponse:
        ns = namespaces.required()
        flt = filters.parse_all(message.filters)
        tasks = [
            t
            for t in self.runtime.list(ns)
            if flt.match(filters.DictAdaptor({"id": t.id, "namespace": t.namespace}))
        ]

        async def stats(t: Task) -> Metric | None:
            assert t.shim is not None
            try:
                resp = await t.shim.call("Stats", task.StatsRequest(id=t.id), task.StatsResponse, timeout=10)
            except NotFound:
                return None  # deleted meanwhile
            return Metric(timestamp=pbutil.timestamp(time.time_ns()), id=t.id, data=resp.stats)

        found = await asyncio.gather(*(stats(t) for t in tasks))
        return pb.MetricsResponse(metrics=[m for m in found if m is not None])

    async def wait(self, message: pb.WaitRequest) -> pb.WaitResponse:
        _, shim = await self._task(message.container_id)
        resp = await shim.call(
            "Wait", task.WaitRequest(id=message.container_id, exec_id=message.exec_id), task.WaitResponse
        )
        return pb.WaitResponse(exit_status=resp.exit_status, exited_at=resp.exited_at)

    async def checkpoint(self, message: pb.CheckpointTaskRequest) -> pb.CheckpointTaskResponse:
        await self._task(message.container_id)
        raise await checkpoint_unavailable()


# What `criu check` said, once per daemon: the host's kernel and criu do not change under it.
_criu_check: str | None = None


async def checkpoint_unavailable() -> ContainerdError:
    """Why Checkpoint cannot be served here, in the words of the tool that decides it.

    Checkpoint and restore (``runc checkpoint`` / ``runc restore`` through the shim, the image in
    the content store) are not implemented. A client learns first what its host lacks: criu
    itself, or a criu that cannot run on this kernel (``criu check`` fails; criu 3.17 on a 6.x
    kernel stops at the vDSO, for one).
    """
    global _criu_check
    criu = shutil.which("criu")
    if criu is None:
        return NotImplementedErr("checkpoint needs criu, which is not installed")
    if _criu_check is None:
        proc = await asyncio.create_subprocess_exec(
            criu, "check", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
        _criu_check = (
            "" if proc.returncode == 0 else (lines[0] if lines else f"exit status {proc.returncode}")
        )
    if _criu_check:
        return FailedPrecondition(
            f"checkpoint needs criu, and `criu check` fails on this host: {_criu_check}"
        )
    return NotImplementedErr("checkpoint and restore are not implemented (criu is installed and works)")


def service(ic: plugin.InitContext) -> TasksService:
    return TasksService(ic.get(plugin.METADATA), ic.get(plugin.RUNTIME))
