"""``pyctr``: the command-line client, in the spirit of ``ctr``.

Each noun lives in ``ctr/commands/<noun>.py`` and registers its verbs on the parser; a verb is an
``async def`` taking the parsed arguments and a connected :class:`Client` (``func``), or, for the
few whose start-up time matters (``images pull|push``), a plain function of the arguments alone
(``run``) that needs no event loop.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pyctr.api import errdefs

# Each command module, the names it registers and their help. Only the module of the command
# being run is imported (with the generated messages it needs): `pyctr version` need not load
# what `pyctr images pull` does. The others are listed by name so that help and errors still
# know them.
COMMANDS: list[tuple[str, list[tuple[str, list[str], str]]]] = [
    ("version", [("version", [], "print the client and server versions")]),
    ("namespaces", [("namespaces", ["namespace", "ns"], "manage namespaces")]),
    ("plugins", [("plugins", ["plugin"], "provides information about daemon plugins")]),
    ("leases", [("leases", ["lease"], "manage leases")]),
    ("content", [("content", [], "manage content")]),
    ("snapshots", [("snapshots", ["snapshot"], "manage snapshots")]),
    ("images", [("images", ["image", "i"], "manage images")]),
    ("containers", [("containers", ["container", "c"], "manage containers")]),
    (
        "tasks",
        [
            ("tasks", ["task", "t"], "manage tasks"),
            ("ps", [], "list a task's processes"),
            ("kill", [], "signal a task (default: its stop signal, else SIGTERM)"),
            ("attach", [], "attach to a running task's stdio"),
            ("exec", [], "run another process in a running task"),
        ],
    ),
    ("run", [("run", [], "run a container from an image")]),
    ("events", [("events", ["event"], "display events (filters: topic==…, namespace==…)")]),
]
_GLOBAL_WITH_VALUE = {"-a", "--address", "-n", "--namespace", "--timeout"}
DEFAULT_ADDRESS = "/run/pyctrd/pyctrd.sock"


def default_address() -> str:
    return os.environ.get("PYCTR_ADDRESS") or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS


def _command_word(argv: Sequence[str]) -> str:
    """The first argument that is not a global option (or its value): the command."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


def _module_for(word: str) -> str:
    for module, names in COMMANDS:
        if any(word == name or word in aliases for name, aliases, _ in names):
            return module
    return ""


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser for the command in ``argv`` (default: every command, fully registered)."""
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
    wanted = None if argv is None else _module_for(_command_word(argv))
    for module, names in COMMANDS:
        if wanted is None or module == wanted:
            importlib.import_module(f"pyctr.ctr.commands.{module}").register(sub)
        else:
            for name, aliases, text in names:
                sub.add_parser(name, aliases=aliases, help=text, add_help=False)
    return p


async def _run(args: argparse.Namespace) -> int:
    from pyctr.ctr.client import Client

    client = Client(args.address, args.namespace, args.timeout or None)
    try:
        result = await args.func(args, client)
        return int(result or 0)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:
            # A verb that must start fast (pull, push): blocking, on pyctr.api.grpclite, no loop.
            return int(args.run(args) or 0)
        import uvloop

        return uvloop.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (errdefs.ContainerdError, OSError, TimeoutError, ValueError) as exc:
        from pyctr.ctr.client import translate

        err = translate(exc, args.address)
        print(f"pyctr: {err}", file=sys.stderr)
        return 1
    except Exception as exc:
        from pyctr.ctr.client import translate

        err = translate(exc, args.address)
        if err is exc:
            raise
        print(f"pyctr: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
