"""Container stdio: pipes (or a pty) on the process side, the client's FIFOs or files on the other.

The client (ctr, CRI) creates the FIFOs and opens its own ends first. The shim must never block the
loop opening them, which plain ``open()`` would (``O_WRONLY`` on a FIFO waits for a reader):

* stdout/stderr FIFO: open ``O_RDONLY|O_NONBLOCK`` first (never blocks), then ``O_WRONLY|O_NONBLOCK``,
  which succeeds because our own reader exists. Holding that reader also means a write never fails
  with EPIPE when the client goes away: the pipe fills and the copy waits, as in the Go shim.
* stdin FIFO: open ``O_RDONLY|O_NONBLOCK`` and also hold an ``O_WRONLY`` end, so the copy sees EOF
  only after CloseIO drops our writer *and* the client closed its own (a client may reconnect).
* a path that is not a FIFO (``file://`` URIs) is a regular file opened for appending.

A worker sets this up around ``runc create``/``runc exec`` and hands the fds to the keeper, which
does the copying (keeper.py: ``OutCopy``, ``InCopy``). When a process exits the keeper waits
(bounded) for the output copies to reach EOF and for the client to read what is left in its FIFO,
before the process is reported exited: a client that stops reading at Wait has all the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pyctr.api.errdefs import InvalidArgument, NotImplementedErr

_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_sink(path: str) -> tuple[int, int]:
    """A client output, opened without blocking: ``(write fd, our own reader or -1 for a file)``."""
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC), -1
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), reader
    except BaseException:
        _close(reader)
        raise


def _resolve_outputs(stdio: Stdio) -> Stdio:
    """Applies the stdout URI scheme: a bare path is a FIFO (or file), ``file://`` one log file for both."""
    if not stdio.stdout:
        return stdio
    uri = urlparse(stdio.stdout)
    if uri.scheme in ("", "fifo"):
        return stdio
    if uri.scheme == "file":
        os.makedirs(os.path.dirname(uri.path), mode=0o755, exist_ok=True)
        os.close(os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644))
        return Stdio(stdio.stdin, uri.path, uri.path, stdio.terminal)
    if uri.scheme == "binary":
        raise NotImplementedErr(
            f"stdio {stdio.stdout}: binary logging drivers are not supported by this shim"
        )
    raise InvalidArgument(f"unknown STDIO scheme {uri.scheme}")


