"""``pyctr version``: client and server versions, as ``ctr version`` shows them."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.version import REVISION, VERSION
from pyctr.ctr import output
from pyctr.ctr.client import Client


def register(sub: Any) -> None:
    p = sub.add_parser("version", help="print the client and server versions")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=run)


async def run(args: argparse.Namespace, client: Client) -> int:
    server = await client.version.version(Empty())
    uuid = (await client.introspection.server(Empty())).uuid
    if args.format == "json":
        output.print_json(
            {
                "client": {"version": VERSION, "revision": REVISION, "python": platform.python_version()},
                "server": {"version": server.version, "revision": server.revision, "uuid": uuid},
            }
        )
        return 0
    print("Client:")
    print(f"  Version:  {VERSION}")
    print(f"  Revision: {REVISION}")
    print(f"  Python version: {platform.python_version()}")
    print()
    print("Server:")
    print(f"  Version:  {server.version}")
    print(f"  Revision: {server.revision}")
    print(f"  UUID: {uuid}")
    return 0
