"""``pyctr content ls|get|ingest|rm|label|active``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from pyctr.api._pb.containerd.services.content.v1 import (
    DeleteContentRequest,
    Info,
    InfoRequest,
    ListContentRequest,
    ListStatusesRequest,
    ReadContentRequest,
    UpdateRequest,
    WriteAction,
    WriteContentRequest,
)
from pyctr.api._pb.google.protobuf import FieldMask
from pyctr.ctr import output
from pyctr.ctr.client import Client
from pyctr.ctr.contentio import CHUNK, write_requests


def register(sub: Any) -> None:
    p = sub.add_parser("content", help="manage content")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list blobs (filters: digest==…, labels.k==…)")
    ls.add_argument("filters", nargs="*")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the digests")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)

    get = verbs.add_parser("get", help="write a blob to stdout")
    get.add_argument("digest")
    get.set_defaults(func=get_)

    ingest = verbs.add_parser("ingest", help="store stdin as a blob under REF")
    ingest.add_argument("ref")
    ingest.add_argument("--expected-size", type=int, default=0)
    ingest.add_argument("--expected-digest", default="")
    ingest.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    ingest.set_defaults(func=ingest_)

    rm = verbs.add_parser("rm", aliases=["delete", "del", "remove"], help="remove blobs")
    rm.add_argument("digests", nargs="+")
    rm.set_defaults(func=remove)

    label = verbs.add_parser("label", help="set and clear labels of a blob (KEY= clears one)")
    label.add_argument("digest")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    label.set_defaults(func=label_)

    fetch = verbs.add_parser("fetch-blob", help="fetch one blob by digest from a registry into the store")
    fetch.add_argument("ref", help="repository, e.g. 127.0.0.1:5000/library/busybox")
    fetch.add_argument("digest")
    fetch.add_argument("--plain-http", action="store_true", help="use http (automatic for localhost)")
    fetch.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    fetch.set_defaults(func=fetch_blob)

    active = verbs.add_parser("active", help="list ingests in progress")
    active.add_argument("filters", nargs="*")
    active.add_argument("--format", choices=["table", "json"], default="table")
    active.set_defaults(func=active_)


async def _infos(client: Client, filters: list[str]) -> list[Info]:
    out: list[Info] = []
    async for resp in client.content.list(ListContentRequest(filters=filters)):
        out.extend(resp.info)
    return out


async def list_(args: argparse.Namespace, client: Client) -> int:
    infos = await _infos(client, args.filters)
    if args.quiet:
        for info in infos:
            print(info.digest)
    elif args.format == "json":
        output.print_json(
            [
                {
                    "digest": i.digest,
                    "size": i.size,
                    "created_at": i.created_at,
                    "updated_at": i.updated_at,
                    "labels": dict(i.labels),
                }
                for i in infos
            ]
        )
    else:
        output.table(
            ["DIGEST", "SIZE", "AGE", "LABELS"],
            [
                [i.digest, output.human_size(i.size), output.age(i.created_at), output.labels(i.labels)]
                for i in infos
            ],
            gap=2,
        )
    return 0


async def get_(args: argparse.Namespace, client: Client) -> int:
    info = (await client.content.info(InfoRequest(digest=args.digest))).info
    size = info.size if info else 0
    out = sys.stdout.buffer
    got = 0
    async for resp in client.content.read(ReadContentRequest(digest=args.digest, offset=0, size=size)):
        out.write(resp.data)
        got += len(resp.data)
    out.flush()
    if got != size:
        raise OSError(f"short read: {got} of {size} bytes")
    return 0


async def ingest_(args: argparse.Namespace, client: Client) -> int:
    labels = output.parse_labels(args.label)
    src = sys.stdin.buffer
    digest = ""
    # The stream starts at offset 0: an earlier partial ingest of this ref is truncated, as ctr does
    # when it cannot seek its input.
    requests = write_requests(args.ref, src, args.expected_size, args.expected_digest, labels)
    async for resp in client.content.write(requests):
        digest = resp.digest or digest
    print(digest, file=sys.stderr if os.isatty(1) else sys.stdout)
    return 0


async def remove(args: argparse.Namespace, client: Client) -> int:
    for dgst in args.digests:
        await client.content.delete(DeleteContentRequest(digest=dgst))
        print(dgst)
    return 0


async def label_(args: argparse.Namespace, client: Client) -> int:
    labels = output.parse_labels(args.labels)
    info = Info(digest=args.digest, labels=labels)
    mask = FieldMask(paths=[f"labels.{k}" for k in labels])
    resp = await client.content.update(UpdateRequest(info=info, update_mask=mask))
    if resp.info is not None:
        print(output.labels(resp.info.labels, ""))
    return 0


async def active_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.content.list_statuses(ListStatusesRequest(filters=args.filters))
    if args.format == "json":
        output.print_json(
            [
                {
                    "ref": s.ref,
                    "offset": s.offset,
                    "total": s.total,
                    "expected": s.expected,
                    "started_at": s.started_at,
                }
                for s in resp.statuses
            ]
        )
    else:
        output.table(
            ["REF", "SIZE", "AGE"],
            [[s.ref, output.human_size(s.offset), output.age(s.started_at)] for s in resp.statuses],
        )
    return 0


# -- fetch-blob --------------------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, str]:
    """(registry host, repository path) with docker's defaults for a short name."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", ref
        if "/" not in path:
            path = "library/" + path
    path = path.split("@", 1)[0].rsplit(":", 1)[0] if ":" in path.split("/")[-1] or "@" in path else path
    return ("registry-1.docker.io" if domain == "docker.io" else domain), path


def _open_blob(url: str, scope: str) -> Any:
    """GET ``url``, answering one Bearer challenge with an anonymous token."""
    import json as jsonmod
    import re
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=30)
    except urllib.error.HTTPError as exc:
        challenge = exc.headers.get("WWW-Authenticate", "") if exc.code == 401 else ""
        if not challenge.lower().startswith("bearer"):
            raise
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = urllib.parse.urlencode(
            {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        )
        with urllib.request.urlopen(f"{params['realm']}?{query}", timeout=30) as resp:
            body = jsonmod.loads(resp.read())
        token = body.get("token") or body.get("access_token", "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        return urllib.request.urlopen(request, timeout=30)


async def fetch_blob(args: argparse.Namespace, client: Client) -> int:
    host, path = _split_ref(args.ref)
    local = host.startswith(("localhost", "127.", "[::1]"))
    scheme = "http" if args.plain_http or local else "https"
    url = f"{scheme}://{host}/v2/{path}/blobs/{args.digest}"
    loop = asyncio.get_running_loop()
    resp = await loop.run_in_executor(None, _open_blob, url, f"repository:{path}:pull")
    size = int(resp.headers.get("Content-Length") or 0)

    async def requests() -> AsyncIterator[WriteContentRequest]:
        ref = f"fetch-blob-{args.digest}"
        yield WriteContentRequest(action=WriteAction.STAT, ref=ref, total=size, expected=args.digest)
        offset = 0
        try:
            while data := await loop.run_in_executor(None, resp.read, CHUNK):
                yield WriteContentRequest(action=WriteAction.WRITE, ref=ref, offset=offset, data=data)
                offset += len(data)
        finally:
            resp.close()
        yield WriteContentRequest(
            action=WriteAction.COMMIT,
            ref=ref,
            offset=offset,
            total=offset,
            expected=args.digest,
            labels=output.parse_labels(args.label),
        )

    try:
        async for _ in client.content.write(requests()):
            pass
    except Exception as exc:
        if "already exists" not in str(exc):
            raise
    print(args.digest)
    return 0