class ProcessIO:
    """The stdio of one process, in the worker that starts it. Lifecycle: construct, hand
    ``runc_stdio()`` to runc (or use a console socket), ``close_runc_ends()``, then ``hand_over()``
    the fds to the keeper, or ``close()`` everything when the start failed.
    """

    def __init__(self, stdio: Stdio, *, uid: int = 0, gid: int = 0) -> None:
        self.stdio = _resolve_outputs(stdio)
        # (process end, shim end) per stream; -1 = none. Process ends go to runc, shim ends are copied.
        self._pipes: dict[str, tuple[int, int]] = {}
        self._stdin_reader = -1  # client FIFO, read by the stdin copy
        self._stdin_holder = -1  # our writer on that FIFO, dropped by CloseIO
        self._closed = False
        self._stdin_closed = False
        if stdio.terminal:
            return
        try:
            for name, wanted in (("stdin", stdio.stdin), ("stdout", stdio.stdout), ("stderr", stdio.stderr)):
                if not wanted:
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                with contextlib.suppress(OSError):
                    fcntl.fcntl(r, _F_SETPIPE_SZ, _PIPE_SIZE)
                proc_end, shim_end = (r, w) if name == "stdin" else (w, r)
                self._pipes[name] = (proc_end, shim_end)
                os.set_blocking(shim_end, False)
                if uid or gid:
                    os.fchown(proc_end, uid, gid)
        except BaseException:
            for proc_end, shim_end in self._pipes.values():
                _close(proc_end)
                _close(shim_end)
            raise

    def runc_stdio(self) -> tuple[int, int, int] | None:
        """fds 0-2 for runc and the process; None when nothing is attached (runc then gets /dev/null)."""
        if self.stdio.terminal or not self._pipes:
            return None
        devnull = _devnull()
        return (
            self._pipes.get("stdin", (devnull, -1))[0],
            self._pipes.get("stdout", (devnull, -1))[0],
            self._pipes.get("stderr", (devnull, -1))[0],
        )

    def close_runc_ends(self) -> None:
        """After runc ran: only the process may hold these, or EOF never reaches the copies."""
        for name, (proc_end, shim_end) in list(self._pipes.items()):
            _close(proc_end)
            self._pipes[name] = (-1, shim_end)

    def open_stdin(self) -> None:
        """Opens the client's stdin FIFO: our reader for the copy, our writer held until CloseIO."""
        if not self.stdio.stdin:
            return
        self._stdin_reader = os.open(self.stdio.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not self._stdin_closed:  # CloseIO may come before an exec is started
            self._stdin_holder = os.open(self.stdio.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def hand_over(self, console: int = -1) -> tuple[dict[str, Any], list[int]]:
        """Opens the client's side and gives the fds away (the keeper copies; see keeper.py).
        ``console`` is the pty master in terminal mode. Returns a description whose numbers index
        the fd list::

            out      [(source, sink, sink's own reader)]   source -1 = the console; reader -1 = a file
            in       (client FIFO reader, destination) | None   destination -1 = the console
            console  the pty master, or -1
            holder   our writer on the stdin FIFO (closed by CloseIO), or -1

        The fds stay open here too until this process exits (a worker exits right after sending).
        """
        stdio = self.stdio
        fds: list[int] = []

        def add(fd: int) -> int:
            if fd < 0:
                return -1
            fds.append(fd)
            return len(fds) - 1

        desc: dict[str, Any] = {"out": [], "in": None, "console": add(console), "holder": -1}
        for name, path in (("stdout", stdio.stdout), ("stderr", stdio.stderr)):
            if not path or (stdio.terminal and name == "stderr"):
                continue
            if stdio.terminal:
                source = -1
            elif name in self._pipes:
                source = add(self._pipes[name][1])
            else:
                continue
            sink, reader = _open_sink(path)
            desc["out"].append((source, add(sink), add(reader)))
        self.open_stdin()
        if self._stdin_reader >= 0:
            if stdio.terminal:
                desc["in"] = (add(self._stdin_reader), -1)
            elif "stdin" in self._pipes:
                desc["in"] = (add(self._stdin_reader), add(self._pipes["stdin"][1]))
            desc["holder"] = add(self._stdin_holder)
        return desc, fds

    def close_stdin(self) -> None:
        """CloseIO: drop our writer so the copy reaches EOF once the client closes its own."""
        self._stdin_closed = True
        _close(self._stdin_holder)
        self._stdin_holder = -1

    def close(self) -> None:
        """After a failed start: everything, including stdin."""
        if self._closed:
            return
        self._closed = True
        for proc_end, shim_end in self._pipes.values():
            _close(proc_end)
            _close(shim_end)
        self._pipes.clear()
        for fd in (self._stdin_reader, self._stdin_holder):
            _close(fd)
        self._stdin_reader = self._stdin_holder = -1


_DEVNULL = -1


def _devnull() -> int:
    """One /dev/null fd for the shim's lifetime (close-on-exec; runc gets it via dup2)."""
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _DEVNULL


class ConsoleSocket:
    """runc's ``--console-socket``: runc connects and sends the pty master over SCM_RIGHTS."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        self._dir = tempfile.mkdtemp(prefix="pty", dir=base)
        self.path = os.path.join(self._dir, "pty.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def receive_master(self, limit: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit):
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                conn.setblocking(False)
                while True:
                    try:
                        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                        break
                    except BlockingIOError:
                        await wait_readable(conn.fileno())
        if not fds:
            raise RuntimeError("console socket: runc sent no pty master")
        for extra in fds[1:]:
            _close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
