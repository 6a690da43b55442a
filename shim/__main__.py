"""containerd-shim-pyrunc-v2: a containerd runtime v2 shim driving runc.

    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-debug] start    (cwd = bundle)
    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-bundle B] delete
    containerd-shim-pyrunc-v2 -namespace NS -id ID -address ADDR [-socket S]     (serve, fd 3 listens)

Flags follow Go's ``flag`` package: ``-x v``, ``-x=v``, ``--x``; parsing stops at the first positional
argument, the action. ``start`` and ``delete`` run once per container create/delete, so this module
imports nothing heavy: the task service is imported only by the serving process (or already lives in
the warm launcher that forks it, see launcher.py).

``start``: listens on the shim socket (or finds the live shim of the same group), writes ``address``
and ``shim.pid`` into the bundle, gets a serving process with the listener as fd 3 (forked by the
launcher, else a fresh interpreter), applies ``shim_cgroup`` from the options on stdin and an OOM score
one above the daemon's, prints the address. containerd reads stdout+stderr to EOF, so nothing else may
be printed and the server must not inherit either.

``delete``: cleanup after a dead shim; ``runc delete --force``, unmount the rootfs, print a binary
``DeleteResponse{pid, exit_status=137, exited_at=now}``. Idempotent, and fast (the daemon kills it
after 5 s).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

from pyctr.shim import protowire as pw
from pyctr.shim.bundle import INIT_PID_FILE, find_binary, read_options, read_pid_file, runc_root
from pyctr.shim.mount import unmount_all

NAME = "containerd-shim-pyrunc-v2"
# config.json annotations that put several containers in one shim (a pod), as in the runc shim.
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
_OPTIONS_URL = "containerd.runc.v1.Options"
_SIGKILL_STATUS = 128 + 9
SHIM_PID_FILE = "shim.pid"


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


def _group(bundle: str, id: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        return id
    for label in GROUP_LABELS:
        if annotations.get(label):
            return str(annotations[label])
    return id


def _read_shim_cgroup() -> str:
    """Options.shim_cgroup from the binary Any containerd writes on stdin ("" when none)."""
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    data = sys.stdin.buffer.read()
    if not data:
        return ""
    url, value = "", b""
    for number, raw in pw.fields(data):
        if number == 1 and isinstance(raw, bytes):
            url = raw.decode()
        elif number == 2 and isinstance(raw, bytes):
            value = raw
    if url.removeprefix("type.googleapis.com/") != _OPTIONS_URL:
        return ""
    for number, raw in pw.fields(value):
        if number == 3 and isinstance(raw, bytes):
            return raw.decode()
    return ""


def _join_cgroup(pid: int, cgroup: str) -> None:
    root = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        targets = [os.path.join(root, cgroup.lstrip("/"))]
    else:
        targets = [
            os.path.join(root, entry, cgroup.lstrip("/"))
            for entry in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, entry, cgroup.lstrip("/")))
        ]
        if not targets:
            raise OSError(errno.ENOENT, f"cgroup {cgroup} does not exist")
    for target in targets:
        with open(os.path.join(target, "cgroup.procs"), "w") as f:
            f.write(str(pid))


def _adjust_oom_score(pid: int) -> None:
    """The shim dies before the daemon under memory pressure: the daemon's score + 1, as containerd."""
    with open("/proc/self/oom_score_adj") as f:
        score = int(f.read().strip())
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))


def _write_pid(path: str, pid: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _server_argv(flags: Flags) -> list[str]:
    argv = ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.debug:
        argv.append("-debug")
    return argv


def _exec_server(argv: list[str], listener_fd: int) -> int:
    """Fallback: a fresh interpreter (~20 MiB private memory instead of ~6.6 for a forked one)."""
    from pyctr.shim.launcher import spawn_detached

    # The working directory (the bundle) is inherited.
    return spawn_detached([sys.executable, "-m", "pyctr.shim", *argv], listener_fd)


def start(flags: Flags) -> int:
    # Here, not at the top: hashlib loads OpenSSL, which `delete` (run after every task delete) skips.
    from pyctr.shim import address as shim_address

    if not flags.id:
        raise UsageError("shim id cannot be empty")
    bundle = os.getcwd()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    addr = shim_address.socket_address(
        flags.address, ttrpc_address, flags.namespace, _group(bundle, flags.id)
    )
    address_file = os.path.join(bundle, "address")
    try:
        sock = shim_address.new_socket(addr)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if shim_address.can_connect(addr):
            # The group's shim is alive: it serves this container too.
            shim_address.write_address(address_file, addr)
            sys.stdout.write(addr)
            return 0
        shim_address.remove_socket(addr)
        sock = shim_address.new_socket(addr)
    pid = 0
    try:
        shim_address.write_address(address_file, addr)
        argv = _server_argv(flags)
        if os.environ.get("PYCTR_SHIM_LAUNCHER", "1") != "0":
            from pyctr.shim import launcher

            try:
                # One launcher per socket directory, i.e. per daemon.
                sockdir = os.path.dirname(shim_address.socket_path(addr))
                pid = launcher.launch(sockdir, argv, bundle, sock.fileno())
            except launcher.Unavailable:
                pid = 0  # fall back to a fresh interpreter below
        if not pid:
            pid = _exec_server(argv, sock.fileno())
        _write_pid(os.path.join(bundle, SHIM_PID_FILE), pid)
        shim_cgroup = _read_shim_cgroup()
        if shim_cgroup:
            _join_cgroup(pid, shim_cgroup)
        _adjust_oom_score(pid)
    except BaseException:
        sock.close()
        shim_address.remove_socket(addr)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        raise
    sock.close()
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
