"""``start``: bring up the shim serving one container and return the address to dial.

Used two ways. The ``start`` action of ``containerd-shim-pyrunc-v2`` (as containerd runs it, in the
bundle, with the runtime options on stdin) calls :func:`start` with its cwd, environment and stdin. The
daemon calls it in-process for its own shim (see ``pyctr.daemon.runtime.shim``): the same steps, without
the cost of exec'ing a fresh interpreter for them on every container create.

Steps: listen on the shim socket (or find the live shim of the same group), write ``address`` and
``shim.pid`` into the bundle, get a serving process with the listener as fd 3 (forked by the launcher,
else a fresh interpreter when ``exec_fallback``), apply ``shim_cgroup`` from the options and an OOM
score one above the caller's.

This module imports nothing heavy: ``start`` runs once per container create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Mapping

from pyctr.api import pblite as pw

# config.json annotations that put several containers in one shim (a pod), as in the runc shim.
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
SHIM_PID_FILE = "shim.pid"
_OPTIONS_URL = "containerd.runc.v1.Options"


class NoLauncher(Exception):
    """No launcher could fork the shim, and the caller asked for no fallback."""


def group(bundle: str, id: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            data = f.read()
    except OSError:
        return id
    if not any(label.encode() in data for label in GROUP_LABELS):
        return id  # the common case: no need to parse the whole spec
    try:
        annotations = json.loads(data).get("annotations") or {}
    except ValueError:
        return id
    for label in GROUP_LABELS:
        if annotations.get(label):
            return str(annotations[label])
    return id


def shim_cgroup(options: bytes) -> str:
    """Options.shim_cgroup from the binary Any containerd passes ("" when none)."""
    url, value = pw.unpack_any(options)
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
    """The shim dies before the daemon under memory pressure: the caller's score + 1, as containerd."""
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


def server_argv(namespace: str, id: str, address: str, debug: bool) -> list[str]:
    argv = ["-namespace", namespace, "-id", id, "-address", address]
    if debug:
        argv.append("-debug")
    return argv


def _exec_server(argv: list[str], listener_fd: int) -> int:
    """Fallback: a fresh interpreter (about three times the private memory of a forked one)."""
    from pyctr.shim.launcher import spawn_detached

    # The working directory (the bundle) is inherited: only the CLI's `start`, run in the bundle, gets here.
    return spawn_detached([sys.executable, "-m", "pyctr.shim", *argv], listener_fd)


def start(
    *,
    namespace: str,
    id: str,
    address: str,
    bundle: str,
    env: Mapping[str, str],
    options: bytes = b"",
    debug: bool = False,
    exec_fallback: bool = True,
    interpreter: str = "",
) -> str:
    """Starts (or finds) the shim of ``id``'s group; returns its ``unix://`` address. The launcher
    runs on ``interpreter`` (default: ours).

    Raises :class:`NoLauncher` (having undone everything) when the launcher is unavailable and
    ``exec_fallback`` is false; other failures raise OSError and the like.
    """
    from pyctr.shim import address as shim_address  # hashlib loads OpenSSL, which `delete` skips

    addr = shim_address.socket_address(address, env.get("TTRPC_ADDRESS", ""), namespace, group(bundle, id))
    address_file = os.path.join(bundle, "address")
    try:
        sock = shim_address.new_socket(addr)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if shim_address.can_connect(addr):
            # The group's shim is alive: it serves this container too.
            shim_address.write_address(address_file, addr)
            return addr
        shim_address.remove_socket(addr)
        sock = shim_address.new_socket(addr)
    pid = 0
    try:
        shim_address.write_address(address_file, addr)
        argv = server_argv(namespace, id, address, debug)
        if env.get("PYCTR_SHIM_LAUNCHER", "1") != "0":
            from pyctr.shim import launcher

            try:
                # One launcher per socket directory, i.e. per daemon.
                sockdir = os.path.dirname(shim_address.socket_path(addr))
                pid = launcher.launch(sockdir, argv, bundle, sock.fileno(), env=env, interpreter=interpreter)
            except launcher.Unavailable as exc:
                if not exec_fallback:
                    raise NoLauncher(str(exc)) from exc
        if not pid:
            if not exec_fallback:
                raise NoLauncher("the launcher is disabled")
            pid = _exec_server(argv, sock.fileno())
        _write_pid(os.path.join(bundle, SHIM_PID_FILE), pid)
        cgroup = shim_cgroup(options) if options else ""
        if cgroup:
            _join_cgroup(pid, cgroup)
        _adjust_oom_score(pid)
    except BaseException:
        sock.close()
        shim_address.remove_socket(addr)
        with contextlib.suppress(OSError):
            os.unlink(address_file)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        raise
    sock.close()
    return addr
