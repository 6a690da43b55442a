"""containerd.services.tasks.v1.Tasks: containers' processes, through their shims.

Every call resolves the container record first (so an unknown container is NotFound with
containerd's message), then its task, then forwards to the shim's task API. Task events come
from the shims themselves, over the ttrpc Events.Forward endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time

from pyctr.api import binaries, filters, namespaces, pbutil
from pyctr.api._pb.containerd.services.tasks import v1 as pb
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.types import Metric
from pyctr.api._pb.containerd.v1.types import Process, ProcessInfo, Status
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, NotImplementedErr
from pyctr.daemon import plugin
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.metadata import containers as cstore
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.runtime import checkpoint
from pyctr.daemon.runtime.bundle import Bundle
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
    def __init__(self, db: DB, runtime: TaskManager, content: ContentStore) -> None:
        self.db = db
        self.runtime = runtime
        self.content = content

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
        prepare = None
        restore = checkpoint.restore_path(container.runtime_name, message.options)
        if restore:
            request.checkpoint = restore
        elif message.checkpoint is not None and (message.checkpoint.digest or message.checkpoint.media_type):
            wanted = message.checkpoint
            if wanted.media_type != checkpoint.MEDIA_TYPE_CHECKPOINT:
                raise InvalidArgument(f"unsupported checkpoint type {wanted.media_type!r}")
            await self.content.info(ns, wanted.digest)  # NotFound before a shim starts

            async def prepare(bundle: Bundle) -> None:
                # criu's images live in the task's work directory, and go with its bundle.
                request.checkpoint = os.path.join(bundle.work, "checkpoint")
                await checkpoint.unpack(self.content, ns, wanted, request.checkpoint)

        runtime_options = None
        if container.runtime_options is not None:
            runtime_options = PbAny(type_url=container.runtime_options[0], value=container.runtime_options[1])
        t = await self.runtime.create(
            ns, message.container_id, spec, container.runtime_name, request, runtime_options, prepare
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
        """``runc checkpoint`` through the shim. By default criu's images become two blobs in the
        content store under the caller's lease (see checkpoint.py), which the client wraps in an
        image; with the runc options' ``image_path`` they stay in that directory and nothing is
        returned, as with containerd."""
        ns = namespaces.required()
        container = await self._container(ns, message.container_id)
        t, shim = await self._task(message.container_id)
        target = checkpoint.image_path(container.runtime_name, message.options)
        await require_criu(container)
        request = task.CheckpointTaskRequest(id=message.container_id, options=message.options)
        if target:
            request.path = target
            await shim.empty("Checkpoint", request)
            return pb.CheckpointTaskResponse()
        lease = namespaces.lease.get()
        images = await asyncio.to_thread(tempfile.mkdtemp, prefix="checkpoint-", dir=t.bundle.work)
        try:
            request.path = images
            await shim.empty("Checkpoint", request)
            spec = PbAny(type_url=container.spec[0], value=container.spec[1]) if container.spec else PbAny()
            return pb.CheckpointTaskResponse(
                descriptors=[
                    await checkpoint.store_image(self.content, ns, lease, images),
                    await checkpoint.store_spec(self.content, ns, lease, spec),
                ]
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, images, True)


# What `criu check` said, per criu binary: the host's kernel and criu do not change under a daemon.
_criu_checks: dict[str, str] = {}


async def require_criu(container: cstore.Container) -> None:
    """Refuses a checkpoint a runc shim cannot take on this host, in the words of the tool that
    decides it: no criu (Unimplemented), or a criu that cannot run on this kernel (``criu check``
    fails: criu 3.17 on a 6.x kernel stops at the vDSO, for one; FailedPrecondition). Checked
    before anything is dumped, once per criu binary; other runtimes answer for themselves."""
    if not checkpoint.is_runc(container.runtime_name):
        return
    configured = ""
    if container.runtime_options is not None:
        from pyctr.api._pb.containerd.runc.v1 import Options

        with contextlib.suppress(Exception):
            configured = Options.parse(container.runtime_options[1]).criu_path
    criu = binaries.criu(configured)
    if criu is None:
        raise NotImplementedErr("checkpoint needs criu, which is not installed")
    if criu not in _criu_checks:
        proc = await asyncio.create_subprocess_exec(
            criu, "check", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
        _criu_checks[criu] = (
            "" if proc.returncode == 0 else (lines[0] if lines else f"exit status {proc.returncode}")
        )
    if _criu_checks[criu]:
        raise FailedPrecondition(
            f"checkpoint needs criu, and `criu check` fails on this host: {_criu_checks[criu]}"
        )


def service(ic: plugin.InitContext) -> TasksService:
    return TasksService(ic.get(plugin.METADATA), ic.get(plugin.RUNTIME), ic.get(plugin.CONTENT))
