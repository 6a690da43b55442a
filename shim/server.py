"""The serving shim process: subreaper, log FIFO as stderr, then the keeper on fd 3.

Start-up order (runtime/v2/shim/shim.go): become a child subreaper before any container process can
be orphaned to us; point stderr at the bundle's ``log`` FIFO (the daemon holds it open O_RDWR and
copies it to its own log); then hand over to the keeper (keeper.py). SIGTERM/SIGINT stop the server
and exit, leaving containers running; the ``Shutdown`` RPC exits only when no container is left. On
exit the socket named in ``address`` is removed and queued events get up to 5 s to reach the daemon.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import time
from typing import NoReturn

from pyctr.shim import address as shim_address
from pyctr.shim import keeper

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
LISTEN_FD = 3


# Resolved at import (in the launcher): a ctypes lookup after the fork costs every shim private pages.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_SHIM_NAME = ctypes.c_char_p(b"pyrunc-shim")


def set_subreaper() -> None:
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    # A name for ps/top: a forked shim's command line is still the launcher's.
    _prctl(PR_SET_NAME, _SHIM_NAME, 0, 0, 0)


class _FifoHandler(logging.Handler):
    """Writes records to fd 2 without ever blocking: a full or reader-less FIFO drops the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            os.write(2, line.encode(errors="replace"))
        except OSError:
            pass  # EAGAIN (daemon not reading), EPIPE (daemon gone): logs are best effort
        except Exception:
            self.handleError(record)


class _LogfmtFormatter(logging.Formatter):
    """logrus-style lines, which the daemon's log reader passes on as-is."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        msg = msg.replace("\\", "\\\\").replace('"', '\\"')
        return f'time="{stamp}.{int(record.msecs):03d}" level={record.levelname.lower()} msg="{msg}" runtime=pyrunc'


def open_log_fifo(bundle: str) -> None:
    """dup2s ``<bundle>/log`` onto fd 2 (non-blocking); keeps /dev/null when there is none."""
    path = os.path.join(bundle, "log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        # ENOENT: a daemon that keeps no log FIFO; ENXIO: nobody reads it (the daemon died meanwhile).
        if exc.errno not in (errno.ENOENT, errno.ENXIO):
            raise
        return
    os.dup2(fd, 2)  # dup2 clears close-on-exec on fd 2; runc gets its own stdio anyway
    os.close(fd)


def setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    level = logging.DEBUG if debug else logging.INFO
    if root.level == level and len(root.handlers) == 1 and isinstance(root.handlers[0], _FifoHandler):
        return  # set up by the launcher already: setLevel would rewrite every logger's cache
    handler = _FifoHandler()
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def listener(socket_flag: str) -> socket.socket:
    if socket_flag:
        return shim_address.new_socket(socket_flag if "://" in socket_flag else "unix://" + socket_flag)
    sock = socket.socket(fileno=LISTEN_FD)
    # Inherited without close-on-exec: keep it out of runc and the containers.
    os.set_inheritable(LISTEN_FD, False)
    return sock


def serve(namespace: str, address: str, socket_flag: str = "", debug: bool = False) -> NoReturn:
    """The shim's main loop; never returns. The working directory is the bundle."""
    bundle = os.getcwd()
    set_subreaper()
    open_log_fifo(bundle)
    setup_logging(debug)
    keeper.serve(namespace, address, listener(socket_flag), bundle, socket_flag)
    raise AssertionError("keeper.serve returned")  # for the type checker: it never returns
