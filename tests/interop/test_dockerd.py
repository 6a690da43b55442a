"""Debian's dockerd 20.10 (``docker.io``) running containers on pyctrd through ``--containerd``.

One pyctrd and one dockerd for the module, each on private temp directories; the image is a busybox
root filesystem put in with ``docker import``, so nothing is pulled. dockerd talks to pyctrd in the
``moby`` namespace (containers, tasks, events) and ``plugins.moby`` (events only); it never
uses snapshots, images or Tasks/Wait, and notices exits only through ``/tasks/exit`` events.

The CLI is ``/usr/bin/docker`` (20.10, from the same package); a newer client earlier in PATH would
speak a newer API. dockerd leaves its data-root bind-mounted on itself: teardown unmounts whatever
is left under its directory. It also writes ``/etc/docker/key.json`` and ``/run/docker/plugins``,
paths it does not let us move; pyctrd keeps every file under its own root and state.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import criu, daemons, images
from tests.helpers.daemons import alive, mounts_under, read_log
from tests.helpers.streams import wait_for

pytestmark = pytest.mark.interop

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # the 20.10 client; /usr/local/bin/docker may be a newer one
IMAGE = "busybox:latest"
NONE = ("--network", "none")
SUBSCRIBED = '"event": "event subscriber added"'  # pyctrd's log line for each Events/Subscribe


class _UnixHTTP(http.client.HTTPConnection):
    """HTTP to the docker API over its unix socket (for /_ping and the full stats JSON)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


@dataclass
class Dockerd:
    """One dockerd on private directories, talking to ``containerd`` (pyctrd's socket)."""

    base: str
    containerd: str
    driver: str = "overlay2"
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)  # seconds each start took

    @property
    def sock(self) -> str:
        return os.path.join(self.base, "docker.sock")

    @property
    def data_root(self) -> str:
        return os.path.join(self.base, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "dockerd.log")

    def log(self) -> str:
        return read_log(self.log_path)

    def start(self, live_restore: bool = False, experimental: bool = False) -> None:
        config = os.path.join(self.base, "daemon.json")
        with open(config, "w") as f:
            f.write("{}\n")  # not /etc/docker/daemon.json
        argv = [
            DOCKERD,
            f"--containerd={self.containerd}",
            "--data-root",
            self.data_root,
            "--exec-root",
            os.path.join(self.base, "exec"),
            "--pidfile",
            os.path.join(self.base, "dockerd.pid"),
            "-H",
            f"unix://{self.sock}",
            "--config-file",
            config,
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--storage-driver={self.driver}",
            "--debug",
        ]
        if live_restore:
            argv.append("--live-restore")
        if experimental:
            argv.append("--experimental")  # docker checkpoint
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        proc = self.proc
        wait_for(
            lambda: proc.poll() is not None or self.ping(),
            timeout=30,
            interval=0.05,
            message=lambda: f"dockerd did not answer /_ping:\n{self.log()[-3000:]}",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}:\n{self.log()[-3000:]}")
        self.starts.append(time.monotonic() - t0)

    def ping(self) -> bool:
        try:
            return self.api("GET", "/_ping", timeout=1)[0] == 200
        except OSError:
            return False

    def api(self, method: str, path: str, timeout: float = 10) -> tuple[int, bytes]:
        conn = _UnixHTTP(self.sock, timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGTERM to the dockerd we started, as systemd stops it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, timeout: float = 30) -> str:
        r = self(*args, timeout=timeout)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def inspect(self, cid: str, template: str) -> str:
        return self.ok("inspect", "-f", template, cid).strip()


@dataclass
class Env:
    pyd: daemons.Daemon
    docker: Dockerd
    ctr: str  # the Go ctr when installed, else pyctr

    def moby(self, *args: str) -> str:
        r = daemons.run([self.ctr, "-a", self.pyd.address, "-n", "moby", *args])
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    def tasks(self) -> dict[str, list[str]]:
        """pyctrd's tasks in ``moby``: id -> [pid, status]."""
        rows = (line.split() for line in self.moby("tasks", "ls").splitlines()[1:])
        return {r[0]: r[1:] for r in rows if r}

    def containers(self) -> list[str]:
        return self.moby("containers", "ls", "-q").split()

    def moby_empty(self) -> bool:
        return self.tasks() == {} and self.containers() == []

    def assert_moby_empty(self) -> None:
        # dockerd deletes the containerd container at the end of its exit path, which may trail
        # the CLI's return by a few RPCs.
        wait_for(self.moby_empty, timeout=5, message=lambda: (self.tasks(), self.containers()))

    def subscriptions(self) -> int:
        return self.pyd.log().count(SUBSCRIBED)


