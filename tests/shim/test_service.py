"""The Task service over ttrpc, with real runc, our shim started by its own ``start`` action, and a
fake daemon that records the events it is sent (see shimkit)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from pyctr.api import ttrpc
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.v1.types import Status
from pyctr.api._pb.google.protobuf import Any as AnyMessage
from tests.shim import shimkit
from tests.shim.harness import is_mounted
from tests.shim.shimkit import ShimSession, call, call_empty, create_request, drain, fifo, read_text

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc", path=os.environ.get("PATH", "") + ":/usr/sbin") is None,
    reason="needs root and runc",
)

PROCESS_SPEC = "types.containerd.io/opencontainers/runtime-spec/1/Process"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("busybox") / "rootfs")
    shimkit.make_rootfs(path)
    yield path


def run(rootfs: str, body: Callable[[ShimSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with ShimSession(rootfs) as session:
            await body(session)

    asyncio.run(main())


def exec_spec(args: list[str]) -> AnyMessage:
    process = {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    return AnyMessage(type_url=PROCESS_SPEC, value=json.dumps(process).encode())


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


async def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not exited(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_lifecycle_output_exit_status_and_event_order(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        s.bundle("c1", ["sh", "-c", "echo out; echo err >&2; exit 7"])
        client = await s.connect("c1")
        out_path, out_fd = fifo(s, "c1-stdout")
        err_path, err_fd = fifo(s, "c1-stderr")
        created = await call(
            client,
            "Create",
            create_request(s, "c1", stdout=out_path, stderr=err_path),
            task.CreateTaskResponse,
        )
        assert created.pid > 0
        state = await call(client, "State", task.StateRequest(id="c1"), task.StateResponse)
        assert state.status == Status.CREATED and state.pid == created.pid and state.stdout == out_path
        # Wait before Start blocks until the exit.
        waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id="c1"), task.WaitResponse))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = await call(client, "Start", task.StartRequest(id="c1"), task.StartResponse)
        assert started.pid == created.pid
        waited = await waiter
        assert waited.exit_status == 7 and waited.exited_at is not None
        # The output was flushed and the shim's write ends closed before Wait answered.
        assert drain(out_fd) == (b"out\n", True)
        assert drain(err_fd) == (b"err\n", True)
        state = await call(client, "State", task.StateRequest(id="c1"), task.StateResponse)
        assert state.status == Status.STOPPED and state.exit_status == 7
        deleted = await call(client, "Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
        assert (deleted.pid, deleted.exit_status) == (created.pid, 7)
        # The rootfs bind mount is gone, runc forgot the container.
        assert not is_mounted(os.path.join(s.bundles["c1"], "rootfs"))
        assert not os.path.exists(os.path.join(s.runc_root, "c1"))
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "State", task.StateRequest(id="c1"), task.StateResponse)
        assert err.value.code == ttrpc.Code.NOT_FOUND
        shim = s.shim_pid("c1")
        await call_empty(client, "Shutdown", task.ShutdownRequest(id="c1"))
        assert await wait_gone(shim)
        await s.wait_topic("/tasks/delete")
        assert s.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        exit_event = s.events[2][1]
        assert (exit_event.id, exit_event.pid, exit_event.exit_status) == ("c1", created.pid, 7)  # type: ignore[attr-defined]
        address = read_text(os.path.join(s.bundles["c1"], "address"))
        assert not os.path.exists(address.removeprefix("unix://"))  # socket removed on exit
        os.close(out_fd)
        os.close(err_fd)

    run(rootfs, body)


def test_exec_kill_pause_pids_and_errors(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        s.bundle("c2", ["sleep", "1000"])
        client = await s.connect("c2")
        created = await call(client, "Create", create_request(s, "c2"), task.CreateTaskResponse)
        await call(client, "Start", task.StartRequest(id="c2"), task.StartResponse)
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "Start", task.StartRequest(id="c2"), task.StartResponse)
        assert err.value.code == ttrpc.Code.UNKNOWN and "cannot start a running process" in err.value.message

        # An exec that exits at once: its exit must not be lost even if it beats `runc exec`.
        out_path, out_fd = fifo(s, "e1-stdout")
        await call_empty(
            client,
            "Exec",
            task.ExecProcessRequest(id="c2", exec_id="e1", stdout=out_path, spec=exec_spec(["echo", "x"])),
        )
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call_empty(
                client, "Exec", task.ExecProcessRequest(id="c2", exec_id="e1", spec=exec_spec(["true"]))
            )
        assert err.value.code == ttrpc.Code.ALREADY_EXISTS
        waiter = asyncio.ensure_future(
            call(client, "Wait", task.WaitRequest(id="c2", exec_id="e1"), task.WaitResponse)
        )
        started = await call(client, "Start", task.StartRequest(id="c2", exec_id="e1"), task.StartResponse)
        assert started.pid > 0
        assert (await waiter).exit_status == 0
        assert drain(out_fd) == (b"x\n", True)
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call_empty(client, "Kill", task.KillRequest(id="c2", exec_id="e1", signal=9))
        assert err.value.code == ttrpc.Code.NOT_FOUND
        await call(client, "Delete", task.DeleteRequest(id="c2", exec_id="e1"), task.DeleteResponse)
        await s.wait_topic("/tasks/exit")
        assert s.topics("c2") == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
        ]

        # A long-running exec shows up in Pids with its exec id.
        await call_empty(
            client, "Exec", task.ExecProcessRequest(id="c2", exec_id="e2", spec=exec_spec(["sleep", "1000"]))
        )
        e2 = await call(client, "Start", task.StartRequest(id="c2", exec_id="e2"), task.StartResponse)
        pids = await call(client, "Pids", task.PidsRequest(id="c2"), task.PidsResponse)
        by_pid = {p.pid: p.info for p in pids.processes}
        assert created.pid in by_pid and by_pid[created.pid] is None
        assert by_pid[e2.pid] is not None and by_pid[e2.pid].type_url == "containerd.runc.v1.ProcessDetails"

        await call_empty(client, "Pause", task.PauseRequest(id="c2"))
        for exec_id in ("", "e2"):
            state = await call(
                client, "State", task.StateRequest(id="c2", exec_id=exec_id), task.StateResponse
            )
            assert state.status == Status.PAUSED
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call_empty(client, "Pause", task.PauseRequest(id="c2"))
        assert "cannot pause a paused container" in err.value.message
        await call_empty(client, "Resume", task.ResumeRequest(id="c2"))
        state = await call(client, "State", task.StateRequest(id="c2"), task.StateResponse)
        assert state.status == Status.RUNNING

        # Update: a pids limit lands in the container's cgroup.
        resources = AnyMessage(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
            value=json.dumps({"pids": {"limit": 42}}).encode(),
        )
        await call_empty(client, "Update", task.UpdateTaskRequest(id="c2", resources=resources))
        stats = await call(client, "Stats", task.StatsRequest(id="c2"), task.StatsResponse)
        assert stats.stats is not None and stats.stats.type_url.startswith("io.containerd.cgroups.v")
        assert stats.stats.value

        # Kill all: init and the exec die; Wait answers both; Shutdown with a container left is a no-op.
        e2_wait = asyncio.ensure_future(
            call(client, "Wait", task.WaitRequest(id="c2", exec_id="e2"), task.WaitResponse)
        )
        await call_empty(client, "Kill", task.KillRequest(id="c2", signal=9, all=True))
        assert (await call(client, "Wait", task.WaitRequest(id="c2"), task.WaitResponse)).exit_status == 137
        assert (await e2_wait).exit_status == 137
        await call_empty(client, "Shutdown", task.ShutdownRequest(id="c2"))
        connect = await call(client, "Connect", task.ConnectRequest(id="c2"), task.ConnectResponse)
        assert connect.shim_pid == s.shim_pid("c2") and connect.task_pid == created.pid
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "Delete", task.DeleteRequest(id="c2", exec_id="nope"), task.DeleteResponse)
        assert err.value.code == ttrpc.Code.NOT_FOUND
        await call(client, "Delete", task.DeleteRequest(id="c2", exec_id="e2"), task.DeleteResponse)
        await call(client, "Delete", task.DeleteRequest(id="c2"), task.DeleteResponse)
        os.close(out_fd)

    run(rootfs, body)


def test_stdin_closeio_and_terminal(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        # stdin: data flows in; EOF reaches the process only after CloseIO (and the client's close).
        s.bundle("c3", ["cat"])
        client = await s.connect("c3")
        in_path = os.path.join(s.base, "c3-stdin")
        os.mkfifo(in_path)
        in_rd = os.open(in_path, os.O_RDONLY | os.O_NONBLOCK)  # lets us open the writer without blocking
        in_wr = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(in_rd)
        out_path, out_fd = fifo(s, "c3-stdout")
        await call(
            client, "Create", create_request(s, "c3", stdin=in_path, stdout=out_path), task.CreateTaskResponse
        )
        await call(client, "Start", task.StartRequest(id="c3"), task.StartResponse)
        os.write(in_wr, b"hello\n")
        os.close(in_wr)
        await asyncio.sleep(0.3)
        state = await call(client, "State", task.StateRequest(id="c3"), task.StateResponse)
        assert state.status == Status.RUNNING  # our writer is gone, the shim's holds EOF back
        await call_empty(client, "CloseIO", task.CloseIoRequest(id="c3", stdin=True))
        assert (await call(client, "Wait", task.WaitRequest(id="c3"), task.WaitResponse)).exit_status == 0
        assert drain(out_fd) == (b"hello\n", True)
        await call(client, "Delete", task.DeleteRequest(id="c3"), task.DeleteResponse)

        # terminal: runc hands the pty master over the console socket; ResizePty sets its size.
        s.bundle("c4", ["sh", "-c", "sleep 0.2; tty; stty size"], terminal=True)
        client = await s.connect("c4")
        tty_path, tty_fd = fifo(s, "c4-stdout")
        await call(
            client, "Create", create_request(s, "c4", stdout=tty_path, terminal=True), task.CreateTaskResponse
        )
        await call_empty(client, "ResizePty", task.ResizePtyRequest(id="c4", width=100, height=40))
        await call(client, "Start", task.StartRequest(id="c4"), task.StartResponse)
        assert (await call(client, "Wait", task.WaitRequest(id="c4"), task.WaitResponse)).exit_status == 0
        output, eof = drain(tty_fd)
        assert eof and b"/dev/pts/" in output and b"40 100" in output
        await call(client, "Delete", task.DeleteRequest(id="c4"), task.DeleteResponse)
        os.close(out_fd)
        os.close(tty_fd)

    run(rootfs, body)


def test_create_errors_and_delete_before_start(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        s.bundle("c5", ["no-such-binary"])
        client = await s.connect("c5")
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "Create", create_request(s, "c5"), task.CreateTaskResponse)
        # runc's own message from log.json, behind the shim's prefix; nothing is left behind.
        assert err.value.code == ttrpc.Code.UNKNOWN
        assert "OCI runtime create failed" in err.value.message and "no-such-binary" in err.value.message
        assert not is_mounted(os.path.join(s.bundles["c5"], "rootfs"))
        assert not os.path.exists(os.path.join(s.runc_root, "c5"))
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "State", task.StateRequest(id="c5"), task.StateResponse)
        assert err.value.code == ttrpc.Code.NOT_FOUND

        s.bundle("c6", ["sleep", "1000"])
        client = await s.connect("c6")
        await call(client, "Create", create_request(s, "c6"), task.CreateTaskResponse)
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(client, "Create", create_request(s, "c6"), task.CreateTaskResponse)
        assert err.value.code == ttrpc.Code.ALREADY_EXISTS
        waiter = asyncio.ensure_future(call(client, "Wait", task.WaitRequest(id="c6"), task.WaitResponse))
        await call(client, "Delete", task.DeleteRequest(id="c6"), task.DeleteResponse)  # never started
        await asyncio.wait_for(waiter, 5)
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call_empty(client, "NoSuchMethod", task.StateRequest(id="c6"))
        assert err.value.code == ttrpc.Code.UNIMPLEMENTED
        await s.wait_topic("/tasks/delete")
        # runc delete kills the waiting init: its exit, when reaped in time, is published before delete.
        assert s.topics("c6") in (
            ["/tasks/create", "/tasks/delete"],
            ["/tasks/create", "/tasks/exit", "/tasks/delete"],
        )

    run(rootfs, body)


def test_start_reuses_the_live_shim_of_a_group(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        group = {"io.containerd.runc.v2.group": "pod1"}
        s.bundle("p1", ["sleep", "1000"], annotations=group)
        s.bundle("p2", ["sleep", "1000"], annotations=group)
        first = await s.connect("p1")
        second = await s.connect("p2")
        for client, id in ((first, "p1"), (second, "p2")):
            await call(client, "Create", create_request(s, id), task.CreateTaskResponse)
            await call(client, "Start", task.StartRequest(id=id), task.StartResponse)
        one = await call(first, "Connect", task.ConnectRequest(id="p1"), task.ConnectResponse)
        two = await call(second, "Connect", task.ConnectRequest(id="p2"), task.ConnectResponse)
        assert one.shim_pid == two.shim_pid
        assert not os.path.exists(os.path.join(s.bundles["p2"], "shim.pid"))  # no second shim spawned
        for id in ("p1", "p2"):
            await call_empty(first, "Kill", task.KillRequest(id=id, signal=9))
            await call(first, "Wait", task.WaitRequest(id=id), task.WaitResponse)
            await call(first, "Delete", task.DeleteRequest(id=id), task.DeleteResponse)

    run(rootfs, body)


def test_sigterm_stops_the_shim_but_not_the_container(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        s.bundle("c7", ["sleep", "1000"])
        client = await s.connect("c7")
        created = await call(client, "Create", create_request(s, "c7"), task.CreateTaskResponse)
        await call(client, "Start", task.StartRequest(id="c7"), task.StartResponse)
        shim = s.shim_pid("c7")
        os.kill(shim, signal.SIGTERM)
        assert await wait_gone(shim)
        assert not exited(created.pid)  # the container outlives its shim (cleanup kills it via runc)

    run(rootfs, body)


def test_fresh_interpreter_when_the_launcher_is_off(rootfs: str) -> None:
    async def body(s: ShimSession) -> None:
        s.bundle("c8", ["sh", "-c", "echo fresh"])
        client = await s.connect("c8", extra_env={"PYCTR_SHIM_LAUNCHER": "0"})
        assert not os.path.exists(os.path.join(s.base, "s", "pyrunc-launcher.sock"))
        out_path, out_fd = fifo(s, "c8-stdout")
        await call(client, "Create", create_request(s, "c8", stdout=out_path), task.CreateTaskResponse)
        await call(client, "Start", task.StartRequest(id="c8"), task.StartResponse)
        assert (await call(client, "Wait", task.WaitRequest(id="c8"), task.WaitResponse)).exit_status == 0
        assert drain(out_fd) == (b"fresh\n", True)
        await call(client, "Delete", task.DeleteRequest(id="c8"), task.DeleteResponse)
        shim = s.shim_pid("c8")
        await call_empty(client, "Shutdown", task.ShutdownRequest(id="c8"))
        assert await wait_gone(shim)
        os.close(out_fd)

    run(rootfs, body)


REFUSING_RUNC = """#!/bin/sh
prev=""
for a in "$@"; do
  [ "$prev" = --log ] && echo '{"level":"error","msg":"runc from the other PATH","time":"2026-01-01T00:00:00Z"}' >>"$a"
  prev=$a
