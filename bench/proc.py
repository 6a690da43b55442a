"""Processes: run commands, keep track of the ones the harness starts, read memory from /proc.

The harness only ever stops processes it started itself, by the PID ``spawn`` recorded. Each is
started in its own session, so a Ctrl-C in the terminal reaches the harness alone and the
harness decides the order of shutdown (containers first, then daemons, then the mount).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_started: dict[int, subprocess.Popen[bytes]] = {}


class CommandError(RuntimeError):
    """A command that failed: short in reports (its last stderr line), complete in ``stderr``."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        super().__init__(f"`{_short(cmd)}` exited {returncode}: {lines[-1].strip() if lines else ''}")


def _short(cmd: Sequence[str]) -> str:
    """The command without its executable's directory and the per-run ``--address``/``--namespace``."""
    out, skip = [os.path.basename(cmd[0])], False
    for arg in cmd[1:]:
        if skip:
            skip = False
        elif arg in ("--address", "--namespace"):
            skip = True
        else:
            out.append(arg)
    return " ".join(out)


def run(
    cmd: Sequence[str],
    *,
    timeout: float = 120.0,
    check: bool = True,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure raise with its stderr, which is what one needs."""
    res = subprocess.run(
        list(cmd), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise CommandError(cmd, res.returncode, res.stderr)
    return res


def timed(cmd: Sequence[str], *, timeout: float = 600.0, stdin_path: str | None = None) -> float:
    """Wall seconds of one command (output discarded); raises if it fails."""
    with contextlib.ExitStack() as stack:
        stdin: Any = subprocess.DEVNULL
        if stdin_path:
            stdin = stack.enter_context(open(stdin_path, "rb"))
        t0 = time.perf_counter()
        res = subprocess.run(
            list(cmd), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout
        )
        elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise CommandError(cmd, res.returncode, res.stderr.decode(errors="replace"))
    return elapsed


def spawn(cmd: Sequence[str], log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as logf:
        p = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    _started[p.pid] = p
    return p


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop one process we started: ``sig``, then SIGKILL after ``timeout``; always reaped."""
    try:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    finally:
        _started.pop(p.pid, None)


def stop_all() -> None:
    """Last-resort cleanup: whatever ``spawn`` started and nobody stopped, newest first."""
    for p in reversed(list(_started.values())):
        stop(p, timeout=10.0)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.002, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def socket_accepts(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_tcp_port() -> int:
    # The port can be taken again between close and use; on a private test box that is acceptable.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Memory:
    """One process's memory in bytes: resident, proportional and unique (private) set sizes."""

    rss: int
    pss: int
    uss: int


def memory(pid: int) -> Memory:
    """VmRSS from /proc/PID/status; PSS and USS (Private_Clean + Private_Dirty) from smaps_rollup."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return Memory(rss=rss, pss=fields.get("Pss", 0), uss=uss)


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise ProcessLookupError(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def holders(path: str) -> dict[int, str]:
    """Processes keeping ``path`` (a mount point) busy: cwd, root, open files, or a unix socket
    bound below it. PID → command line. Read-only: the harness waits for them, it never kills them."""
    prefix = path.rstrip("/") + "/"
    sockets = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and (parts[7] + "/").startswith(prefix):
                sockets.add(f"socket:[{parts[6]}]")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        try:
            links = [os.readlink(f"{base}/{name}") for name in ("cwd", "root")]
            links += [os.readlink(f"{base}/fd/{fd}") for fd in os.listdir(f"{base}/fd")]
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if any((link + "/").startswith(prefix) or link in sockets for link in links):
            with open(f"{base}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return found
