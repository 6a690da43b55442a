"""The client's side of a task's stdio: FIFOs the shim opens, copied to and from our terminal.

Readers open their FIFO with a blocking open in a thread, which returns once the shim opens the
write end; after that an empty read is a real end of stream (a non-blocking open would read
"end" before the shim ever connected). The stdin FIFO is opened read-write so the shim's open
never waits for us; at the end of our input, CloseIO tells the shim to close the process's stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

FIFO_ROOT = "/run/pyctr/fifo"


@dataclass
class FifoSet:
    dir: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    _fds: list[int] = field(default_factory=list)
    _tasks: list[asyncio.Future[None]] = field(default_factory=list)


def create(container_id: str, stdin: bool, terminal: bool) -> FifoSet:
    os.makedirs(FIFO_ROOT, mode=0o700, exist_ok=True)
    d = tempfile.mkdtemp(dir=FIFO_ROOT)
    fs = FifoSet(d)
    fs.stdout = os.path.join(d, f"{container_id}-stdout")
    os.mkfifo(fs.stdout, 0o600)
    if not terminal:
        fs.stderr = os.path.join(d, f"{container_id}-stderr")
        os.mkfifo(fs.stderr, 0o600)
    if stdin:
        fs.stdin = os.path.join(d, f"{container_id}-stdin")
        os.mkfifo(fs.stdin, 0o600)
    return fs


async def _copy_out(path: str, out: int) -> None:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            data = await asyncio.to_thread(os.read, fd, 65536)
            if not data:
                return
            view = memoryview(data)
            while view:
                n = os.write(out, view)
                view = view[n:]
    finally:
        os.close(fd)


def start_output(fs: FifoSet) -> None:
    fs._tasks.append(asyncio.ensure_future(_copy_out(fs.stdout, sys.stdout.fileno())))
    if fs.stderr:
        fs._tasks.append(asyncio.ensure_future(_copy_out(fs.stderr, sys.stderr.fileno())))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def copy_stdin(fifos: FifoSet, on_eof: Callable[[], Awaitable[None]]) -> None:
    """Feed our stdin into the task until it ends, then call ``on_eof`` (CloseIO).

    Waits for input on the loop, not in a thread: a thread blocked in read(2) on a terminal would
    keep pyctr from exiting after the process ended until the next key press.
    """
    src = sys.stdin.fileno()
    fd = os.open(fifos.stdin, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            try:
                await _readable(src)
                data = os.read(src, 65536)
            except PermissionError:  # a regular file cannot be polled, and never blocks
                data = await asyncio.to_thread(os.read, src, 65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await _writable(fd)
    finally:
        # The process sees end-of-input once every writer is gone: ours, then the shim's (CloseIO).
        os.close(fd)
    await on_eof()


async def wait_output(fs: FifoSet, timeout: float = 10.0) -> None:
    """Let the output copies finish after the process exited (the shim closes its ends)."""
    if fs._tasks:
        await asyncio.wait(fs._tasks, timeout=timeout)


def close(fs: FifoSet) -> None:
    for t in fs._tasks:
        t.cancel()
    # A reader still blocked in open() (the task never started) is released by a writer.
    for path in (fs.stdout, fs.stderr):
        if path:
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    for fd in fs._fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    shutil.rmtree(fs.dir, ignore_errors=True)
