"""``pyctr run``: create a container from an image, start its task, and attach to it.

As ``ctr run`` does: the image's config and containerd's default spec make the OCI spec; a
snapshot keyed by the container id is prepared on the image's top layer (under a short lease,
then held by the container record); the task's stdio goes through FIFOs; the container's exit
status becomes ours, and Ctrl-C is forwarded as SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import time
import tty
from typing import Any

from pyctr.api._pb.containerd.services.containers import v1 as cpb
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest as LeaseCreate
from pyctr.api._pb.containerd.services.leases.v1 import DeleteRequest as LeaseDelete
from pyctr.api._pb.containerd.services.snapshots import v1 as spb
from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import NotFound
from pyctr.ctr import oci, output, stdio
from pyctr.ctr.client import Client
from pyctr.ctr.commands.images import image_config

RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
CGROUP_MOUNT = {
    "destination": "/sys/fs/cgroup",
    "type": "cgroup",
    "source": "cgroup",
    "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
}


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a container from an image")
    p.add_argument("image")
    p.add_argument("id")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="start and return")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("-i", "--interactive", action="store_true", help="attach stdin")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--mount", action="append", default=[], help="type=bind,src=/a,dst=/b,options=rbind:ro")
    p.add_argument("--net-host", action="store_true", help="use the host's network namespace")
    p.add_argument("--cwd", default="")
    p.add_argument("-u", "--user", default="", help="uid[:gid] (numeric)")
    p.add_argument("--memory-limit", type=int, default=0, help="bytes")
    p.add_argument("--cpus", type=float, default=0.0)
    p.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    p.add_argument("--runtime", default="io.containerd.runc.v2")
    p.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def parse_mount(text: str) -> dict[str, Any]:
    fields = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    dst = fields.get("dst") or fields.get("destination") or fields.get("target")
    src = fields.get("src") or fields.get("source")
    if not dst or not src:
        raise ValueError(f"--mount {text!r}: src and dst are required")
    options = fields.get("options", "rbind").split(":")
    return {"destination": dst, "type": fields.get("type", "bind"), "source": src, "options": options}


def build_spec(args: argparse.Namespace, namespace: str, config: dict[str, Any]) -> dict[str, Any]:
    spec = oci.default_spec(namespace, args.id)
    oci.with_image_config(spec, config, args.args)
    proc = spec["process"]
    if not proc["args"]:
        raise ValueError("no command: the image has none and none was given")
    proc["env"] = oci.merge_env(proc["env"], args.env)
    if args.cwd:
        proc["cwd"] = args.cwd
    user = args.user or (config.get("config") or {}).get("User", "")
    if user:
        uid, gid = oci.parse_user(user)
        proc["user"] = {"uid": uid, "gid": gid}
    if args.tty:
        proc["terminal"] = True
        proc["env"] = oci.merge_env(proc["env"], ["TERM=xterm"])
    if not any(m["destination"] == "/sys/fs/cgroup" for m in spec["mounts"]):
        # containerd's default spec mounts the container's cgroups read-only; oci.DEFAULT_MOUNTS lacks it
        spec["mounts"].append(CGROUP_MOUNT)
    for m in args.mount:
        spec["mounts"].append(parse_mount(m))
    if args.net_host:
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
        for path in ("/etc/hosts", "/etc/resolv.conf"):
            spec["mounts"].append(
                {"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]}
            )
    resources = spec["linux"]["resources"]
    if args.memory_limit:
        resources["memory"] = {"limit": args.memory_limit}
    if args.cpus:
        period = 100000
        resources["cpu"] = {"quota": int(args.cpus * period), "period": period}
    if args.read_only:
        spec["root"]["readonly"] = True
    return spec


async def create_container(args: argparse.Namespace, client: Client) -> None:
    config, chains = await image_config(client, args.image)
    if not chains:
        raise ValueError(f"image {args.image} has no layers")
    top = chains[-1]
    try:
        await client.snapshots.stat(spb.StatSnapshotRequest(snapshotter=args.snapshotter, key=top))
    except Exception as exc:
        raise NotFound(f"image {args.image} is not unpacked for {args.snapshotter}: pull it again") from exc
    spec = build_spec(args, args.namespace, config)
    lease_id = f"pyctr-run-{time.time_ns()}"
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    await client.leases.create(LeaseCreate(id=lease_id, labels={"containerd.io/gc.expire": expiry}))
    md = {"containerd-namespace": args.namespace, "containerd-lease": lease_id}
    try:
        await client.snapshots.prepare(
            spb.PrepareSnapshotRequest(snapshotter=args.snapshotter, key=args.id, parent=top), metadata=md
        )
        labels = output.parse_labels(args.label)
        stop = (config.get("config") or {}).get("StopSignal") or "SIGTERM"
        labels.setdefault("io.containerd.image.config.stop-signal", stop)
        container = cpb.Container(
            id=args.id,
            image=args.image,
            labels=labels,
            runtime=cpb.ContainerRuntime(name=args.runtime, options=PbAny(type_url=RUNC_OPTIONS_TYPE)),
            spec=PbAny(type_url=oci.SPEC_TYPE_URL, value=json.dumps(spec).encode()),
            snapshotter=args.snapshotter,
            snapshot_key=args.id,
        )
        await client.containers.create(cpb.CreateContainerRequest(container=container), metadata=md)
    finally:
        await client.leases.delete(LeaseDelete(id=lease_id))


async def remove_container(args: argparse.Namespace, client: Client) -> None:
    with contextlib.suppress(Exception):
        await client.tasks.delete(tpb.DeleteTaskRequest(container_id=args.id))
    with contextlib.suppress(NotFound, Exception):
        await client.containers.delete(cpb.DeleteContainerRequest(id=args.id))
    with contextlib.suppress(Exception):
        await client.snapshots.remove(spb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=args.id))


async def run(args: argparse.Namespace, client: Client) -> int:
    await create_container(args, client)
    mounts = (
        await client.snapshots.mounts(spb.MountsRequest(snapshotter=args.snapshotter, key=args.id))
    ).mounts
    # A detached task gets FIFOs too, as ctr's: they stay (the shim holds a read end) so that
    # `pyctr tasks attach` can reopen them; deleting the task removes them.
    fifos = stdio.create(args.id, args.interactive, args.tty)
    try:
        request = tpb.CreateTaskRequest(container_id=args.id, rootfs=list(mounts), terminal=args.tty)
        request.stdin, request.stdout, request.stderr = fifos.stdin, fifos.stdout, fifos.stderr
        if not args.detach:
            stdio.start_output(fifos)
        await client.tasks.create(request)
    except BaseException:
        stdio.close(fifos)
        await remove_container(args, client)
        raise
    if args.detach:
        await client.tasks.start(tpb.StartRequest(container_id=args.id))
        return 0
    return await attach(args, client, fifos)


def ignores_sigint(pid: int) -> bool:
    """True when the kernel drops a SIGINT sent to this process: a pid namespace's init without a
    handler for it (``sleep`` as a container's process). False when we cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except OSError:
        return False
    nspid = fields.get("NSpid", "").split()
    caught = int(fields.get("SigCgt", "0").strip() or "0", 16)
    return len(nspid) > 1 and nspid[-1] == "1" and not caught & (1 << (signal.SIGINT - 1))


class Interrupter:
    """Ctrl-C for a followed process: SIGINT is forwarded; a container init that would ignore it
    is killed instead, and the command then exits 130 as an interrupted shell command does."""

    def __init__(self, client: Client, cid: str, exec_id: str = "") -> None:
        self.client, self.cid, self.exec_id = client, cid, exec_id
        self.pid = 0
        self.killed = False
        self._pending: set[asyncio.Future[None]] = set()

    def __call__(self) -> None:
        fut = asyncio.ensure_future(self._interrupt())
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def _interrupt(self) -> None:
        req = tpb.KillRequest(container_id=self.cid, exec_id=self.exec_id, signal=signal.SIGINT)
        with contextlib.suppress(Exception):
            await self.client.tasks.kill(req)
            if self.pid and ignores_sigint(self.pid):
                self.killed = True
                req = tpb.KillRequest(
                    container_id=self.cid, exec_id=self.exec_id, signal=signal.SIGKILL, all=not self.exec_id
                )
                await self.client.tasks.kill(req)

    def exit_code(self, status: int) -> int:
        return 128 + signal.SIGINT if self.killed and status == 128 + signal.SIGKILL else status


async def attach(args: argparse.Namespace, client: Client, fifos: stdio.FifoSet) -> int:
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(client.tasks.wait(tpb.WaitRequest(container_id=args.id)))
    saved_tty = None
    interrupter = Interrupter(client, args.id)
    feeder: asyncio.Future[None] | None = None
    try:
        interrupter.pid = (await client.tasks.start(tpb.StartRequest(container_id=args.id))).pid
        if args.tty and os.isatty(0):
            await resize(client, args.id)
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(resize(client, args.id)))
        if args.tty and fifos.stdin and os.isatty(0):
            # Raw only when our keys reach the process (-i): then Ctrl-C is a byte for its terminal.
            saved_tty = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSADRAIN)  # TCSAFLUSH (the default) would drop typed-ahead input
        else:
            loop.add_signal_handler(signal.SIGINT, interrupter)
        if fifos.stdin:

            async def close_stdin() -> None:
                await client.tasks.close_io(tpb.CloseIoRequest(container_id=args.id, stdin=True))

            feeder = asyncio.ensure_future(stdio.copy_stdin(fifos, close_stdin))
        status = await waiter
        if feeder is not None and not feeder.done():
            feeder.cancel()
        await stdio.wait_output(fifos)
        return interrupter.exit_code(int(status.exit_status))
    finally:
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGWINCH)
            loop.remove_signal_handler(signal.SIGINT)
        stdio.close(fifos)
        if not waiter.done():
            waiter.cancel()
        with contextlib.suppress(Exception):
            await client.tasks.delete(tpb.DeleteTaskRequest(container_id=args.id))
        if args.rm:
            await remove_container(args, client)


async def resize(client: Client, cid: str, exec_id: str = "") -> None:
    try:
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return
    await client.tasks.resize_pty(
        tpb.ResizePtyRequest(container_id=cid, exec_id=exec_id, width=cols, height=rows)
    )
