"""A private containerd whose PATH finds our shim as ``containerd-shim-pyrunc-v2``.

containerd resolves ``--runtime io.containerd.pyrunc.v2`` to the binary ``containerd-shim-pyrunc-v2`` on
its own PATH, so each harness writes a wrapper script into its base directory and starts containerd
with that directory first on PATH. Everything lives under one short /tmp directory: containerd's
root and state, its sockets, our shim sockets (``<base>/s``), runc state (``<base>/runc``) and the
ctr FIFOs (``<base>/fifo``). Cleanup kills what it started by PID: containers through runc, shims
through the ``shim.pid`` files in the bundles, the launcher through its pid file, then containerd.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tests.helpers.daemons import read_log, wait_for_socket
from tests.shim import image

RUNTIME = "io.containerd.pyrunc.v2"
NAMESPACE = "t"
_CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  level = "{level}"
[plugins."io.containerd.runtime.v2.task"]
  platforms = ["linux/amd64"]
"""
_WRAPPER = """#!/bin/sh
exec {python} -m pyctr.shim "$@"
"""


def is_mounted(path: str) -> bool:
    """From mountinfo: os.path.ismount misses bind mounts within one filesystem."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_mentioning(text: str) -> None:
    """SIGKILL, by pid, every process whose command line names ``text`` (a test's private directory).

    Every shim names it: an exec'd one in ``-address``, a forked one in its launcher's command line.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and text in cmdline(int(entry)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def owns(pid: int, bundle: str) -> bool:
    """True when ``pid`` is a shim serving from ``bundle`` (its working directory)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == bundle and "pyctr.shim" in cmdline(pid)
    except OSError:
        return False


@dataclass
class Containerd:
    base: str
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return os.path.join(self.base, "containerd.sock")

    @property
    def state(self) -> str:
        return os.path.join(self.base, "state")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "containerd.log")

    def log(self) -> str:
        return read_log(self.log_path)

    def bundle(self, id: str, namespace: str = NAMESPACE) -> str:
        return os.path.join(self.state, "io.containerd.runtime.v2.task", namespace, id)

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                ["containerd", "--config", os.path.join(self.base, "config.toml")],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        try:
            wait_for_socket(self.address, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"containerd did not start:\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def ctr(
        self, *args: str, input: str | None = None, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "-a", self.address, "-n", NAMESPACE, *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} -> {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
                f"\n--- containerd log (tail):\n{self.log()[-4000:]}"
            )
        return result

    def run_args(self, id: str, *cmd: str, flags: tuple[str, ...] = ()) -> list[str]:
        return [
            "run",
            "--runtime",
            RUNTIME,
            "--fifo-dir",
            os.path.join(self.base, "fifo"),
            *flags,
            image.IMAGE_NAME,
            id,
            *cmd,
        ]

    def shim_pids(self) -> list[int]:
        """Live shims of this daemon: the pid in each bundle's shim.pid, if that process still runs
        there (a pid file outlives its process, and pids get reused)."""
        pids = []
        pattern = os.path.join(self.state, "io.containerd.runtime.v2.task", "*", "*", "shim.pid")
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                pid = int(f.read().strip())
                if owns(pid, os.path.dirname(path)):
                    pids.append(pid)
        return pids

    def launcher_pid(self) -> int | None:
        sockdir = os.path.join(self.base, "s")
        with (
            contextlib.suppress(OSError, ValueError),
            open(os.path.join(sockdir, "pyrunc-launcher.pid")) as f,
        ):
            pid = int(f.read().strip())
            if sockdir in cmdline(pid):
                return pid
        return None

    def cleanup(self) -> None:
        """Kills containers (runc), shims, the launcher and containerd, then removes every path."""
        runc_root = os.path.join(self.base, "runc", NAMESPACE)
        shims = self.shim_pids()
        self.stop(signal.SIGKILL)
        if os.path.isdir(runc_root):
            listing = subprocess.run(
                ["runc", "--root", runc_root, "list", "--format", "json"], capture_output=True, text=True
            )
            for entry in json.loads(listing.stdout or "null") or []:
                subprocess.run(
                    ["runc", "--root", runc_root, "delete", "--force", entry["id"]], capture_output=True
                )
        for pid in [*shims, self.launcher_pid()]:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        kill_mentioning(self.base)  # e.g. a launcher replaced after a code change
        for rootfs in glob.glob(
            os.path.join(self.state, "io.containerd.runtime.v2.task", "*", "*", "rootfs")
        ):
            subprocess.run(["umount", "-R", rootfs], capture_output=True)
        # containerd's own snapshot mounts (ctr import unpacks with overlay) live under root.
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if self.base in line]
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
        time.sleep(0.05)
        shutil.rmtree(self.base, ignore_errors=True)


def new_containerd(level: str = "info") -> Containerd:
    base = tempfile.mkdtemp(prefix="pyrunc-", dir="/tmp")
    bindir = os.path.join(base, "bin")
    os.makedirs(bindir)
    wrapper = os.path.join(bindir, "containerd-shim-pyrunc-v2")
    with open(wrapper, "w") as f:
        f.write(_WRAPPER.format(python=sys.executable))
    os.chmod(wrapper, 0o755)
    with open(os.path.join(base, "config.toml"), "w") as f:
        f.write(_CONFIG.format(base=base, level=level))
    env = dict(os.environ)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    return Containerd(base=base, env=env)


def start_with_image(level: str = "info") -> Containerd:
    d = new_containerd(level)
    try:
        d.start()
        archive = os.path.join(d.base, "busybox.tar")
        image.write_archive(archive)
        # The image record is a GC root: its content and unpacked snapshot stay while it exists.
        d.ctr("images", "import", archive)
    except BaseException:
        d.cleanup()
        raise
    return d
