"""``pyctr containers ls|info|rm|label|restore``, as ``ctr containers`` has them.

``rm`` follows ctr's ``deleteContainer``: a task that is created or stopped is deleted first, any
other refuses ("cannot delete a non stopped container"); the container's snapshot is removed with
it unless ``--keep-snapshot`` (containerd's ``WithSnapshotCleanup``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import sys
from typing import Any, TypeVar

from pyctr.api._pb.containerd.services.containers import v1 as cpb
from pyctr.api._pb.containerd.services.snapshots import v1 as spb
from pyctr.api._pb.containerd.services.tasks import v1 as tpb
from pyctr.api._pb.containerd.v1.types import Status
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import FieldMask
from pyctr.api.errdefs import FailedPrecondition, InvalidArgument, NotFound
from pyctr.ctr import oci, output, stdio
from pyctr.ctr.client import Client, rpc

log = logging.getLogger(__name__)
T = TypeVar("T")


def register(sub: Any) -> None:
    p = sub.add_parser("containers", aliases=["container", "c"], help="manage containers")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list containers (filters: image==…, labels.k==…)")
    ls.add_argument("filters", nargs="*")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the container ids")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)

    info = verbs.add_parser("info", help="show a container's record, its spec decoded, as JSON")
    info.add_argument("id")
    info.add_argument("--spec", action="store_true", help="only the OCI spec")
    info.set_defaults(func=info_)

    rm = verbs.add_parser("rm", aliases=["delete", "del", "remove"], help="delete containers")
    rm.add_argument("ids", nargs="+")
    rm.add_argument("--keep-snapshot", action="store_true", help="keep the container's snapshot")
    rm.set_defaults(func=remove)

    label = verbs.add_parser("label", help="set (KEY=VALUE) and clear (KEY or KEY=) labels")
    label.add_argument("id")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    label.set_defaults(func=label_)

    restore = verbs.add_parser(
        "restore", help="create a container from a checkpoint image and start its task (see tasks checkpoint)"
    )
    restore.add_argument("id")
    restore.add_argument("checkpoint", metavar="IMAGE")
    restore.add_argument("--rw", action="store_true", help="restore the read-write layer from the checkpoint")
    restore.add_argument(
        "--live",
        action="store_true",
        help="restore the process from the checkpoint (else start the spec's anew)",
    )
    restore.add_argument("-d", "--detach", action="store_true", help="start and return")
    restore.set_defaults(func=restore_)


def any_json(value: PbAny | None) -> Any:
    """An Any as Go's encoding/json prints a typeurl Any: its type and base64 value."""
    if value is None:
        return None
    return {"type_url": value.type_url, "value": base64.b64encode(value.value).decode()}


def decode_spec(value: PbAny | None) -> Any:
    """The container's OCI spec: its Any holds the spec as JSON."""
    if value is None or not value.value:
        return None
    return json.loads(value.value)


def record(c: cpb.Container) -> dict[str, Any]:
    """The container as ctr's ``containers info`` prints ``containers.Container``."""
    runtime = c.runtime or cpb.ContainerRuntime()
    return {
        "ID": c.id,
        "Labels": dict(c.labels) or None,
        "Image": c.image,
        "Runtime": {"Name": runtime.name, "Options": any_json(runtime.options)},
        "SnapshotKey": c.snapshot_key,
        "Snapshotter": c.snapshotter,
        "CreatedAt": c.created_at,
        "UpdatedAt": c.updated_at,
        "Extensions": {k: any_json(v) for k, v in c.extensions.items()} or None,
        "Sandbox": c.sandbox,
        "Spec": decode_spec(c.spec),
    }


async def get(client: Client, cid: str) -> cpb.Container:
    resp = await rpc(client, client.containers.get(cpb.GetContainerRequest(id=cid)))
    if resp.container is None:
        raise NotFound(f"container {cid!r} in namespace {client.namespace!r}")
    return resp.container


