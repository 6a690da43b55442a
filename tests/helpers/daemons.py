"""Start real daemons for tests: pyctrd, and Debian's containerd as the reference.

Each daemon gets its own short temp directory (unix socket paths are limited to 107 bytes),
is stopped by the PID we started, and leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
PYCTRD = os.path.join(VENV_BIN, "pyctrd")
PYCTR = os.path.join(VENV_BIN, "pyctr")


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before serving {path}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"nothing serves {path} after {timeout}s")


@dataclass
class Daemon:
    """A running daemon: its directories, socket, process and log file."""

    base: str
    address: str
    root: str
    state: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None  # added to os.environ for the daemon process

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def read_log(path: str) -> str:
    """A daemon's log file as text, "" while it does not exist (or cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mounts_under(path: str) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at ``path`` or below it."""
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if t == path or t.startswith(path + "/")]


def new_base(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def start_pyctrd(
    base: str | None = None, *args: str, wait: bool = True, env: dict[str, str] | None = None
) -> Daemon:
    base = base or new_base("pyctrd-")
    d = Daemon(
        base=base,
        address=os.path.join(base, "s", "pyctrd.sock"),
        root=os.path.join(base, "root"),
        state=os.path.join(base, "s"),
        log_path=os.path.join(base, "pyctrd.log"),
        extra_args=list(args),
        env=env,
    )
    return restart(d, wait=wait)


def restart(d: Daemon, wait: bool = True) -> Daemon:
    with open(d.log_path, "ab") as logf:
        d.proc = subprocess.Popen(
            [
                PYCTRD,
                "--root",
                d.root,
                "--state",
                d.state,
                "--address",
                d.address,
                "--log-level",
                "debug",
                *d.extra_args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if d.env is None else {**os.environ, **d.env},
        )
    if wait:
        try:
            wait_for_socket(d.address, d.proc)
        except Exception:
            d.stop()
            raise RuntimeError(f"pyctrd did not start:\n{d.log()}") from None
    return d


CONTAINERD_CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  level = "warn"
"""


def start_containerd() -> Daemon:
    exe = shutil.which("containerd")
    if exe is None:
        raise FileNotFoundError("containerd is not installed")
    base = new_base("ctrd-")
    cfg = os.path.join(base, "config.toml")
    with open(cfg, "w") as f:
        f.write(CONTAINERD_CONFIG.format(base=base))
    d = Daemon(
        base=base,
        address=os.path.join(base, "containerd.sock"),
        root=os.path.join(base, "root"),
        state=os.path.join(base, "state"),
        log_path=os.path.join(base, "containerd.log"),
    )
    with open(d.log_path, "ab") as logf:
        d.proc = subprocess.Popen(
            [exe, "--config", cfg], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_socket(d.address, d.proc)
    except Exception:
        d.stop()
        raise RuntimeError(f"containerd did not start:\n{d.log()}") from None
    return d


def cleanup(d: Daemon) -> None:
    d.stop()
    shutil.rmtree(d.base, ignore_errors=True)


def run(
    cmd: list[str], timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL
    )