def _processes_naming(pyd_base: str) -> list[int]:
    """PIDs of processes whose command line names pyctrd's directory (shims, the launcher)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if pyd_base.encode() in cmdline:
            found.append(int(entry))
    return found


def _stop_launcher(pyd: daemons.Daemon) -> None:
    """The shim launcher pyctrd spawned idles for minutes after its last shim: end it by its pid file."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(pyd.state, "s", "pyrunc-launcher.pid")) as f:
            os.kill(int(f.read()), signal.SIGTERM)


def _teardown(env: Env) -> list[str]:
    """Stop everything started for the module; returns what had to be forced (a test failure)."""
    problems = []
    dk, pyd = env.docker, env.pyd
    if dk.proc is not None and dk.proc.poll() is None:
        left = dk("ps", "-aq").stdout.split()
        if left:
            dk("rm", "-f", *left)
    dk.stop()
    for target in sorted(mounts_under(dk.base), key=len, reverse=True):
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)
    if pyd.proc is not None and pyd.proc.poll() is None:
        tasks = env.tasks()
        if tasks:
            problems.append(f"tasks left in moby: {tasks}")
            for cid in tasks:
                daemons.run([env.ctr, "-a", pyd.address, "-n", "moby", "tasks", "kill", "-s", "SIGKILL", cid])
                daemons.run([env.ctr, "-a", pyd.address, "-n", "moby", "tasks", "rm", "-f", cid])
    pyd.stop()
    _stop_launcher(pyd)
    try:
        wait_for(lambda: not _processes_naming(pyd.base), timeout=5, interval=0.05)
    except AssertionError:
        left_pids = _processes_naming(pyd.base)
        problems.append(f"processes left: {left_pids}")
        for pid in left_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    # runc removes each container's cgroup; the "docker" parents it made stay, empty.
    for path in glob.glob("/sys/fs/cgroup/*/docker"):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    for base in (dk.base, pyd.base):
        shutil.rmtree(base, ignore_errors=True)
    return problems


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    for exe in (DOCKERD, DOCKER):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} is not installed (make setup installs docker.io as root)")
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    ctr = shutil.which("ctr") or daemons.PYCTR
    pyd = daemons.start_pyctrd()
    dk = Dockerd(base=daemons.new_base("dockerd-"), containerd=pyd.address)
    e = Env(pyd, dk, ctr)
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                dk.driver = "vfs"
        try:
            dk.start()
        except RuntimeError:
            if dk.driver == "vfs":
                raise
            dk.driver = "vfs"  # e.g. /tmp itself on overlayfs
            dk.start()
        tar = images.busybox_rootfs_tar(dk.base)
        dk.ok("import", tar, IMAGE)
        yield e
    finally:
        problems = _teardown(e)
        assert not problems, problems


def _pid(env: Env, cid: str) -> int:
    return int(env.docker.inspect(cid, "{{.State.Pid}}"))


# --------------------------------------------------------------------------------------- tests


