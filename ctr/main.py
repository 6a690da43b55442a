"""``pyctr``: the command-line client, in the spirit of ``ctr``.

Each noun lives in ``ctr/commands/<noun>.py`` and registers its verbs on the parser; a verb is an
``async def`` taking the parsed arguments and a connected :class:`Client`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pyctr.api import errdefs
from pyctr.ctr.client import Client, default_address, translate
from pyctr.ctr.commands import (
    containers,
    content,
    events,
    images,
    leases,
    namespaces,
    plugins,
    run,
    snapshots,
    tasks,
    version,
)

COMMANDS = [version, namespaces, plugins, leases, content, snapshots, images, containers, tasks, run, events]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyctr", description="pyctr: a client for pyctrd and containerd")
    p.add_argument(
        "-a",
        "--address",
        default=default_address(),
        help="address of the daemon's socket (env PYCTR_ADDRESS)",
    )
    p.add_argument(
        "-n",
        "--namespace",
        default=os.environ.get("CONTAINERD_NAMESPACE") or "default",
        help="namespace to use (env CONTAINERD_NAMESPACE)",
    )
    p.add_argument("--timeout", type=float, default=0.0, help="timeout for each call in seconds (0: none)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        mod.register(sub)
    return p


async def _run(args: argparse.Namespace) -> int:
    client = Client(args.address, args.namespace, args.timeout or None)
    try:
        result = await args.func(args, client)
        return int(result or 0)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (errdefs.ContainerdError, OSError, TimeoutError, ValueError) as exc:
        err = translate(exc, args.address)
        print(f"pyctr: {err}", file=sys.stderr)
        return 1
    except Exception as exc:
        err = translate(exc, args.address)
        if err is exc:
            raise
        print(f"pyctr: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
