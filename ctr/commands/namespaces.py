"""``pyctr namespaces ls|create|rm|label``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyctr.api._pb.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    DeleteNamespaceRequest,
    ListNamespacesRequest,
    Namespace,
    UpdateNamespaceRequest,
)
from pyctr.api._pb.google.protobuf import FieldMask
from pyctr.api.errdefs import ContainerdError
from pyctr.ctr import output
from pyctr.ctr.client import Client, translate


def register(sub: Any) -> None:
    p = sub.add_parser("namespaces", aliases=["namespace", "ns"], help="manage namespaces")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list namespaces")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the names")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)

    create = verbs.add_parser("create", help="create a namespace")
    create.add_argument("name")
    create.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    create.set_defaults(func=create_)

    rm = verbs.add_parser("rm", aliases=["remove"], help="remove namespaces")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=remove)

    label = verbs.add_parser("label", help="set and clear labels (KEY= clears one)")
    label.add_argument("name")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    label.set_defaults(func=label_)


async def list_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.namespaces.list(ListNamespacesRequest())
    nss = sorted(resp.namespaces, key=lambda n: n.name)
    if args.quiet:
        for ns in nss:
            print(ns.name)
    elif args.format == "json":
        output.print_json([{"name": ns.name, "labels": dict(ns.labels)} for ns in nss])
    else:
        output.table(["NAME", "LABELS"], [[ns.name, output.labels(ns.labels, "")] for ns in nss])
    return 0


async def create_(args: argparse.Namespace, client: Client) -> int:
    ns = Namespace(name=args.name, labels=output.parse_labels(args.labels))
    await client.namespaces.create(CreateNamespaceRequest(namespace=ns))
    return 0


async def remove(args: argparse.Namespace, client: Client) -> int:
    status = 0
    for name in args.names:
        try:
            await client.namespaces.delete(DeleteNamespaceRequest(name=name))
            print(name)
        except Exception as exc:
            err = translate(exc, client.address)
            if not isinstance(err, ContainerdError):
                raise
            print(f"pyctr: unable to delete {name}: {err}", file=sys.stderr)
            status = 1
    return status


async def label_(args: argparse.Namespace, client: Client) -> int:
    lbls = output.parse_labels(args.labels)
    ns = Namespace(name=args.name, labels=lbls)
    mask = FieldMask(paths=[f"labels.{k}" for k in lbls])
    await client.namespaces.update(UpdateNamespaceRequest(namespace=ns, update_mask=mask))
    return 0
