"""Where a shim listens, and the ``address`` file that tells the daemon.

Socket path: ``<dir>/s/<hex>`` with ``hex = sha256(join(<-address>, <namespace>, <group>))``, the
hash the Go runc shim uses, so one daemon's shims never collide and a restarted ``start`` for the same
group finds the live shim again. ``<dir>`` is the directory of the daemon's ttrpc socket
(``$TTRPC_ADDRESS``, else ``-address``): the shim's sockets sit in the daemon's own state, and under the
real containerd (``/run/containerd/containerd.sock.ttrpc``) that is ``/run/containerd/s`` as for the Go
shim. A path longer than a sockaddr_un allows falls back to ``/run/pyctrd/s``.

The ``address`` file in the bundle holds ``unix://<path>`` with no newline, written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import socket

# sun_path holds 108 bytes; Go's shim keeps 2 in reserve (NUL and the abstract-socket prefix).
SOCKET_PATH_LIMIT = 106
FALLBACK_DIR = "/run/pyctrd/s"
_UNIX = "unix://"


def socket_dir(address: str, ttrpc_address: str) -> str:
    base = ttrpc_address or address
    base = base.removeprefix(_UNIX)
    if not base or base.startswith("@"):
        return FALLBACK_DIR
    return os.path.join(os.path.dirname(os.path.abspath(base)), "s")


def socket_address(address: str, ttrpc_address: str, namespace: str, group: str) -> str:
    """``unix://<path>`` for the shim serving ``group`` in ``namespace`` of the daemon at ``address``."""
    # Go's filepath.Join cleans the result; normpath does the same for these inputs.
    key = posixpath.normpath(posixpath.join(address, namespace, group)) if address else f"{namespace}/{group}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = os.path.join(socket_dir(address, ttrpc_address), digest)
    if len(path) > SOCKET_PATH_LIMIT:
        path = os.path.join(FALLBACK_DIR, digest)
    return _UNIX + path


def socket_path(address: str) -> str:
    return address.removeprefix(_UNIX)


def new_socket(address: str) -> socket.socket:
    """A listening socket at ``address``; raises OSError(EADDRINUSE) when the path exists."""
    path = socket_path(address)
    if len(path) > SOCKET_PATH_LIMIT:
        raise OSError(errno.ENAMETOOLONG, f"{path}: socket path too long (> {SOCKET_PATH_LIMIT})")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Only the daemon's user may talk to a shim (the server checks peer credentials as well).
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def can_connect(address: str, timeout: float = 1.0) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path(address))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def remove_socket(address: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path(address))


def write_address(path: str, address: str) -> None:
    """Atomic write: a reader sees the old file or the whole new one, never a torn address."""
    tmp = os.path.join(os.path.dirname(path) or ".", ".address")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left over by a start that died half-way
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC, 0o600)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_address(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
