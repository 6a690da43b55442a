"""``pyctr images pull|push|import|export|ls|check|tag|rm|inspect|mount|unmount``.

Pull and push run in the daemon (the Transfer service) and are driven from here on the lean
client (pyctr.ctr.transfer: no asyncio, grpclib or generated code to import, which took longer
than a pull of a small image). The other verbs live in pyctr.ctr.imageops, imported when one runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Awaitable, Callable

from pyctr.ctr import output
from pyctr.ctr.credentials import CredentialSource

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


def _later(name: str) -> Callable[[argparse.Namespace, Any], Awaitable[int]]:
    """The verb ``name`` of pyctr.ctr.imageops, imported when it runs."""

    async def verb(args: argparse.Namespace, client: Any) -> int:
        fn = getattr(importlib.import_module("pyctr.ctr.imageops"), name)
        return int(await fn(args, client))

    return verb


def register(sub: Any) -> None:
    p = sub.add_parser("images", aliases=["image", "i"], help="manage images")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    pull = verbs.add_parser("pull", help="pull an image from a registry (the daemon fetches and unpacks it)")
    pull.add_argument("ref")
    pull.add_argument("--platform", action="append", default=[], help="platform(s) to pull, e.g. linux/arm64")
    pull.add_argument("--all-platforms", action="store_true")
    pull.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    pull.add_argument("--no-unpack", action="store_true")
    pull.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    pull.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    _add_user(pull)
    pull.set_defaults(run=pull_)

    ls = verbs.add_parser("ls", aliases=["list"], help="list images (filters: name==…, labels.k==…)")
    ls.add_argument("filters", nargs="*")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=_later("list_"))

    tag = verbs.add_parser("tag", help="give an image another name")
    tag.add_argument("source")
    tag.add_argument("targets", nargs="+")
    tag.add_argument("--force", action="store_true")
    tag.set_defaults(func=_later("tag_"))

    rm = verbs.add_parser("rm", aliases=["delete", "del", "remove"], help="remove images")
    rm.add_argument("refs", nargs="+")
    rm.add_argument("--sync", action="store_true", help="wait for garbage collection")
    rm.set_defaults(func=_later("remove"))

    inspect = verbs.add_parser("inspect", help="show an image's record, manifest and config as JSON")
    inspect.add_argument("ref")
    inspect.set_defaults(func=_later("inspect_"))

    check = verbs.add_parser("check", help="check that an image's content is complete")
    check.add_argument("filters", nargs="*")
    check.set_defaults(func=_later("check_"))

    push = verbs.add_parser("push", help="push an image to a registry (plain HTTP for localhost)")
    push.add_argument("ref", help="where to push, e.g. 127.0.0.1:5000/library/busybox:latest")
    push.add_argument("local", nargs="?", default="", help="the local image (default: ref)")
    push.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    _add_user(push)
    push.set_defaults(run=push_)

    export = verbs.add_parser("export", help="write images to an OCI layout tar (docker-loadable)")
    export.add_argument("file")
    export.add_argument("refs", nargs="+")
    export.add_argument("--platform", action="append", default=[])
    export.add_argument("--all-platforms", action="store_true")
    export.add_argument("--skip-manifest-json", action="store_true")
    export.set_defaults(func=_later("export_"))

    imp = verbs.add_parser("import", help="import images from an OCI layout or docker-archive tar")
    imp.add_argument("file")
    imp.add_argument("--base-name", default="", help="name prefix for images named only by a tag")
    imp.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    imp.add_argument("--no-unpack", action="store_true")
    imp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    imp.set_defaults(func=_later("import_"))

    mount = verbs.add_parser("mount", help="mount an image's root filesystem read-only at TARGET")
    mount.add_argument("ref")
    mount.add_argument("target")
    mount.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    mount.set_defaults(func=_later("mount_"))

    unmount = verbs.add_parser("unmount", help="unmount an image mounted at TARGET")
    unmount.add_argument("target")
    unmount.add_argument("--rm", action="store_true", help="also remove the snapshot and its lease")
    unmount.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs")
    unmount.set_defaults(func=_later("unmount_"))


def _add_user(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-u",
        "--user",
        default="",
        metavar="USER[:PASSWORD]",
        help="registry credentials (asked for on the terminal without the password); "
        "default: $DOCKER_CONFIG/config.json or ~/.docker/config.json",
    )


# -- pull and push --------------------------------------------------------------------------------


def pull_(args: argparse.Namespace) -> int:
    from pyctr.ctr import transfer

    creds = CredentialSource.from_args(args.user)  # before anything starts: it may prompt
    wanted = [transfer.parse_platform(p) for p in args.platform]
    dest = transfer.image_store(
        labels=output.parse_labels(args.label),
        platforms=wanted,
        all_metadata=args.all_platforms,
        unpacks=[]
        if args.no_unpack
        else [(p, args.snapshotter) for p in (wanted or [transfer.host_platform()])],
    )
    view = transfer.ProgressView(sys.stdout.isatty() and not args.plain)
    destination = transfer.pblite.any_(transfer.T_IMAGE_STORE, dest)

    def build(auth_stream: str) -> tuple[bytes, bytes]:
        source = transfer.pblite.any_(transfer.T_OCI_REGISTRY, transfer.oci_registry(args.ref, auth_stream))
        return source, destination

    transfer.registry_transfer(args.address, args.namespace, args.timeout or None, creds, view, build)
    print(f"done: {args.ref} in {time.monotonic() - view.started:.2f}s")
    return 0


def push_(args: argparse.Namespace) -> int:
    from pyctr.ctr import transfer

    creds = CredentialSource.from_args(args.user)  # before anything starts: it may prompt
    view = transfer.ProgressView(sys.stdout.isatty() and not args.plain)
    source = transfer.pblite.any_(transfer.T_IMAGE_STORE, transfer.image_store(name=args.local or args.ref))

    def build(auth_stream: str) -> tuple[bytes, bytes]:
        return source, transfer.pblite.any_(
            transfer.T_OCI_REGISTRY, transfer.oci_registry(args.ref, auth_stream)
        )

    transfer.registry_transfer(args.address, args.namespace, args.timeout or None, creds, view, build)
    print(f"pushed: {args.ref} in {time.monotonic() - view.started:.2f}s")
    return 0
