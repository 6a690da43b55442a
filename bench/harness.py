"""The bench's world: a journaled ext4 loop filesystem and both daemons on private paths on it.

Layout of one run (everything under one temp dir, removed at the end, also on error or Ctrl-C):

    /tmp/pyctr-bench-XXXX/
        disk.img            sparse image, mkfs.ext4 with a journal (the root fs here has none)
        mnt/                the loop mount; every daemon root, state and socket lives here
            pyctrd/         shared pyctrd: config.toml, root/, state/, grpc.sock, daemon.log
            containerd/     shared containerd, the same layout
            fresh/<name>/   throwaway daemons (start-up, idle memory, cold pulls)
            scratch/        input files for content figures
        fixtures/           OCI layouts built for the registry (root fs: not what is measured)
        registry/           docker-registry config and storage

Both daemons get the same treatment: the same filesystem, log level ``warn``, a config file
with private root/state/grpc/ttrpc addresses, CRI disabled for containerd (pyctrd has none).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from bench import proc

Kind = Literal["pyctrd", "containerd"]
KINDS: tuple[Kind, ...] = ("pyctrd", "containerd")
NAMESPACE = "bench"
LAUNCHER_IDLE = 20  # seconds; see Session.open
CTR = shutil.which("ctr") or "ctr"
VENV_BIN = os.path.dirname(sys.executable)
PYCTRD = os.path.join(VENV_BIN, "pyctrd")
PYCTR = os.path.join(VENV_BIN, "pyctr")

_CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "warn"
"""

# pyctrd reads containerd's layout; it would also read /etc/pyctrd/config.toml if we gave none.
_PYCTRD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "warn"
"""


@dataclass
class Daemon:
    """One daemon on a directory of its own; ``prepare`` then ``launch`` so start-up can be timed."""

    kind: Kind
    base: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return os.path.join(self.base, "grpc.sock")

    @property
    def config_path(self) -> str:
        return os.path.join(self.base, "config.toml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "daemon.log")

    @property
    def pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} is not running")
        return self.proc.pid

    def prepare(self) -> None:
        os.makedirs(self.base, exist_ok=True)
        template = _CONTAINERD_CONFIG if self.kind == "containerd" else _PYCTRD_CONFIG
        with open(self.config_path, "w") as f:
            f.write(
                template.format(
                    root=os.path.join(self.base, "root"),
                    state=os.path.join(self.base, "state"),
                    address=self.address,
                )
            )

    def command(self) -> list[str]:
        if self.kind == "containerd":
            return [shutil.which("containerd") or "containerd", "--config", self.config_path]
        return [PYCTRD, "--config", self.config_path]

    def launch(self) -> None:
        self.proc = proc.spawn(self.command(), self.log_path)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the socket accepts connections (not yet an answered RPC; see figures for that)."""

        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited before serving; log:\n{self.log_tail()}")
            return proc.socket_accepts(self.address)

        proc.wait_until(ready, timeout, what=f"{self.kind} socket {self.address}")

    def start(self) -> Daemon:
        self.prepare()
        self.launch()
        self.wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def revive(self, timeout: float = 30.0) -> bool:
        """Start a daemon that died, on the same root and state (so it adopts its shims)."""
        if self.running:
            return True
        code = None if self.proc is None else self.proc.returncode
        print(f"bench: {self.kind} is not running (exit code {code}); starting it again", file=sys.stderr)
        try:
            self.launch()
            self.wait_ready(timeout)
            return True
        except (RuntimeError, TimeoutError) as exc:
            print(f"bench: {self.kind} does not start: {exc}", file=sys.stderr)
            self.stop()
            return False

    def stop(self) -> None:
        if self.proc is not None:
            proc.stop(self.proc)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would; shims and containers stay up."""
        if self.proc is not None:
            proc.stop(self.proc, sig=signal.SIGKILL)

    def ctr(self, *args: str) -> list[str]:
        return [CTR, "--address", self.address, "--namespace", NAMESPACE, *args]

    def pyctr(self, *args: str) -> list[str]:
        return [PYCTR, "--address", self.address, "--namespace", NAMESPACE, *args]

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def remove_all_containers(self) -> None:
        """Best effort, through the daemon's API: kill and delete every task, then every container.

        Needed before unmounting: a running container keeps its rootfs mounted on our filesystem.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        tasks = proc.run(self.ctr("tasks", "ls", "-q"), check=False, timeout=60).stdout.split()
        for cid in tasks:
            proc.run(self.ctr("tasks", "kill", "-s", "SIGKILL", cid), check=False, timeout=60)
        for cid in tasks:
            proc.run(self.ctr("tasks", "rm", "-f", cid), check=False, timeout=60)
        containers = proc.run(self.ctr("containers", "ls", "-q"), check=False, timeout=60).stdout.split()
        for cid in containers:
            proc.run(self.ctr("containers", "rm", cid), check=False, timeout=60)


