"""Reading from processes that stream (``ctr events``, ``pyctr events``) and from daemon logs.

Every wait here has a deadline, so a silent process fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class LineReader:
    """Whole lines from a pipe, with a timeout per read (no partial lines, no blocking forever)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self._fd = proc.stdout.fileno()
        self._buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline, or None when none arrived in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self.eof = True
                continue
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def read_until(self, match: Callable[[str], bool], timeout: float) -> str | None:
        """The first line for which ``match`` is true, skipping others; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.readline(left)
            if line is None:
                return None
            if match(line):
                return line
        return None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM the process we started (by its PID), SIGKILL if it lingers; close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for pipe in (proc.stdout, proc.stderr, proc.stdin):
        if pipe is not None:
            pipe.close()
    return proc.returncode


def log_records(path: str) -> Iterator[dict[str, Any]]:
    """The JSON records of a pyctrd log (other lines, e.g. from grpclib, are skipped)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def wait_for(
    check: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: Callable[[], object] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``.

    ``message`` is called only on failure, for diagnostics gathered then (a log's tail, a listing).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {message()}" if message is not None else ""
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r}){detail}")
        time.sleep(interval)
