"""containerd-shim-pyrunc-v2: a containerd runtime v2 shim driving runc.

    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-debug] start    (cwd = bundle)
    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-bundle B] delete
    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-socket S]     (serve, fd 3 listens)

Flags follow Go's ``flag`` package: ``-x v``, ``-x=v``, ``--x``; parsing stops at the first positional
argument, the action. ``start`` and ``delete`` run once per container create/delete, so this module
imports nothing heavy: the task service is imported only by the serving process (or already lives in
the warm launcher that forks it, see launcher.py).

``start``: see :mod:`pyctr.shim.start` (the daemon runs the same code in-process for its own shim);
it prints the address. containerd reads stdout+stderr to EOF, so nothing else may be printed and the
server must not inherit either.

``delete``: cleanup after a dead shim; ``runc delete --force``, unmount the rootfs, print a binary
``DeleteResponse{pid, exit_status=137, exited_at=now}``. Idempotent, and fast (the daemon kills it
after 5 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

from pyctr.api import pblite as pw
from pyctr.api.binaries import find_binary
from pyctr.api.mount import unmount_all
from pyctr.shim.bundle import INIT_PID_FILE, read_options, read_pid_file, runc_root

NAME = "containerd-shim-pyrunc-v2"
_SIGKILL_STATUS = 128 + 9


class UsageError(Exception):
    pass


@dataclass
class Flags:
    namespace: str = ""
    id: str = ""
    address: str = ""
    publish_binary: str = "containerd"
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    help: bool = False
    args: list[str] = field(default_factory=list)


_STRING_FLAGS = {
    "namespace": "namespace",
    "id": "id",
    "address": "address",
    "publish-binary": "publish_binary",
    "bundle": "bundle",
    "socket": "socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "h": "help", "help": "help"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def parse_flags(argv: list[str]) -> Flags:
    """Go ``flag.Parse`` semantics for the shim's flags; raises UsageError as Go would exit 2."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break  # first positional argument: the action
        i += 1
        if arg == "--":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = name.partition("=")
        if name in _BOOL_FLAGS:
            if has_value and value not in _TRUE | _FALSE:
                raise UsageError(f'invalid boolean value "{value}" for -{name}')
            setattr(flags, _BOOL_FLAGS[name], not has_value or value in _TRUE)
        elif name in _STRING_FLAGS:
            if not has_value:
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            setattr(flags, _STRING_FLAGS[name], value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    flags.args = argv[i:]
    return flags


USAGE = f"""Usage of {NAME}:
  -address string       grpc address back to main containerd
  -bundle string        path to the bundle if not workdir
  -debug                enable debug output in logs
  -id string            id of the task
  -namespace string     namespace that owns the shim
  -publish-binary string  path to publish binary (used for publishing events) (default "containerd")
  -socket string        socket path to serve
  -v                    show the shim version and exit
"""


def _version() -> str:
    try:
        from pyctr.api import version

        return str(getattr(version, "VERSION", getattr(version, "__version__", "")))
    except ImportError:
        return ""


def _read_options() -> bytes:
    """The runtime options (a binary Any) containerd writes on stdin; b"" when none."""
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    return sys.stdin.buffer.read()


def start(flags: Flags) -> int:
    from pyctr.shim import start as shim_start

    if not flags.id:
        raise UsageError("shim id cannot be empty")
    addr = shim_start.start(
        namespace=flags.namespace,
        id=flags.id,
        address=flags.address,
        bundle=os.getcwd(),
        env=os.environ,
        options=_read_options(),
        debug=flags.debug,
    )
    sys.stdout.write(addr)
    return 0


def _runc_binary(bundle: str, binary_name: str) -> str:
    try:
        with open(os.path.join(bundle, "runtime")) as f:
            name = f.read().strip()
    except OSError:
        name = ""
    return find_binary(name or binary_name or "runc")


def delete(flags: Flags) -> int:
    bundle = flags.bundle or os.path.join(os.path.dirname(os.getcwd()), flags.id)
    options = read_options(bundle)
    root = runc_root(options.root, flags.address, flags.namespace)
    argv = [_runc_binary(bundle, options.binary_name), "--root", root]
    argv += ["--log", os.path.join(bundle, "log.json"), "--log-format", "json", "delete", "--force", flags.id]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=4, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            # A container that is already gone is the idempotent case; warn on stderr (the daemon logs it).
            sys.stderr.write(
                f"failed to remove runc container: {result.stderr.decode(errors='replace').strip()}\n"
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.stderr.write(f"failed to remove runc container: {exc}\n")
    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as exc:
        sys.stderr.write(f"failed to cleanup rootfs mount: {exc}\n")
    pid = 0
    try:
        pid = read_pid_file(os.path.join(bundle, INIT_PID_FILE))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"failed to read init pid file: {exc}\n")
    response = pw.uint(1, pid) + pw.uint(2, _SIGKILL_STATUS) + pw.message(3, pw.timestamp(time.time()))
    sys.stdout.buffer.write(response)
    sys.stdout.buffer.flush()
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(argv)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n{USAGE}")
        sys.exit(2)
    if flags.help:
        sys.stderr.write(USAGE)
        sys.exit(0)
    if flags.version:
        sys.stdout.write(
            f"{NAME}:\n  Version:  {_version()}\n  Revision: \n  Python version: {sys.version.split()[0]}\n\n"
        )
        sys.exit(0)
    if not flags.namespace:
        sys.stderr.write("shim namespace cannot be empty\n")
        sys.exit(1)
    action = flags.args[0] if flags.args else ""
    try:
        if action == "start":
            sys.exit(start(flags))
        if action == "delete":
            sys.exit(delete(flags))
        if action:
            raise UsageError(f"unknown action {action!r}")
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
    except Exception as exc:
        # The daemon shows the combined output of a failed start: keep it to one line.
        sys.stderr.write(f"{NAME} {action}: {exc}\n")
        sys.exit(1)
    from pyctr.shim.server import serve

    serve(flags.namespace, flags.address, flags.socket, flags.debug)
    raise AssertionError("serve returned")  # for the type checker: serve() never returns


if __name__ == "__main__":
    main()