done
exit 1
"""


def test_each_shim_takes_the_environment_it_was_started_with(rootfs: str, tmp_path: str) -> None:
    """The launcher forks shims from its own environment and hands each only what differs: a shim
    started with another PATH (whose runc refuses) uses it, and the shims before and after it
    keep the launcher's, whose runc works."""
    bindir = str(tmp_path)
    with open(os.path.join(bindir, "runc"), "w") as f:
        f.write(REFUSING_RUNC)
    os.chmod(os.path.join(bindir, "runc"), 0o755)

    async def body(s: ShimSession) -> None:
        for id in ("e1", "e2", "e3"):
            s.bundle(id, ["sleep", "1000"])
        first = await s.connect("e1")  # spawns the launcher, with the session's environment
        other = await s.connect("e2", extra_env={"PATH": f"{bindir}:{s.env()['PATH']}", "PYCTR_EXTRA": "1"})
        last = await s.connect("e3")
        with pytest.raises(ttrpc.TtrpcError) as err:
            await call(other, "Create", create_request(s, "e2"), task.CreateTaskResponse)
        assert "runc from the other PATH" in str(err.value)
        for id, client in (("e1", first), ("e3", last)):
            created = await call(client, "Create", create_request(s, id), task.CreateTaskResponse)
            assert created.pid > 0
            await call_empty(client, "Kill", task.KillRequest(id=id, signal=9))
            await call(client, "Wait", task.WaitRequest(id=id), task.WaitResponse)
            await call(client, "Delete", task.DeleteRequest(id=id), task.DeleteResponse)

    run(rootfs, body)
