"""A worker: a short-lived child of the keeper that serves one heavy Task call and exits.

The heavy calls: Create, Exec, an exec's Start (and an init's created from a checkpoint: runc
restore), Update, Pids, Stats and Checkpoint (the rest are the keeper's own, see keeper.py and
direct.py).

It is forked from the keeper, so it starts with the keeper's process table (read-only here: changes
go back as ``updates``) and may use everything the shim has (asyncio, betterproto, the runc driver,
mounts, cgroups): its dirty pages die with it. It is not a subreaper, so the container processes that
runc forks are re-parented to the keeper, which reaps them; the worker reaps only its own runc
children (its own Reaper thread). The result goes back as one message (see keeper.py), with the fds
the keeper owns from now on (stdio pipe ends and FIFOs, the pty master, OOM notification fds).

Updates (applied by the keeper, in order; direct.py reports its changes the same way)::

    ("container", {id, bundle, stdin, stdout, stderr, terminal, pid, kill_all, config}, io | None)
    ("exec", container_id, {id, stdin, stdout, stderr, terminal, spec})
    ("started", container_id, exec_id, pid, io | None)   an exec, or an init restored from a checkpoint
    ("config", container_id, {key: value})               merged into the container's config
    ("state", container_id, exec_id, before, after)     entered only if still in ``before``
    ("failed", container_id, exec_id, status, time)     an exec that never ran
    ("oom", container_id, {v2, path, last}, [fd indexes])
    ("deleted", container_id, exec_id)

``io`` is :meth:`pyctr.shim.io.ProcessIO.hand_over`'s description, its numbers index the fds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import marshal
import os
import shutil
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, NoReturn

import betterproto2

from pyctr.api import binaries, mount
from pyctr.api._pb.containerd import events as ev
from pyctr.api._pb.containerd.runc.v1 import CheckpointOptions, ProcessDetails
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.types import Mount
from pyctr.api._pb.containerd.v1.types import ProcessInfo
from pyctr.api._pb.google.protobuf import Any as AnyMessage
from pyctr.api.errdefs import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    NotImplementedErr,
    Unknown,
    to_status,
)
from pyctr.shim import cgroups
from pyctr.shim.bundle import (
    INIT_PID_FILE,
    kill_all_on_exit,
    parse_runc_options,
    read_pid_file,
    runc_root,
    write_bundle_files,
)
from pyctr.shim.container import mount_rootfs
from pyctr.shim.events import type_url
from pyctr.shim.io import ConsoleSocket, ProcessIO, Stdio
from pyctr.shim.process.init import runtime_error, unmount_rootfs
from pyctr.shim.process.state import Op
from pyctr.shim.reaper import Reaper
from pyctr.shim.runc import Runc, RuncError
from pyctr.shim.table import START_FAILED_STATUS, Container, Proc

if TYPE_CHECKING:
    from pyctr.shim.keeper import Job, Keeper


def _any(message: betterproto2.Message) -> AnyMessage:
    return AnyMessage(type_url=type_url(message), value=bytes(message))


_SAMPLE_CREATE = bytes(
    task.CreateTaskRequest(
        id="spare",
        bundle="/",
        rootfs=[Mount(type="overlay", source="overlay", options=["lowerdir=/"])],
        stdout="/dev/null",
        options=AnyMessage(type_url="containerd.runc.v1.Options", value=b""),
    )
)


def run(keeper: Keeper, job: Job | None, sock: socket.socket) -> NoReturn:
    """The worker's whole life; never returns. Without a ``job`` it is the keeper's spare: it gets
    ready, then waits for its job on ``sock`` (``marshal`` of ``(method, payload)``; EOF: not needed)."""
    code = 0
    fds: list[int] = []
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keeper.fds_for_worker():
            with contextlib.suppress(OSError):
                os.close(fd)
        # The standard selector loop, not uvloop: a new uvloop loop in a freshly forked child costs
        # ~7 ms (libuv set-up), the selector loop ~1 ms, and a worker lives for one call. The Reaper
        # owns waitpid either way (no asyncio subprocesses here).
        loop = asyncio.SelectorEventLoop()
        asyncio.set_event_loop(loop)
        reaper = Reaper(loop)
        reaper.start()
        worker = Worker(keeper, reaper)
        if job is None:
            # While waiting anyway: fault in what decoding a Create touches (~1.5 ms of it otherwise).
            task.CreateTaskRequest.parse(_SAMPLE_CREATE)
            message = sock.recv(1 << 20)
            if not message:
                os._exit(0)
            method, payload = marshal.loads(message)
        else:
            method, payload = job.method, job.payload
        result = loop.run_until_complete(worker.call(method, payload))
        fds = worker.fds
    except BaseException as exc:
        result = {"error": to_status(exc)}
    try:
        socket.send_fds(sock, [marshal.dumps(result)], fds)
    except Exception:
        code = 1
    os._exit(code)


def require_criu(config: dict[str, Any]) -> None:
    """runc checkpoints and restores with criu: the runtime options' ``criu_path``, else criu on PATH
    or in the sbin directories."""
    if binaries.criu(config.get("criu") or "") is None:
        raise NotImplementedErr("checkpoint needs criu, which is not installed")


class Worker:
    def __init__(self, keeper: Keeper, reaper: Reaper) -> None:
        self.keeper = keeper
        self.containers = keeper.table.containers
        self.reaper = reaper
        self.events: list[tuple[str, str, bytes]] = []
        self.updates: list[tuple[Any, ...]] = []
        self.fds: list[int] = []

    async def call(self, method: str, payload: bytes) -> dict[str, Any]:
        try:
            handler = getattr(self, method.lower())
            reply = await handler(payload)
            result: dict[str, Any] = {"reply": reply or b""}
        except Exception as exc:
            result = {"error": to_status(exc)}
            self.fds = []  # a failed call hands nothing over (the worker closes it all on exit)
            self.updates = [u for u in self.updates if u[0] == "failed"]
        result["events"] = self.events
        result["updates"] = self.updates
        return result

    def publish(self, topic: str, event: betterproto2.Message) -> None:
        self.events.append((topic, type_url(event), bytes(event)))

    def add_fds(self, fds: list[int]) -> int:
        """Appends ``fds`` to the handed-over list; returns the offset of the first."""
        base = len(self.fds)
        self.fds.extend(fds)
        return base

    def container(self, id: str) -> Container:
        container = self.containers.get(id)
        if container is None:
            raise NotFound("container not created")
        return container

    def process(self, container: Container, exec_id: str) -> Proc:
        proc = container.process(exec_id)
        if proc is None:
            raise NotFound(f"process does not exist {exec_id}")
        return proc

    def runc(self, container: Container) -> Runc:
        cfg = container.config
        return Runc(
            self.reaper,
            command=cfg["command"],
            root=cfg["root"],
            log=cfg["log"],
            systemd_cgroup=cfg["systemd_cgroup"],
            criu=cfg["criu"],
        )

    def io_description(self, desc: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        base = self.add_fds(fds)

        def shift(i: int) -> int:
            return i + base if i >= 0 else -1

        return {
            "out": [(shift(s), shift(k), shift(r)) for s, k, r in desc["out"]],
            "in": (shift(desc["in"][0]), shift(desc["in"][1])) if desc.get("in") else None,
            "console": shift(desc["console"]),
            "holder": shift(desc["holder"]),
        }

    async def launch(
        self, io: ProcessIO, console: ConsoleSocket | None, pid_file: str, run: Any
    ) -> tuple[int, dict[str, Any]]:
        """Runs ``run`` (runc create/exec), hands the stdio over and reads the new pid."""
        try:
            try:
                await run()
            finally:
                io.close_runc_ends()
            master = await console.receive_master() if console else -1
            desc, fds = io.hand_over(master)
            pid = read_pid_file(pid_file)
        except BaseException:
            io.close()
            raise
        finally:
            if console is not None:
                console.close()
        return pid, self.io_description(desc, fds)

    # -- calls ---------------------------------------------------------------------------------------

    async def create(self, payload: bytes) -> bytes:
        req = task.CreateTaskRequest.parse(payload)
        if req.id in self.containers:
            raise AlreadyExists(f"container {req.id}")
        if req.checkpoint and not os.path.isdir(req.checkpoint):
            raise InvalidArgument(f"checkpoint {req.checkpoint} is not a directory")
        options = parse_runc_options(req.options)
        if req.checkpoint:
            require_criu({"criu": options.criu_path})
        write_bundle_files(req.bundle, options)
        mounts = [mount.Mount(m.type, m.source, options=tuple(m.options)) for m in req.rootfs]
        rootfs = await mount_rootfs(req.bundle, mounts)
        config = {
            "command": options.binary_name or "runc",
            "root": runc_root(options.root, self.keeper.address, self.keeper.namespace),
            "log": os.path.join(req.bundle, "log.json"),
            "systemd_cgroup": options.systemd_cgroup,
            "criu": options.criu_path,
            "io_uid": options.io_uid,
            "io_gid": options.io_gid,
            "rootfs": rootfs,
            "cgroup": None,
        }
        if req.checkpoint:
            # As the Go shim: nothing runs until Start, which is `runc restore` (see restore()).
            config["command"] = binaries.find_binary(config["command"])
            config["restore"] = {
                "image": req.checkpoint,
                "parent": req.parent_checkpoint,
                "work": options.criu_work_path,
                "no_pivot": options.no_pivot_root,
            }
            self.created(req, 0, config, None)
            return bytes(task.CreateTaskResponse(pid=0))
        runc = Runc(
            self.reaper,
            command=config["command"],
            root=config["root"],
            log=config["log"],
            systemd_cgroup=options.systemd_cgroup,
            criu=options.criu_path,
        )
        try:
            io = ProcessIO(
                Stdio(req.stdin, req.stdout, req.stderr, req.terminal), uid=options.io_uid, gid=options.io_gid
            )
            console = ConsoleSocket() if req.terminal else None

            async def run() -> None:
                try:
                    await runc.create(
                        req.id,
                        req.bundle,
                        pid_file=os.path.join(req.bundle, INIT_PID_FILE),
                        stdio=io.runc_stdio(),
                        console_socket=console.path if console else "",
                        no_pivot=options.no_pivot_root,
                        no_new_keyring=options.no_new_keyring,
                    )
                except RuncError as err:
                    raise runtime_error(err, "OCI runtime create failed") from None

            pid, desc = await self.launch(io, console, os.path.join(req.bundle, INIT_PID_FILE), run)
        except BaseException:
            with contextlib.suppress(RuncError):
                await runc.delete(req.id, force=True)
            if rootfs:
                try:
                    await unmount_rootfs(rootfs)
                except OSError as exc:
                    import logging

                    logging.getLogger(__name__).warning("failed to cleanup rootfs mount %s: %s", rootfs, exc)
            raise
        # The cgroup exists from runc create on: it is found, and its OOM fds opened, here rather
        # than at Start, so the keeper's Start (direct.py) runs nothing but runc.
        config["cgroup"] = cgroups.describe(pid)
        config["command"] = runc.command  # resolved on PATH once, here
        self.created(req, pid, config, desc)
        return bytes(task.CreateTaskResponse(pid=pid))

    def created(
        self, req: task.CreateTaskRequest, pid: int, config: dict[str, Any], desc: dict[str, Any] | None
    ) -> None:
        """The new container for the keeper's table, its OOM watch, and /tasks/create."""
        record = {
            "id": req.id,
            "bundle": req.bundle,
            "stdin": req.stdin,
            "stdout": req.stdout,
            "stderr": req.stderr,
            "terminal": req.terminal,
            "pid": pid,
            "kill_all": kill_all_on_exit(req.bundle),
            "config": config,
        }
        self.updates.append(("container", record, desc))
        self.watch_oom(req.id, config["cgroup"])
        io_event = ev.TaskIo(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        self.publish(
            "/tasks/create",
            ev.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=req.rootfs,
                io=io_event,
                checkpoint=req.checkpoint,
                pid=pid,
            ),
        )

    def watch_oom(self, container_id: str, cgroup: dict[str, Any] | None) -> None:
        opened = cgroups.oom_watch(cgroup) if cgroup is not None else None
        if opened is not None:
            oom, fds = opened
            base = self.add_fds(fds)
            self.updates.append(("oom", container_id, oom, [base + i for i in range(len(fds))]))

    async def start(self, payload: bytes) -> bytes:
        """An exec's Start, or an init's created from a checkpoint (other inits': direct.py)."""
        req = task.StartRequest.parse(payload)
        container = self.container(req.id)
        proc = self.process(container, req.exec_id)
        proc.check(Op.START)
        if proc.init:
            pid = await self.restore(container)
            self.publish("/tasks/start", ev.TaskStart(container_id=container.id, pid=pid))
            return bytes(task.StartResponse(pid=pid))
        pid = await self.start_exec(container, proc)
        self.publish(
            "/tasks/exec-started",
            ev.TaskExecStarted(container_id=container.id, exec_id=req.exec_id, pid=pid),
        )
        return bytes(task.StartResponse(pid=pid))

    def process_io(self, container: Container, proc: Proc) -> tuple[ProcessIO, ConsoleSocket | None]:
        """The stdio (and console socket) runc gets for ``proc``, from its record."""
        cfg = container.config
        io = ProcessIO(
            Stdio(proc.stdin, proc.stdout, proc.stderr, proc.terminal), uid=cfg["io_uid"], gid=cfg["io_gid"]
        )
        if proc.stdin_closed:
            io.close_stdin()
        return io, ConsoleSocket() if proc.terminal else None

    async def start_exec(self, container: Container, proc: Proc) -> int:
        io, console = self.process_io(container, proc)
        pid_file = os.path.join(container.bundle, f"{proc.id}.pid")
        spec = dict(json.loads(proc.spec or "{}"), terminal=proc.terminal)
        runc = self.runc(container)

        async def run() -> None:
            try:
                await runc.exec(
                    container.id,
                    spec,
                    pid_file=pid_file,
                    stdio=io.runc_stdio(),
                    console_socket=console.path if console else "",
                )
            except RuncError as err:
                # Never ran: Wait must still answer.
                self.updates.append(("failed", container.id, proc.id, START_FAILED_STATUS, time.time()))
                raise runtime_error(err, "OCI runtime exec failed") from None

        pid, desc = await self.launch(io, console, pid_file, run)
        self.updates.append(("started", container.id, proc.id, pid, desc))
        return pid

    async def restore(self, container: Container) -> int:
        """``runc restore`` of the init created from a checkpoint: its stdio and console are set up
        here, as runc create's are at Create; the criu log is kept in the bundle if it fails."""
        checkpoint = container.config["restore"]
        io, console = self.process_io(container, container.init)
        pid_file = os.path.join(container.bundle, INIT_PID_FILE)
        own_work = not checkpoint["work"]
        work = checkpoint["work"] or os.path.join(container.bundle, "work", "criu-restore")
        runc = self.runc(container)

        async def run() -> None:
            try:
                await runc.restore(
                    container.id,
                    container.bundle,
                    image_path=checkpoint["image"],
                    work_path=work,
                    parent_path=checkpoint["parent"],
                    pid_file=pid_file,
                    stdio=io.runc_stdio(),
                    console_socket=console.path if console else "",
                    no_pivot=checkpoint["no_pivot"],
                )
            except RuncError as err:
                restore_log = os.path.join(container.bundle, "criu-restore.log")
                with contextlib.suppress(OSError):
                    shutil.copyfile(os.path.join(work, "restore.log"), restore_log)
                with contextlib.suppress(RuncError):
                    await runc.delete(container.id, force=True)
                raise Unknown(f"OCI runtime restore failed: {err.text} (criu log: {restore_log})") from None

        try:
            pid, desc = await self.launch(io, console, pid_file, run)
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)
        cgroup = cgroups.describe(pid)
        self.updates.append(("started", container.id, "", pid, desc))
        self.updates.append(("config", container.id, {"cgroup": cgroup, "restore": None}))
        self.watch_oom(container.id, cgroup)
        return pid

    async def exec(self, payload: bytes) -> bytes:
        req = task.ExecProcessRequest.parse(payload)
        container = self.container(req.id)
        if req.exec_id in container.execs:
            raise AlreadyExists(f"id {req.exec_id}")
        if container.config.get("restore"):
            raise Unknown("cannot exec in a created state")
        container.init.check(Op.EXEC)
        try:
            spec = json.loads(req.spec.value) if req.spec is not None else {}
        except ValueError as exc:
            raise InvalidArgument(f"exec process spec: {exc}") from None
        record = {
            "id": req.exec_id,
            "stdin": req.stdin,
            "stdout": req.stdout,
            "stderr": req.stderr,
            "terminal": req.terminal,
            "spec": json.dumps(spec),
        }
        self.updates.append(("exec", container.id, record))
        self.publish("/tasks/exec-added", ev.TaskExecAdded(container_id=container.id, exec_id=req.exec_id))
        return b""

    async def update(self, payload: bytes) -> bytes:
        req = task.UpdateTaskRequest.parse(payload)
        container = self.container(req.id)
        if req.resources is None:
            raise InvalidArgument("update: no resources")
        container.init.check(Op.UPDATE)
        try:
            await self.runc(container).update(container.id, req.resources.value)
        except RuncError as err:
            raise runtime_error(err, "OCI runtime update failed") from None
        return b""

    async def pids(self, payload: bytes) -> bytes:
        container = self.container(task.PidsRequest.parse(payload).id)
        try:
            pids = await self.runc(container).ps(container.id)
        except RuncError as err:
            raise Unknown(f"failed to list pids: {err.text}") from None
        by_pid = {p.pid: p.id for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = _any(ProcessDetails(exec_id=by_pid[pid])) if pid in by_pid else None
            processes.append(ProcessInfo(pid=pid, info=info))
        return bytes(task.PidsResponse(processes=processes))

    async def stats(self, payload: bytes) -> bytes:
        container = self.container(task.StatsRequest.parse(payload).id)
        data = container.config.get("cgroup")
        if data is None:
            raise NotFound("cgroup does not exist")
        url, metrics = cgroups.Cgroup(**data).metrics()
        return bytes(task.StatsResponse(stats=AnyMessage(type_url=url, value=metrics)))

    async def checkpoint(self, payload: bytes) -> bytes:
        req = task.CheckpointTaskRequest.parse(payload)
        container = self.container(req.id)
        require_criu(container.config)
        opts = CheckpointOptions()
        if req.options is not None and req.options.type_url:
            opts = CheckpointOptions.parse(req.options.value)
        container.init.check(Op.CHECKPOINT)
        # The image goes to req.path; CheckpointOptions.image_path is for the daemon, not the shim.
        own_work = not opts.work_path
        work = opts.work_path or os.path.join(container.bundle, "work", "criu-work")
        try:
            await self.runc(container).checkpoint(
                container.id,
                image_path=req.path,
                work_path=work,
                leave_running=not opts.exit,
                tcp=opts.open_tcp,
                unix_sockets=opts.external_unix_sockets,
                terminal=opts.terminal,
                file_locks=opts.file_locks,
                empty_namespaces=tuple(opts.empty_namespaces),
            )
        except RuncError as err:
            dump_log = os.path.join(container.bundle, "criu-dump.log")
            with contextlib.suppress(OSError):
                shutil.copyfile(os.path.join(work, "dump.log"), dump_log)
            raise Unknown(
                f"{err.text.splitlines()[0] if err.text else 'checkpoint failed'} path= {dump_log}"
            ) from None
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)
        return b""
