"""``pyctr run``: create a container from an image, start its task, and attach to it.

As ``ctr run`` does: the image's config and containerd's default spec make the OCI spec; a
snapshot keyed by the container id is prepared on the image's top layer (under a short lease,
then held by the container record); the task's stdio goes through FIFOs; the container's exit
status becomes ours, and Ctrl-C is forwarded as SIGINT.

The user (``--user``, else the image's ``User``) is resolved as ``WithImageConfig`` does it,
against the prepared snapshot's /etc/passwd and /etc/group, mounted read-only for the look-up
(:mod:`pyctr.ctr.users`, :mod:`pyctr.ctr.rootfs`). A user that does not resolve fails the run
before the container exists, and the snapshot goes with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

from pyctr.api._pb.containerd.services.containers import v1 as cpb
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest as LeaseCreate
from pyctr.api._pb.containerd.services.leases.v1 import DeleteRequest as LeaseDelete
from pyctr.api._pb.containerd.services.snapshots import v1 as spb
from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.api._pb.containerd.types import Mount as PbMount
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import NotFound
from pyctr.ctr import attach, oci, output, rootfs, stdio, users
from pyctr.ctr.client import Client
from pyctr.ctr.imageops import image_config

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
    p.add_argument("-u", "--user", default="", help="uid, name, uid:gid or name:group (the image's names)")
    p.add_argument("--memory-limit", type=int, default=0, help="bytes")
    p.add_argument("--cpus", type=float, default=0.0)
    p.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    p.add_argument(
        "--privileged", action="store_true", help="every capability of the caller, the host's devices"
    )
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP_NAME", help="add a capability")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP_NAME", help="drop a capability")
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
    if args.tty:
        proc["terminal"] = True
        proc["env"] = oci.merge_env(proc["env"], ["TERM=xterm"])
    if not any(m["destination"] == "/sys/fs/cgroup" for m in spec["mounts"]):
        # containerd's default spec mounts the container's cgroups read-only; oci.DEFAULT_MOUNTS lacks it
        spec["mounts"].append(dict(CGROUP_MOUNT, options=list(CGROUP_MOUNT["options"])))
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
    if args.privileged:
        oci.with_privileged(spec)
    if args.cap_add or args.cap_drop:
        oci.with_capabilities(spec, args.cap_add, args.cap_drop)
    return spec


async def create_container(args: argparse.Namespace, client: Client) -> list[PbMount]:
    """The container record on a new snapshot; the snapshot's mounts. Nothing stays on failure."""
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
    prepared = False
    try:
        mounts = (
            await client.snapshots.prepare(
                spb.PrepareSnapshotRequest(snapshotter=args.snapshotter, key=args.id, parent=top), metadata=md
            )
        ).mounts
        prepared = True
        user = args.user or (config.get("config") or {}).get("User", "")
        resolved = await rootfs.read_snapshot(
            mounts, args.id, lambda root: users.from_image(user, rootfs.RootFiles(root))
        )
        spec["process"]["user"] = resolved.spec()
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
    except BaseException:
        if prepared:  # ours: a snapshot that was there before (the id in use) is not
            with contextlib.suppress(Exception):
                await client.snapshots.remove(
                    spb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=args.id)
                )
        raise
    finally:
        await client.leases.delete(LeaseDelete(id=lease_id))
    return list(mounts)


async def remove_container(args: argparse.Namespace, client: Client) -> None:
    with contextlib.suppress(Exception):
        await client.tasks.delete(tpb.DeleteTaskRequest(container_id=args.id))
    with contextlib.suppress(NotFound, Exception):
        await client.containers.delete(cpb.DeleteContainerRequest(id=args.id))
    with contextlib.suppress(Exception):
        await client.snapshots.remove(spb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=args.id))


async def run(args: argparse.Namespace, client: Client) -> int:
    mounts = await create_container(args, client)
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
    return await follow(args, client, fifos)


async def follow(args: argparse.Namespace, client: Client, fifos: stdio.FifoSet) -> int:
    """Start the task and follow it; then delete it, and with ``--rm`` the container too."""
    try:
        return await attach.follow(
            client,
            args.id,
            "",
            fifos,
            terminal=args.tty,
            start=True,
            on_stdin_eof=attach.stdin_closer(client, args.id),
            forward=(),  # SIGTERM and SIGHUP end pyctr run itself; tasks start/exec pass them on
        )
    finally:
        stdio.close(fifos)
        with contextlib.suppress(Exception):
            await client.tasks.delete(tpb.DeleteTaskRequest(container_id=args.id))
        if args.rm:
            await remove_container(args, client)
