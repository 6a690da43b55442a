"""Drive our shim directly over ttrpc, playing the daemon: bundles, ``start``, an Events server.

A :class:`ShimSession` owns one short /tmp directory::

    <base>/d.sock          the "daemon address" passed as -address (never dialled; feeds the hashes)
    <base>/events.sock     our Events/Forward server ($TTRPC_ADDRESS): records (topic, event)
    <base>/s/              shim sockets and the launcher
    <base>/runc/t/         runc state of the session's containers
    <base>/b/<id>/         bundles: config.json, rootfs (a bind mount of the shared busybox tree)

Cleanup kills by PID what the session started: containers (runc delete --force), shims (shim.pid),
the launcher (its pid file), and unmounts the bundles' rootfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from typing import Any, TypeVar

import betterproto2

from pyctr.api import ttrpc
from pyctr.api._pb.containerd import events as ev
from pyctr.api._pb.containerd.services.events.ttrpc.v1 import ForwardRequest
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.containerd.types import Mount
from tests.shim import image
from tests.shim.harness import cmdline, kill_mentioning, owns

NAMESPACE = "t"
TASK = "containerd.task.v2.Task"
M = TypeVar("M", bound=betterproto2.Message)


def make_rootfs(path: str) -> None:
    """The busybox image's single layer, extracted (the same bytes ctr imports)."""
    os.makedirs(path, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(image.layer_tar())) as tar:
        tar.extractall(path, filter="fully_trusted")


def make_spec(args: list[str], *, terminal: bool = False, cgroup: str = "") -> dict[str, Any]:
    """runc's default spec (own PID/mount/net/ipc/uts namespaces), running ``args`` as root."""
    spec: dict[str, Any] = json.loads(_spec_template())
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    if cgroup:
        spec["linux"]["cgroupsPath"] = cgroup
    return spec


_TEMPLATE: str | None = None


def _spec_template() -> str:
    global _TEMPLATE
    if _TEMPLATE is None:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(["runc", "spec"], cwd=d, check=True, capture_output=True)
            with open(os.path.join(d, "config.json")) as f:
                _TEMPLATE = f.read()
    return _TEMPLATE


class ShimSession:
    def __init__(self, rootfs: str) -> None:
        self.rootfs = rootfs
        self.base = tempfile.mkdtemp(prefix="shim-", dir="/tmp")
        self.events: list[tuple[str, betterproto2.Message]] = []
        self._events_server: ttrpc.Server | None = None
        self._clients: list[ttrpc.Client] = []
        self.bundles: dict[str, str] = {}
        self._new_event = asyncio.Event()

    @property
    def address(self) -> str:
        return os.path.join(self.base, "d.sock")

    @property
    def runc_root(self) -> str:
        return os.path.join(self.base, "runc", NAMESPACE)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TTRPC_ADDRESS"] = os.path.join(self.base, "events.sock")
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    async def __aenter__(self) -> ShimSession:
        server = ttrpc.Server()

        async def forward(payload: bytes, ctx: ttrpc.Context) -> bytes:
            envelope = ForwardRequest.parse(payload).envelope
            assert envelope is not None and envelope.event is not None
            assert ctx.namespace == NAMESPACE and envelope.namespace == NAMESPACE
            name = envelope.event.type_url.rsplit(".", 1)[1]
            cls = {"TaskOOM": ev.TaskOom, "TaskIO": ev.TaskIo}.get(name) or getattr(ev, name)
            self.events.append((envelope.topic, cls.parse(envelope.event.value)))
            self._new_event.set()
            return b""

        server.register("containerd.services.events.ttrpc.v1.Events", {"Forward": forward})
        await server.serve_unix(os.path.join(self.base, "events.sock"))
        self._events_server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            client.close()
        await asyncio.to_thread(self.cleanup)
        if self._events_server is not None:
            self._events_server.close()
            await self._events_server.wait_closed()
        shutil.rmtree(self.base, ignore_errors=True)

    def cleanup(self) -> None:
        if os.path.isdir(self.runc_root):
            for id in os.listdir(self.runc_root):
                subprocess.run(
                    ["runc", "--root", self.runc_root, "delete", "--force", id], capture_output=True
                )
        for bundle in self.bundles.values():
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(bundle, "shim.pid")) as f:
                    pid = int(f.read())
                if owns(pid, bundle):  # a pid file outlives its process; pids get reused
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-R", os.path.join(bundle, "rootfs")], capture_output=True)
        sockdir = os.path.join(self.base, "s")
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(sockdir, "pyrunc-launcher.pid")) as f:
                pid = int(f.read())
            if sockdir in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        kill_mentioning(self.base)

    def bundle(
        self, id: str, args: list[str], *, terminal: bool = False, annotations: dict[str, str] | None = None
    ) -> str:
        bundle = os.path.join(self.base, "b", id)
        os.makedirs(os.path.join(bundle, "rootfs"))
        spec = make_spec(args, terminal=terminal, cgroup=f"/pyrunc-test-{os.path.basename(self.base)}-{id}")
        if annotations:
            spec["annotations"] = annotations
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        self.bundles[id] = bundle
        return bundle

    def rootfs_mounts(self) -> list[Mount]:
        return [Mount(type="bind", source=self.rootfs, options=["rbind", "ro"])]

    def start_shim(
        self, id: str, *, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = self.env()
        env.update(extra_env or {})
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pyctr.shim",
                "-namespace",
                NAMESPACE,
                "-id",
                id,
                "-address",
                self.address,
                "start",
            ],
            cwd=self.bundles[id],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )

    async def connect(self, id: str, *, extra_env: dict[str, str] | None = None) -> ttrpc.Client:
        result = await asyncio.to_thread(self.start_shim, id, extra_env=extra_env)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        address = result.stdout
        assert read_text(os.path.join(self.bundles[id], "address")) == address
        client = await ttrpc.Client.connect(address)
        self._clients.append(client)
        return client

    def shim_pid(self, id: str) -> int:
        return int(read_text(os.path.join(self.bundles[id], "shim.pid")))

    def topics(self, container_id: str | None = None) -> list[str]:
        return [
            topic
            for topic, event in self.events
            if container_id is None or getattr(event, "container_id", None) == container_id
        ]

    async def wait_topic(self, topic: str, count: int = 1, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while sum(1 for t, _ in self.events if t == topic) < count:
                self._new_event.clear()
                await self._new_event.wait()


async def call(
    client: ttrpc.Client, method: str, request: betterproto2.Message, reply: type[M], timeout: float = 20
) -> M:
    data = await client.call(
        TASK, method, bytes(request), metadata={"containerd-namespace-ttrpc": NAMESPACE}, timeout=timeout
    )
    return reply.parse(data)


async def call_empty(
    client: ttrpc.Client, method: str, request: betterproto2.Message, timeout: float = 20
) -> None:
    await client.call(
        TASK, method, bytes(request), metadata={"containerd-namespace-ttrpc": NAMESPACE}, timeout=timeout
    )


def create_request(session: ShimSession, id: str, **kw: Any) -> task.CreateTaskRequest:
    return task.CreateTaskRequest(id=id, bundle=session.bundles[id], rootfs=session.rootfs_mounts(), **kw)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def fifo(session: ShimSession, name: str) -> tuple[str, int]:
    """A FIFO with our read end open (non-blocking), as ctr prepares stdout before Create."""
    path = os.path.join(session.base, name)
    os.mkfifo(path)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def drain(fd: int) -> tuple[bytes, bool]:
    """(what is buffered, whether EOF was seen) without blocking."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data, False
        if not chunk:
            return data, True
        data += chunk