class LoopFS:
    """A journaled ext4 filesystem in a sparse image file, loop-mounted for the run."""

    def __init__(self, workdir: str, size: str = "12G") -> None:
        self.image = os.path.join(workdir, "disk.img")
        self.mountpoint = os.path.join(workdir, "mnt")
        self.size = size
        self.mounted = False

    def mount(self) -> None:
        proc.run(["truncate", "-s", self.size, self.image])
        # -j: a journal, explicitly, because the machine's root fs lacks one (machine-notes.md).
        proc.run(["mkfs.ext4", "-q", "-F", "-j", "-L", "pyctr-bench", self.image])
        os.makedirs(self.mountpoint, exist_ok=True)
        proc.run(["mount", "-o", "loop", self.image, self.mountpoint])
        self.mounted = True

    def unmount(self, wait: float = 0.0) -> None:
        """Unmount and delete the image; first wait up to ``wait`` s for other processes to let go."""
        if not self.mounted:
            return
        busy = proc.holders(self.mountpoint)
        if busy and wait:
            listing = "; ".join(f"{pid} {cmd[:100]}" for pid, cmd in busy.items())
            print(
                f"bench: waiting up to {wait:.0f} s for processes using the bench fs: {listing}",
                file=sys.stderr,
            )
            with contextlib.suppress(TimeoutError):
                proc.wait_until(lambda: not proc.holders(self.mountpoint), wait, interval=0.5)
        # Leftover container mounts below ours (a crashed figure) would make umount fail: undo them.
        for target in reversed(_mounts_under(self.mountpoint)):
            proc.run(["umount", target], check=False)
        for _ in range(20):
            if proc.run(["umount", self.mountpoint], check=False).returncode == 0:
                break
            time.sleep(0.25)
        else:
            busy = proc.holders(self.mountpoint)
            print(f"bench: {self.mountpoint} is busy ({busy}); detaching it lazily", file=sys.stderr)
            proc.run(["umount", "-l", self.mountpoint], check=False)
        self.mounted = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)


def _mounts_under(path: str) -> list[str]:
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(path + "/"):
                found.append(target)
    return found


@dataclass
class Side:
    """One daemon kind in the comparison: its shared daemon and a way to get throwaway ones."""

    kind: Kind
    session: Session
    daemon: Daemon

    @contextlib.contextmanager
    def fresh(self, name: str) -> Iterator[Daemon]:
        """A daemon on a brand-new root, prepared but not launched; stopped and deleted afterwards."""
        d = Daemon(self.kind, os.path.join(self.session.fs.mountpoint, "fresh", f"{self.kind}-{name}"))
        shutil.rmtree(d.base, ignore_errors=True)
        d.prepare()
        try:
            yield d
        finally:
            d.remove_all_containers()
            d.stop()
            shutil.rmtree(d.base, ignore_errors=True)


@dataclass
class Session:
    """Everything one run owns, torn down in reverse order by ``close``."""

    kinds: tuple[Kind, ...]
    workdir: str = ""
    fs: LoopFS = field(init=False)
    sides: list[Side] = field(default_factory=list)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)
    _saved_env: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="pyctr-bench-", dir="/tmp")
        self.fs = LoopFS(self.workdir)

    def open(self) -> None:
        # An installed pyctrd has its bytecode compiled at install time, while this environment sets
        # PYTHONDONTWRITEBYTECODE=1 and the editable checkout has no __pycache__: every start would
        # compile pyctr's sources first. A cache under the run's temp dir (filled by the warm-up)
        # measures the installed case without writing into the source tree.
        keys = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PATH", "PYCTR_SHIM_LAUNCHER_IDLE")
        self._saved_env = {k: os.environ.get(k) for k in keys}
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(self.workdir, "pycache")
        # pyctrd finds its shim (containerd-shim-pyrunc-v2) on PATH, as containerd finds its own;
        # installed, both sit in /usr/local/bin, here the shim is a console script of the venv.
        os.environ["PATH"] = os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")])
        # pyctrd's shims come from a launcher process that outlives the daemon until it has been
        # idle for PYCTR_SHIM_LAUNCHER_IDLE seconds (600 by default) and keeps our filesystem busy
        # meanwhile. A short idle time lets the run unmount without killing what it did not start;
        # within a figure, container starts follow each other much faster than this.
        os.environ["PYCTR_SHIM_LAUNCHER_IDLE"] = str(LAUNCHER_IDLE)
        self.fs.mount()
        os.makedirs(self.scratch, exist_ok=True)
        for kind in self.kinds:
            d = Daemon(kind, os.path.join(self.fs.mountpoint, kind)).start()
            self.sides.append(Side(kind, self, d))

    @property
    def scratch(self) -> str:
        return os.path.join(self.fs.mountpoint, "scratch")

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        # A second Ctrl-C during cleanup would leave a mounted loop device behind: ignore it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for fn in reversed(self._cleanups):
                try:
                    fn()
                except Exception as exc:  # cleanup continues; the error is reported, not raised
                    print(f"bench: cleanup step failed: {exc}", file=sys.stderr)
            for side in self.sides:
                # Containers of a daemon that died keep our filesystem busy, and only the daemon's
                # API may remove them: bring it back for that, if it starts.
                if side.daemon.proc is not None and side.daemon.revive():
                    side.daemon.remove_all_containers()
                side.daemon.stop()
            proc.stop_all()
            self.fs.unmount(wait=LAUNCHER_IDLE + 15)
            shutil.rmtree(self.workdir, ignore_errors=True)
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        finally:
            signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Session:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
