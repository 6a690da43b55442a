"""The bundle directory: its layout, and the small files the shim writes there and reads back.

Kept free of asyncio and generated code: the ``delete`` action imports it and must start fast.

Bundle layout (``<state>/<namespace>/<id>/``, the shim's working directory)::

    config.json        OCI runtime spec               written by the daemon
    rootfs/            the mounts of CreateTaskRequest.rootfs are stacked here by the shim
    work               -> <root>/<namespace>/<id>    written by the daemon (criu work dir)
    log                FIFO: the shim's stderr        created by the daemon, opened O_WRONLY by the shim
    shim-binary-path   absolute path of the shim      written by the daemon after start
    address            unix://<socket>                written by ``start``
    shim.pid           pid of the serving shim        written by ``start`` when it spawned one
    options.json       containerd.runc.v1.Options as JSON (snake_case, zero values left out), so that
                       ``delete`` finds the runc root and binary after a crash
    runtime            runc binary name (may be empty)
    init.pid           container init pid             written by runc create
    <exec-id>.pid      exec process pid               written by runc exec, removed at exec delete
    log.json           runc's JSON log                appended by every runc command
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyctr.api.errdefs import InvalidArgument

if TYPE_CHECKING:
    from pyctr.api._pb.google.protobuf import Any as AnyMessage

INIT_PID_FILE = "init.pid"
OPTIONS_FILE = "options.json"
RUNTIME_FILE = "runtime"
DEFAULT_RUNC_ROOT = "/run/pyctrd/runc"
_OPTIONS_URL = "containerd.runc.v1.Options"


@dataclass(frozen=True, slots=True)
class RuncOptions:
    """The fields of containerd.runc.v1.Options the shim acts on."""

    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    binary_name: str = ""
    root: str = ""
    criu_path: str = ""
    systemd_cgroup: bool = False
    criu_image_path: str = ""
    criu_work_path: str = ""

    def to_json(self) -> str:
        # Go's encoding/json with the generated `json:"...,omitempty"` tags: zero values are left out.
        fields = {name: getattr(self, name) for name in self.__slots__}
        return json.dumps({k: v for k, v in fields.items() if v})

    @classmethod
    def from_json(cls, text: str) -> RuncOptions:
        data = json.loads(text or "{}")
        return cls(**{k: v for k, v in data.items() if k in cls.__slots__})


def parse_runc_options(options: AnyMessage | None) -> RuncOptions:
    """CreateTaskRequest.options (a ``containerd.runc.v1.Options`` in an Any, or nothing)."""
    if options is None or not options.type_url:
        return RuncOptions()
    url = options.type_url.removeprefix("type.googleapis.com/")
    if url != _OPTIONS_URL:
        raise InvalidArgument(f"unsupported runtime options type {url}")
    # Imported here: generated code would slow down the ``delete`` action, which never needs it.
    from pyctr.api._pb.containerd.runc.v1 import Options

    o = Options.parse(options.value)
    return RuncOptions(
        no_pivot_root=o.no_pivot_root,
        no_new_keyring=o.no_new_keyring,
        shim_cgroup=o.shim_cgroup,
        io_uid=o.io_uid,
        io_gid=o.io_gid,
        binary_name=o.binary_name,
        root=o.root,
        criu_path=o.criu_path,
        systemd_cgroup=o.systemd_cgroup,
        criu_image_path=o.criu_image_path,
        criu_work_path=o.criu_work_path,
    )


def runc_root(options_root: str, address: str, namespace: str) -> str:
    """runc's --root: Options.root, else ``runc/`` beside the daemon's socket, per namespace.

    Beside the socket keeps runc state in the daemon's own state directory (under the real containerd
    that is /run/containerd/runc, where the Go shim keeps it too); without an address it is
    /run/pyctrd/runc. ``delete`` recomputes the same path from the same flags.
    """
    if options_root:
        base = options_root
    elif address and not address.startswith("@"):
        base = os.path.join(os.path.dirname(os.path.abspath(address.removeprefix("unix://"))), "runc")
    else:
        base = DEFAULT_RUNC_ROOT
    return os.path.join(base, namespace)


def read_options(bundle: str) -> RuncOptions:
    try:
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            return RuncOptions.from_json(f.read())
    except FileNotFoundError:
        return RuncOptions()


def write_bundle_files(bundle: str, options: RuncOptions) -> None:
    for name, text in ((OPTIONS_FILE, options.to_json()), (RUNTIME_FILE, options.binary_name)):
        fd = os.open(os.path.join(bundle, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def kill_all_on_exit(bundle: str) -> bool:
    """True when the container shares a PID namespace: its processes outlive init unless killed."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return True
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return not any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
