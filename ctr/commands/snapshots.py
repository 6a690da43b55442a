"""``pyctr snapshots ls|tree|info|usage|prepare|view|commit|mounts|rm|label``."""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Any

from pyctr.api._pb.containerd.services.snapshots import v1 as pb
from pyctr.api._pb.containerd.types import Mount
from pyctr.api._pb.google.protobuf import FieldMask
from pyctr.ctr import output
from pyctr.ctr.client import Client

KINDS = {0: "Unknown", 1: "View", 2: "Active", 3: "Committed"}


def register(sub: Any) -> None:
    p = sub.add_parser("snapshots", aliases=["snapshot"], help="manage snapshots")
    p.add_argument(
        "--snapshotter",
        default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs",
        help="snapshotter name (env CONTAINERD_SNAPSHOTTER)",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser(
        "ls", aliases=["list"], help="list snapshots (filters: name, parent, kind, labels.k)"
    )
    ls.add_argument("filters", nargs="*")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)

    verbs.add_parser("tree", help="show snapshots as a tree").set_defaults(func=tree)

    info = verbs.add_parser("info", help="show a snapshot's details")
    info.add_argument("key")
    info.set_defaults(func=info_)

    usage = verbs.add_parser("usage", help="disk usage of snapshots")
    usage.add_argument("keys", nargs="*")
    usage.add_argument("-b", action="store_true", help="sizes in bytes")
    usage.set_defaults(func=usage_)

    for verb, fn in (("prepare", prepare), ("view", view)):
        v = verbs.add_parser(verb, help=f"{verb} a snapshot from a committed parent")
        v.add_argument("key")
        v.add_argument("parent", nargs="?", default="")
        v.add_argument("--target", "-t", default="", help="print the mount command for this target")
        v.add_argument("--mounts", action="store_true", help="print the mounts")
        v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
        v.set_defaults(func=fn)

    mounts = verbs.add_parser("mounts", aliases=["m", "mount"], help="print the mount commands of a snapshot")
    mounts.add_argument("target")
    mounts.add_argument("key")
    mounts.set_defaults(func=mounts_)

    commit = verbs.add_parser("commit", help="commit an active snapshot under a name")
    commit.add_argument("name")
    commit.add_argument("key")
    commit.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    commit.set_defaults(func=commit_)

    rm = verbs.add_parser("rm", aliases=["delete", "del", "remove"], help="remove snapshots")
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=remove)

    label = verbs.add_parser("label", help="set and clear labels (KEY= clears one)")
    label.add_argument("key")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    label.set_defaults(func=label_)


async def _infos(args: argparse.Namespace, client: Client, filters: list[str]) -> list[pb.Info]:
    out: list[pb.Info] = []
    req = pb.ListSnapshotsRequest(snapshotter=args.snapshotter, filters=filters)
    async for resp in client.snapshots.list(req):
        out.extend(resp.info)
    return out


async def list_(args: argparse.Namespace, client: Client) -> int:
    infos = await _infos(args, client, args.filters)
    if args.format == "json":
        output.print_json(
            [
                {
                    "name": i.name,
                    "parent": i.parent,
                    "kind": KINDS.get(int(i.kind), "Unknown"),
                    "labels": dict(i.labels),
                    "created_at": i.created_at,
                    "updated_at": i.updated_at,
                }
                for i in infos
            ]
        )
    else:
        output.table(
            ["KEY", "PARENT", "KIND"], [[i.name, i.parent, KINDS.get(int(i.kind), "Unknown")] for i in infos]
        )
    return 0


async def tree(args: argparse.Namespace, client: Client) -> int:
    infos = await _infos(args, client, [])
    children: dict[str, list[str]] = defaultdict(list)
    names = {i.name for i in infos}
    for i in infos:
        children[i.parent if i.parent in names else ""].append(i.name)

    def show(name: str, depth: int) -> None:
        print(("  " * (depth - 1) + "\\_ " if depth else " ") + name)
        for child in sorted(children.get(name, [])):
            show(child, depth + 1)

    for root in sorted(children.get("", [])):
        show(root, 0)
    return 0


async def info_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.snapshots.stat(pb.StatSnapshotRequest(snapshotter=args.snapshotter, key=args.key))
    i = resp.info
    assert i is not None
    output.print_json(
        {
            "Kind": KINDS.get(int(i.kind), "Unknown"),
            "Name": i.name,
            "Parent": i.parent,
            "Labels": dict(i.labels),
            "Created": i.created_at,
            "Updated": i.updated_at,
        }
    )
    return 0


async def usage_(args: argparse.Namespace, client: Client) -> int:
    keys = args.keys or [i.name for i in await _infos(args, client, [])]
    rows = []
    for key in keys:
        u = await client.snapshots.usage(pb.UsageRequest(snapshotter=args.snapshotter, key=key))
        rows.append([key, str(u.size) if args.b else _binary_size(u.size), str(u.inodes)])
    output.table(["KEY", "SIZE", "INODES"], rows)
    return 0


def _binary_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def mount_commands(target: str, mounts: list[Mount]) -> list[str]:
    return [f"mount -t {m.type} {m.source} {target} -o {','.join(m.options)}" for m in mounts]


def show_mounts(args: argparse.Namespace, mounts: list[Mount]) -> None:
    """What prepare and view print: mount commands for ``--target``, or the mounts as JSON."""
    if args.target:
        print("\n".join(mount_commands(args.target, mounts)))
    elif args.mounts:
        output.print_json([{"type": m.type, "source": m.source, "options": list(m.options)} for m in mounts])


async def prepare(args: argparse.Namespace, client: Client) -> int:
    req = pb.PrepareSnapshotRequest(
        snapshotter=args.snapshotter, key=args.key, parent=args.parent, labels=output.parse_labels(args.label)
    )
    show_mounts(args, (await client.snapshots.prepare(req)).mounts)
    return 0


async def view(args: argparse.Namespace, client: Client) -> int:
    req = pb.ViewSnapshotRequest(
        snapshotter=args.snapshotter, key=args.key, parent=args.parent, labels=output.parse_labels(args.label)
    )
    show_mounts(args, (await client.snapshots.view(req)).mounts)
    return 0


async def mounts_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.snapshots.mounts(pb.MountsRequest(snapshotter=args.snapshotter, key=args.key))
    print("\n".join(mount_commands(args.target, resp.mounts)))
    return 0


async def commit_(args: argparse.Namespace, client: Client) -> int:
    req = pb.CommitSnapshotRequest(
        snapshotter=args.snapshotter, name=args.name, key=args.key, labels=output.parse_labels(args.label)
    )
    await client.snapshots.commit(req)
    return 0


async def remove(args: argparse.Namespace, client: Client) -> int:
    for key in args.keys:
        await client.snapshots.remove(pb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=key))
    return 0


async def label_(args: argparse.Namespace, client: Client) -> int:
    labels = output.parse_labels(args.labels)
    info = pb.Info(name=args.key, labels=labels)
    mask = FieldMask(paths=[f"labels.{k}" for k in labels])
    resp = await client.snapshots.update(
        pb.UpdateSnapshotRequest(snapshotter=args.snapshotter, info=info, update_mask=mask)
    )
    if resp.info is not None:
        print(output.labels(resp.info.labels, ""))
    return 0
