"""``pyctr plugins ls``: what the daemon loaded, and what failed."""

from __future__ import annotations

import argparse
from typing import Any

from pyctr.api._pb.containerd.services.introspection.v1 import Plugin, PluginsRequest
from pyctr.ctr import output
from pyctr.ctr.client import Client


def register(sub: Any) -> None:
    p = sub.add_parser("plugins", aliases=["plugin"], help="provides information about daemon plugins")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("ls", aliases=["list"], help="list plugins (filters: type==…, id==…)")
    ls.add_argument("filters", nargs="*")
    ls.add_argument("-q", "--quiet", action="store_true", help="print only the plugin ids")
    ls.add_argument("-d", "--detailed", action="store_true", help="print detailed information")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=list_)


def status(p: Plugin) -> str:
    if p.init_err is None:
        return "ok"
    return "skip" if "skip plugin" in p.init_err.message else "error"


def platforms(p: Plugin) -> str:
    if not p.platforms:
        return "-"
    return ",".join("/".join(x for x in (pl.os, pl.architecture, pl.variant) if x) for pl in p.platforms)


async def list_(args: argparse.Namespace, client: Client) -> int:
    resp = await client.introspection.plugins(PluginsRequest(filters=args.filters))
    if args.quiet:
        for p in resp.plugins:
            print(p.id)
    elif args.format == "json":
        output.print_json(
            [
                {
                    "type": p.type,
                    "id": p.id,
                    "requires": list(p.requires),
                    "platforms": platforms(p),
                    "exports": dict(p.exports),
                    "capabilities": list(p.capabilities),
                    "status": status(p),
                    "error": p.init_err.message if p.init_err else None,
                }
                for p in resp.plugins
            ]
        )
    elif args.detailed:
        for i, p in enumerate(resp.plugins):
            if i:
                print()
            print(f"Type:          {p.type}")
            print(f"ID:            {p.id}")
            if p.requires:
                print("Requires:      " + ", ".join(p.requires))
            if p.platforms:
                print(f"Platforms:     {platforms(p)}")
            for k, v in sorted(p.exports.items()):
                print(f"Export:        {k} = {v}")
            if p.capabilities:
                print("Capabilities:  " + ",".join(p.capabilities))
            if p.init_err is not None:
                print(f"Error:         {p.init_err.message} (code {p.init_err.code})")
    else:
        output.table(
            ["TYPE", "ID", "PLATFORMS", "STATUS"],
            [[p.type, p.id, platforms(p), status(p)] for p in resp.plugins],
            gap=4,
        )
    return 0