def test_run_output_and_exit_code(env: Env) -> None:
    r = env.docker("run", "--rm", *NONE, IMAGE, "echo", "hi")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = env.docker("run", "--rm", *NONE, IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    # dockerd reads runc's reason to choose 127 (not found) or 126; the text is containerd's.
    r = env.docker("run", "--rm", *NONE, IMAGE, "no-such-command")
    assert r.returncode == 127, r.stderr
    assert "failed to create shim task: OCI runtime create failed" in r.stderr, r.stderr
    assert 'exec: "no-such-command": executable file not found in $PATH' in r.stderr, r.stderr
    env.assert_moby_empty()


def test_detached_life_cycle(env: Env) -> None:
    dk = env.docker
    cid = dk.ok("run", "-d", *NONE, IMAGE, "sleep", "1000").strip()
    pid = _pid(env, cid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]
    assert env.tasks()[cid] == [str(pid), "RUNNING"]
    assert env.containers() == [cid]
    # The shim serves from pyctrd's state dir; runc keeps its state where dockerd asked (exec-root).
    with open(os.path.join(env.pyd.state, "io.containerd.runtime.v2.task", "moby", cid, "address")) as f:
        assert f.read().removeprefix("unix://").startswith(env.pyd.base + "/")
    assert os.path.exists(os.path.join(dk.base, "exec", "runtime-runc", "moby", cid, "state.json"))

    assert dk.ok("exec", cid, "sh", "-c", "echo in-exec; id -u") == "in-exec\n0\n"
    r = dk("exec", cid, "sh", "-c", "echo bye >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, "", "bye\n")
    r = dk("exec", cid, "no-such-command")
    # The 20.10 CLI prints an exec's start failure on stdout.
    assert r.returncode == 126 and "OCI runtime exec failed" in r.stdout + r.stderr, r

    top = dk.ok("top", cid).splitlines()
    assert top[0].split()[:3] == ["UID", "PID", "PPID"]
    assert [line.split()[1] for line in top[1:]] == [str(pid)]
    assert top[1].endswith("sleep 1000")

    mem, pids = dk.ok("stats", "--no-stream", "--format", "{{.MemUsage}}|{{.PIDs}}", cid).strip().split("|")
    assert pids == "1" and not mem.startswith("0B "), (mem, pids)
    status, body = dk.api("GET", f"/containers/{cid}/stats?stream=false")
    assert status == 200, body
    stats: dict[str, Any] = json.loads(body)
    assert stats["pids_stats"]["current"] == 1
    assert stats["memory_stats"]["usage"] > 0
    assert stats["cpu_stats"]["cpu_usage"]["total_usage"] > 0
    # containerd always sends the blkio block (maybe with no entries): dockerd shows lists, not null.
    assert all(isinstance(v, list) for v in stats["blkio_stats"].values()), stats["blkio_stats"]

    dk.ok("pause", cid)
    assert dk.inspect(cid, "{{.State.Status}}") == "paused"
    assert env.tasks()[cid] == [str(pid), "PAUSED"]
    dk.ok("unpause", cid)
    assert dk.inspect(cid, "{{.State.Status}}") == "running"
    assert env.tasks()[cid] == [str(pid), "RUNNING"]
    assert dk.ok("exec", cid, "echo", "again") == "again\n"

    # sleep as PID 1 ignores SIGTERM: -t 0 makes dockerd follow with SIGKILL at once.
    dk.ok("stop", "-t", "0", cid)
    assert dk.inspect(cid, "{{.State.Status}} {{.State.ExitCode}}") == "exited 137"
    assert not alive(pid)
    env.assert_moby_empty()  # dockerd deletes the containerd container at stop, not at rm
    dk.ok("rm", cid)
    assert dk.ok("ps", "-aq") == ""
    env.assert_moby_empty()


def test_stdin_until_eof(env: Env) -> None:
    dk = env.docker
    r = dk("run", "-i", "--rm", *NONE, IMAGE, "cat", input="data\n", timeout=20)
    assert (r.returncode, r.stdout) == (0, "data\n"), r.stderr
    # cat ends at EOF (Tasks/CloseIO) and the container carries on after it.
    r = dk("run", "-i", "--rm", *NONE, IMAGE, "sh", "-c", "cat; echo eof; exit 2", input="a\nb\n", timeout=20)
    assert (r.returncode, r.stdout) == (2, "a\nb\neof\n"), r.stderr

    cid = dk.ok("run", "-d", *NONE, IMAGE, "sleep", "1000").strip()
    r = dk("exec", "-i", cid, "sh", "-c", "cat; echo exec-eof", input="x\n", timeout=20)
    assert (r.returncode, r.stdout) == (0, "x\nexec-eof\n"), r.stderr
    dk.ok("rm", "-f", cid)
    env.assert_moby_empty()


def test_pyctrd_killed_and_restarted_under_dockerd(env: Env) -> None:
    dk = env.docker
    script = 'trap "exit 7" TERM; while :; do sleep 0.1; done'
    cid = dk.ok("run", "-d", *NONE, IMAGE, "sh", "-c", script).strip()
    pid = _pid(env, cid)
    before = env.subscriptions()

    env.pyd.kill()
    daemons.restart(env.pyd)
    # dockerd polls Health/Check until pyctrd serves again, then subscribes once per namespace
    # (moby, plugins.moby). An exit reported before that would be lost to it (as with containerd),
    # so the test waits for both subscriptions.
    wait_for(lambda: env.subscriptions() >= before + 2, timeout=20, message=lambda: env.pyd.log()[-3000:])
    assert alive(pid)
    assert env.tasks()[cid] == [str(pid), "RUNNING"]

    assert dk.ok("exec", cid, "echo", "after-restart") == "after-restart\n"
    r = dk("exec", cid, "sh", "-c", "exit 4")
    assert r.returncode == 4, r.stderr
    assert str(pid) in dk.ok("top", cid)

    t0 = time.monotonic()
    dk.ok("stop", "-t", "10", cid)
    assert time.monotonic() - t0 < 5  # ended by SIGTERM through the trap, not by the kill at 10 s
    assert dk.inspect(cid, "{{.State.Status}} {{.State.ExitCode}}") == "exited 7"
    env.assert_moby_empty()
    dk.ok("rm", cid)


def _ticks(dk: Dockerd, cid: str) -> list[int]:
    return [int(m) for m in re.findall(r"^tick (\d+)$", dk.ok("logs", cid), re.M)]


def test_live_restore_keeps_the_container(env: Env) -> None:
    dk = env.docker
    assert dk.ok("ps", "-aq") == ""
    dk.stop()
    dk.start(live_restore=True)
    script = 'trap "exit 9" TERM; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done'
    cid = dk.ok("run", "-d", *NONE, IMAGE, "sh", "-c", script).strip()
    pid = _pid(env, cid)
    wait_for(lambda: len(_ticks(dk, cid)) >= 2, timeout=10, interval=0.05)

    dk.stop()  # with --live-restore, dockerd leaves its containers running
    assert alive(pid)
    assert env.tasks()[cid] == [str(pid), "RUNNING"]
    assert env.containers() == [cid]
    time.sleep(0.3)  # ticks written while nobody reads the log FIFO

    dk.start(live_restore=True)
    assert dk.inspect(cid, "{{.State.Running}} {{.State.Pid}}") == f"true {pid}"
    assert dk.ok("exec", cid, "echo", "restored") == "restored\n"
    seen = len(_ticks(dk, cid))
    wait_for(lambda: len(_ticks(dk, cid)) > seen + 2, timeout=10, interval=0.05)
    ticks = _ticks(dk, cid)
    assert ticks == list(range(len(ticks)))  # the log went on across the restart, nothing lost

    dk.ok("stop", "-t", "10", cid)
    assert dk.inspect(cid, "{{.State.Status}} {{.State.ExitCode}}") == "exited 9"
    assert not alive(pid)
    env.assert_moby_empty()
    dk.ok("rm", cid)


@criu.needed
def test_checkpoint_and_start_from_it(env: Env) -> None:
    """``docker checkpoint create`` (experimental in 20.10): dockerd has pyctrd checkpoint the task
    into its content store, reads criu's tar back and unpacks it into its own checkpoint directory;
    ``docker start --checkpoint`` writes it into the content store again and creates the task from
    it. The restored process goes on counting where it stopped, in the same log."""
    dk = env.docker
    dk.stop()
    dk.start(experimental=True)
    try:
        script = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"
        cid = dk.ok("run", "-d", *NONE, IMAGE, "sh", "-c", script).strip()
        wait_for(lambda: len(_ticks(dk, cid)) >= 3, timeout=10, interval=0.05)
        dk.ok("checkpoint", "create", cid, "cp1", timeout=60)
        assert dk.inspect(cid, "{{.State.Running}}") == "false"
        before = _ticks(dk, cid)
        assert dk.ok("checkpoint", "ls", cid).split()[-1] == "cp1"

        dk.ok("start", "--checkpoint", "cp1", cid, timeout=60)
        assert dk.inspect(cid, "{{.State.Running}}") == "true"
        wait_for(lambda: len(_ticks(dk, cid)) > len(before) + 2, timeout=10, interval=0.05)
        after = _ticks(dk, cid)[len(before) :]
        assert after[0] == before[-1] + 1, (before[-3:], after[:3])  # counting on, not from 0
        assert after == list(range(after[0], after[0] + len(after)))
        dk.ok("rm", "-f", cid)
        env.assert_moby_empty()
    finally:
        dk.stop()
        dk.start()