async def spec(client: Client, cid: str) -> dict[str, Any]:
    c = await get(client, cid)
    value = decode_spec(c.spec)
    if not isinstance(value, dict):
        raise FailedPrecondition(f"container {cid} has no spec")
    if c.spec is not None and c.spec.type_url != oci.SPEC_TYPE_URL:
        log.debug("container %s: spec type %s", cid, c.spec.type_url)
    return value


async def list_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.containers.list(cpb.ListContainersRequest(filters=args.filters))
    if args.quiet:
        for c in resp.containers:
            print(c.id)
    elif args.format == "json":
        output.print_json([record(c) for c in resp.containers])
    else:
        output.table(
            ["CONTAINER", "IMAGE", "RUNTIME"],
            [[c.id, c.image or "-", c.runtime.name if c.runtime else ""] for c in resp.containers],
            gap=4,
        )
    return 0


async def info_(args: argparse.Namespace, client: Client) -> int:
    c = await get(client, args.id)
    output.print_json(decode_spec(c.spec) if args.spec else record(c))
    return 0


async def delete_container(client: Client, cid: str, keep_snapshot: bool = False) -> None:
    c = await get(client, cid)
    try:
        proc = (await rpc(client, client.tasks.get(tpb.GetRequest(container_id=cid)))).process
    except NotFound:
        proc = None
    if proc is not None:
        if proc.status not in (Status.STOPPED, Status.CREATED):
            # ctr prints containerd's Status struct: {status exit-code exit-time}
            state = f"{proc.status.name.lower()} {proc.exit_status} 0001-01-01 00:00:00 +0000 UTC"
            raise FailedPrecondition(f"cannot delete a non stopped container: {{{state}}}")
        with contextlib.suppress(NotFound):
            await rpc(client, client.tasks.delete(tpb.DeleteTaskRequest(container_id=cid)))
        if proc.stdout and os.path.dirname(os.path.dirname(proc.stdout)) == stdio.FIFO_ROOT:
            shutil.rmtree(os.path.dirname(proc.stdout), ignore_errors=True)  # run -d's FIFOs
    await rpc(client, client.containers.delete(cpb.DeleteContainerRequest(id=cid)))
    if not keep_snapshot and c.snapshotter and c.snapshot_key:
        with contextlib.suppress(NotFound):
            await rpc(
                client,
                client.snapshots.remove(
                    spb.RemoveSnapshotRequest(snapshotter=c.snapshotter, key=c.snapshot_key)
                ),
            )


async def remove(args: argparse.Namespace, client: Client) -> int:
    # Like ctr: try every id, report each failure, and fail when any did.
    failed = 0
    for cid in args.ids:
        try:
            await delete_container(client, cid, args.keep_snapshot)
        except (NotFound, FailedPrecondition) as exc:
            print(f'pyctr: failed to delete container "{cid}": {exc}', file=sys.stderr)
            failed += 1
    return 1 if failed else 0


async def label_(args: argparse.Namespace, client: Client) -> int:
    if not args.id:
        raise InvalidArgument("container id must be provided")
    changes = output.parse_labels(args.labels)
    # Only the named labels change: an empty value clears one (field path labels.<key>).
    container = cpb.Container(id=args.id, labels={k: v for k, v in changes.items() if v})
    mask = FieldMask(paths=[f"labels.{k}" for k in changes])
    resp = await client.containers.update(cpb.UpdateContainerRequest(container=container, update_mask=mask))
    lbls = resp.container.labels if resp.container else {}
    print(",".join(f"{k}={v}" for k, v in sorted(lbls.items())))
    return 0


async def restore_(args: argparse.Namespace, client: Client) -> int:
    from pyctr.ctr import checkpoint
    from pyctr.ctr.commands import tasks

    await checkpoint.restore_container(client, args.id, args.checkpoint, rw=args.rw)
    start = argparse.Namespace(
        id=args.id, detach=args.detach, checkpoint=args.checkpoint if args.live else ""
    )
    return await tasks.start_(start, client)
