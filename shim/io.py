"""Container stdio: pipes (or a pty) on the process side, the client's FIFOs or files on the other.

The client (ctr, CRI) creates the FIFOs and opens its own ends first. The shim must never block the
loop opening them, which plain ``open()`` would (``O_WRONLY`` on a FIFO waits for a reader):

* stdout/stderr FIFO: open ``O_RDONLY|O_NONBLOCK`` first (never blocks), then ``O_WRONLY|O_NONBLOCK``,
  which succeeds because our own reader exists. Holding that reader also means a write never fails
  with EPIPE when the client goes away: the pipe fills and the copy waits, as in the Go shim.
* stdin FIFO: open ``O_RDONLY|O_NONBLOCK`` and also hold an ``O_WRONLY`` end, so the copy sees EOF
  only after CloseIO drops our writer *and* the client closed its own (a client may reconnect).
* a path that is not a FIFO (``file://`` URIs) is a regular file opened for appending.

Copies run as loop tasks over non-blocking fds with ``add_reader``/``add_writer``. When a process
exits, :meth:`ProcessIO.finish` waits (bounded) for the output copies to reach EOF and then closes
the client's write ends, before the process is reported exited: a client that stops reading at Wait
has all the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import termios
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pyctr.api.errdefs import InvalidArgument, NotImplementedErr

# How long output may wait in a client's FIFO for the client to read it, once the process is done.
DRAIN_TIMEOUT = 1.5

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


async def wait_fd(fd: int, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def read_some(fd: int) -> bytes:
    """The next chunk from a non-blocking fd; b"" at EOF (EIO from a pty master counts as EOF)."""
    while True:
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:
            await wait_fd(fd)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await wait_fd(fd, write=True)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Sink:
    """A client output (FIFO or file), shared when stdout and stderr name the same file."""

    def __init__(self, path: str) -> None:
        self.users = 1
        self.reader = -1
        if stat.S_ISFIFO(os.stat(path).st_mode):
            self.reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except BaseException:
                _close(self.reader)
                raise
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    async def drained(self, timeout: float) -> None:
        """Wait (bounded) until the client has read what is still in the FIFO.

        Our own reader keeps the FIFO open; closing it while the client has not opened its end
        yet would throw away the output still in the pipe. The Go shim avoids that by waiting for
        the client's reader in Start; here the wait happens at the end, and only while unread
        bytes remain.
        """
        if self.reader < 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A reading client usually empties the FIFO within a millisecond: poll fast first (each poll
        # here delays the exit report, and so the client's Wait), then back off to every 10 ms.
        pause = 0.0005
        while loop.time() < deadline:
            try:
                pending = struct.unpack("i", fcntl.ioctl(self.reader, termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                return
            if pending == 0:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            _close(self.fd)
            _close(self.reader)
            self.fd = self.reader = -1


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
    """The stdio of one process. Lifecycle: construct, hand ``runc_stdio()`` to runc (or use a console
    socket), ``close_runc_ends()``, ``start()`` the copies, ``finish()`` at exit, ``close()`` at delete.
    """

    def __init__(self, stdio: Stdio, *, uid: int = 0, gid: int = 0) -> None:
        self.stdio = _resolve_outputs(stdio)
        # (process end, shim end) per stream; -1 = none. Process ends go to runc, shim ends are copied.
        self._pipes: dict[str, tuple[int, int]] = {}
        self._stdin_reader = -1  # client FIFO, read by the stdin copy
        self._stdin_holder = -1  # our writer on that FIFO, dropped by CloseIO
        self._console = -1
        self._out_tasks: list[asyncio.Task[None]] = []
        self._in_task: asyncio.Task[None] | None = None
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

    @property
    def console(self) -> int:
        return self._console

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

    def start(self, console: int = -1) -> None:
        """Opens the client's outputs and starts copying; ``console`` is the pty master in terminal mode."""
        stdio = self.stdio
        sinks: dict[str, _Sink] = {}
        try:
            for name, path in (("stdout", stdio.stdout), ("stderr", stdio.stderr)):
                if not path or (stdio.terminal and name == "stderr"):
                    continue
                if (
                    name == "stderr"
                    and path == stdio.stdout
                    and "stdout" in sinks
                    and sinks["stdout"].reader < 0
                ):
                    sinks["stdout"].users += 1  # one file for both streams, closed after both finish
                    sinks["stderr"] = sinks["stdout"]
                else:
                    sinks[name] = _Sink(path)
            self.open_stdin()
        except BaseException:
            for sink in sinks.values():
                sink.release()
            raise
        if stdio.terminal:
            self._console = console
            os.set_blocking(console, False)
            self._out_tasks.append(asyncio.ensure_future(self._copy_out(console, sinks.get("stdout"))))
            if self._stdin_reader >= 0:
                self._in_task = asyncio.ensure_future(self._copy_in(self._stdin_reader, console, close=False))
            return
        for name in ("stdout", "stderr"):
            if name in self._pipes:
                self._out_tasks.append(
                    asyncio.ensure_future(self._copy_out(self._pipes[name][1], sinks.get(name)))
                )
            elif name in sinks:
                sinks[name].release()
        if self._stdin_reader >= 0 and "stdin" in self._pipes:
            self._in_task = asyncio.ensure_future(self._copy_in(self._stdin_reader, self._pipes["stdin"][1]))

    def hand_over(self, console: int = -1) -> tuple[dict[str, Any], list[int]]:
        """Opens the client's side as :meth:`start` does, but gives the fds away instead of copying
        (the keeper copies; see keeper.py). Returns a description whose numbers index the fd list::

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
            sink = _Sink(path)
            desc["out"].append((source, add(sink.fd), add(sink.reader)))
        self.open_stdin()
        if self._stdin_reader >= 0:
            if stdio.terminal:
                desc["in"] = (add(self._stdin_reader), -1)
            elif "stdin" in self._pipes:
                desc["in"] = (add(self._stdin_reader), add(self._pipes["stdin"][1]))
            desc["holder"] = add(self._stdin_holder)
        return desc, fds

    async def _copy_out(self, src: int, sink: _Sink | None) -> None:
        writing = sink is not None
        try:
            while data := await read_some(src):
                if not writing:
                    continue  # keep draining: a full pipe would stall the process
                try:
                    await write_all(sink.fd, data)  # type: ignore[union-attr]
                except OSError as exc:
                    log.warning("stdio: writing output failed, discarding the rest: %s", exc)
                    writing = False
        except OSError as exc:
            log.warning("stdio: reading process output failed: %s", exc)
        finally:
            if sink is not None:
                try:
                    if writing:
                        await sink.drained(DRAIN_TIMEOUT)
                finally:
                    sink.release()

    async def _copy_in(self, src: int, dst: int, *, close: bool = True) -> None:
        try:
            while data := await read_some(src):
                await write_all(dst, data)
        except BrokenPipeError:
            pass  # the process closed its stdin or exited
        except OSError as exc:
            log.warning("stdio: copying stdin failed: %s", exc)
        finally:
            if close:
                # EOF for the process: close its stdin (our end of the pipe).
                for name, (proc_end, shim_end) in list(self._pipes.items()):
                    if name == "stdin":
                        _close(shim_end)
                        self._pipes[name] = (proc_end, -1)

    def close_stdin(self) -> None:
        """CloseIO: drop our writer so the copy reaches EOF once the client closes its own."""
        self._stdin_closed = True
        _close(self._stdin_holder)
        self._stdin_holder = -1

    def resize(self, width: int, height: int) -> None:
        if self._console >= 0:
            fcntl.ioctl(self._console, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def finish(self, grace: float = 2.0) -> None:
        """At process exit: let the output copies reach EOF (bounded), which closes the client's outputs."""
        tasks = [t for t in self._out_tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            # A left-behind child still holds the pipe: stop copying, close the client's side.
            await _cancel(pending)
        if self._console >= 0:
            # The terminal's stdin copy writes to the master: stop it before the fd number is freed.
            await _cancel([self._in_task] if self._in_task is not None else [])
            _close(self._console)
            self._console = -1
        for name, (proc_end, shim_end) in list(self._pipes.items()):
            if name != "stdin":
                _close(shim_end)
                self._pipes[name] = (proc_end, -1)

    async def close(self) -> None:
        """At delete: everything, including stdin.

        The copy tasks are cancelled and awaited before any fd is closed: a task still waiting on an
        fd would otherwise unregister it later, when the number may belong to someone else.
        """
        if self._closed:
            return
        self._closed = True
        await _cancel([*self._out_tasks, *([self._in_task] if self._in_task is not None else [])])
        for proc_end, shim_end in self._pipes.values():
            _close(proc_end)
            _close(shim_end)
        self._pipes.clear()
        for fd in (self._stdin_reader, self._stdin_holder, self._console):
            _close(fd)
        self._stdin_reader = self._stdin_holder = self._console = -1


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


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
                        await wait_fd(conn.fileno())
        if not fds:
            raise RuntimeError("console socket: runc sent no pty master")
        for extra in fds[1:]:
            _close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
