"""pyctrd crashes and shims die: tasks are found again, exits are reported, nothing leaks.

Each test runs its own pyctrd on a shim from ``SHIMS`` (Debian's Go shim today) with the real
``ctr``, in a namespace of its own. Shims are found by their command line (``-namespace <ns>
-id <id>``), so only the processes this test caused are looked at, and only those are killed
if a test fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pyctr.api._pb.containerd.services.tasks.v1 import GetRequest, TasksStub
from pyctr.api._pb.containerd.v1.types import Process, Status
from pyctr.ctr.client import Client
from tests.helpers import daemons, images
from tests.helpers.daemons import alive, mounts_under
from tests.helpers.streams import LineReader, log_records, stop_process, wait_for

SHIMS = ["containerd-shim-runc-v2", "containerd-shim-pyrunc-v2"]
IMAGE = "docker.io/pyctr/busybox:latest"
TASK_DIR = "io.containerd.runtime.v2.task"
RUNC_ROOT = "/run/containerd/runc"  # the Go shim's runc state, per namespace
RUNTIME_CONFIG = """version = 2
[plugins."io.containerd.runtime.v2.task"]
  runtimes = {{"io.containerd.runc.v2" = "{shim}"}}
"""


@dataclass
class Env:
    d: daemons.Daemon
    ctr_bin: str
    ns: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ctr(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return daemons.run([self.ctr_bin, "-a", self.d.address, "-n", self.ns, *args], timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self.ctr(*args)
        assert r.returncode == 0, (args, r.stderr, self.d.log()[-3000:])
        return r.stdout

    def tasks(self) -> dict[str, tuple[int, str]]:
        rows = (line.split() for line in self.ok("tasks", "ls").splitlines()[1:])
        return {c[0]: (int(c[1]), c[2]) for c in rows if c}

    def events(self) -> LineReader:
        """``ctr events`` for this namespace's task exits, already subscribed when this returns."""
        proc = subprocess.Popen(
            [self.ctr_bin, "-a", self.d.address, "events", f'namespace=={self.ns},topic=="/tasks/exit"'],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.started.append(proc)
        # Subscribe has no acknowledgement: wait until the daemon counts the subscriber.
        wait_for(lambda: _subscribers(self.d) > 0, timeout=5)
        return LineReader(proc)

    @property
    def bundles(self) -> str:
        return os.path.join(self.d.state, TASK_DIR, self.ns)

    @property
    def workdirs(self) -> str:
        return os.path.join(self.d.root, TASK_DIR, self.ns)

    def shims(self) -> dict[str, int]:
        """Live shim processes of this namespace: container id → pid.

        The Go shim is found by its command line (``-namespace <ns> -id <id>``); ours is forked
        from a launcher whose command line it keeps, so it is found by the ``shim.pid`` file its
        ``start`` writes into the bundle.
        """
        found = {}
        for pid, argv in processes():
            if "-namespace" in argv and "-id" in argv and argv[argv.index("-namespace") + 1] == self.ns:
                found[argv[argv.index("-id") + 1]] = pid
        if os.path.isdir(self.bundles):
            for cid in os.listdir(self.bundles):
                try:
                    with open(os.path.join(self.bundles, cid, "shim.pid")) as f:
                        pid = int(f.read().strip())
                    os.kill(pid, 0)
                except (OSError, ValueError):
                    continue
                found.setdefault(cid, pid)
        return found


def _subscribers(d: daemons.Daemon) -> int:
    counts = [
        r.get("subscribers", 0) for r in log_records(d.log_path) if r.get("event") == "event subscriber added"
    ]
    removed = [r for r in log_records(d.log_path) if r.get("event") == "event subscriber removed"]
    return len(counts) - len(removed)


def processes() -> Iterator[tuple[int, list[str]]]:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv:
            yield int(name), argv


def get_task(address: str, ns: str, cid: str) -> Process:
    async def go() -> Process:
        with Client(address, ns, timeout=10) as c:
            resp = await c.stub(TasksStub).get(GetRequest(container_id=cid))
            assert resp.process is not None
            return resp.process

    return asyncio.run(go())


def exits(reader: LineReader, want: set[str], timeout: float) -> dict[str, dict[str, object]]:
    """/tasks/exit events (container id → event) until all of ``want`` came or ``timeout`` passed."""
    seen: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + timeout
    while not want <= set(seen) and (left := deadline - time.monotonic()) > 0:
        line = reader.readline(left)
        if line is None:
            break
        if "/tasks/exit" in line:
            event = json.loads(line[line.index("{") :])
            seen[str(event["container_id"])] = event
    return seen


def start_pyctrd_with_shim(shim: str, env: dict[str, str] | None = None) -> daemons.Daemon:
    base = daemons.new_base("pyctrd-")
    cfg = os.path.join(base, "config.toml")
    with open(cfg, "w") as f:
        f.write(RUNTIME_CONFIG.format(shim=shim))
    return daemons.start_pyctrd(base, "--config", cfg, env=env)


@contextlib.contextmanager
def running_env(
    shim: str, built_images: images.Images, ctr_bin: str, env: dict[str, str] | None = None
) -> Iterator[Env]:
    """pyctrd on ``shim`` (its environment plus ``env``) with busybox imported into a fresh namespace;
    everything undone after."""
    d = start_pyctrd_with_shim(shim, env)
    e = Env(d, ctr_bin, f"restart-{uuid.uuid4().hex[:8]}")
    try:
        e.ok("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], built_images.busybox.oci_tar)
        yield e
    finally:
        for proc in e.started:
            stop_process(proc)
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(Exception):
                for cid in e.tasks():
                    e.ctr("tasks", "kill", "-s", "SIGKILL", cid)
                    e.ctr("tasks", "rm", "-f", cid)
                for cid in e.ok("containers", "ls", "-q").split():
                    e.ctr("containers", "rm", cid)
        d.stop()
        # Whatever this test's shims and containers left (only after a failure or a failed
        # cleanup): shims by PID, containers through runc, in this test's namespace only.
        for pid in e.shims().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runc_state = os.path.join(RUNC_ROOT, e.ns)
        for cid in os.listdir(runc_state) if os.path.isdir(runc_state) else []:
            subprocess.run(["runc", "--root", runc_state, "delete", "--force", cid], capture_output=True)
        for path in mounts_under(e.bundles):
            subprocess.run(["umount", "-l", path], capture_output=True)
        daemons.cleanup(d)
        remove_namespace_dirs(e.ns)


@pytest.fixture(params=SHIMS)
def env(request: pytest.FixtureRequest, built_images: images.Images, ctr_bin: str) -> Iterator[Env]:
    with running_env(request.param, built_images, ctr_bin) as e:
        yield e


FAILING_DELETE = """#!/bin/sh
# {shim}, except that its cleanup after a dead shim ("delete") fails.
for arg; do last=$arg; done
[ "$last" = delete ] && {{ echo "cleanup refused" >&2; exit 1; }}
exec {shim} "$@"
"""


@pytest.fixture(params=SHIMS)
def env_failing_delete(
    request: pytest.FixtureRequest, built_images: images.Images, ctr_bin: str, tmp_path: str
) -> Iterator[Env]:
    # Our shim is installed beside pyctrd in the venv, which need not be on PATH.
    shim = shutil.which(request.param) or shutil.which(request.param, path=daemons.VENV_BIN)
    assert shim is not None
    wrapper = os.path.join(str(tmp_path), "shim-failing-delete")
    with open(wrapper, "w") as f:
        f.write(FAILING_DELETE.format(shim=shim))
    os.chmod(wrapper, 0o755)
    with running_env(wrapper, built_images, ctr_bin) as e:
        yield e


def container_cgroups(ns: str) -> list[str]:
    """Cgroups of this namespace's containers (runc puts them at ``/<ns>/<id>`` in each hierarchy)."""
    return [p for p in glob.glob(f"/sys/fs/cgroup/*/{ns}/*") if os.path.isdir(p)]


def remove_namespace_dirs(ns: str) -> None:
    """The empty per-namespace dirs runc leaves (containerd's too): its state root and cgroups."""
    for path in [os.path.join(RUNC_ROOT, ns), *glob.glob(f"/sys/fs/cgroup/*/{ns}")]:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def test_restart_finds_running_tasks_and_reports_the_one_that_died(env: Env) -> None:
    ids = [f"c{i}" for i in range(5)]
    for cid in ids:
        env.ok("run", "-d", IMAGE, cid, "sleep", "1000")
    before = env.tasks()
    assert sorted(before) == ids and all(status == "RUNNING" for _, status in before.values())
    shims = env.shims()
    assert sorted(shims) == ids
    for cid in ids:
        assert mounts_under(os.path.join(env.bundles, cid, "rootfs"))  # the shim mounted the rootfs

    # Crash the daemon, then lose one container while nobody is listening.
    env.d.kill()
    victim = "c2"
    os.kill(before[victim][0], signal.SIGKILL)
    wait_for(lambda: not alive(before[victim][0]), timeout=5)

    daemons.restart(env.d)
    reader = env.events()
    after = env.tasks()
    assert after == {
        cid: (pid, "STOPPED" if cid == victim else status) for cid, (pid, status) in before.items()
    }
    p = get_task(env.d.address, env.ns, victim)
    assert (p.id, p.pid, p.status, p.exit_status) == (victim, before[victim][0], Status.STOPPED, 137)
    assert get_task(env.d.address, env.ns, "c0").status == Status.RUNNING
    assert env.shims() == shims  # reconnected, none restarted

    # The exit was reported: restore publishes it (logged) and the shim may resend it.
    seen = exits(reader, {victim}, timeout=2.0)
    assert victim in seen or published_exits(env.d), env.d.log()[-3000:]
    if victim in seen:
        assert (seen[victim]["exit_status"], seen[victim]["pid"]) == (137, before[victim][0])

    # Everything can be killed and removed; nothing is left afterwards.
    for cid in ids:
        if cid != victim:
            env.ok("tasks", "kill", "-s", "SIGKILL", cid)
    wait_for(lambda: all(status == "STOPPED" for _, status in env.tasks().values()), timeout=10)
    late = exits(reader, {cid for cid in ids if cid != victim}, timeout=5.0)
    assert {cid for cid in ids if cid != victim} <= set(late)
    assert all(late[cid]["exit_status"] == 137 for cid in late)
    for cid in ids:
        env.ctr("tasks", "rm", cid)
        env.ok("containers", "rm", cid)
    assert_nothing_left(env, shims, [pid for pid, _ in before.values()])


def test_restart_cleans_up_after_a_shim_that_died_meanwhile(env: Env) -> None:
    env.ok("run", "-d", IMAGE, "lost", "sleep", "1000")
    env.ok("run", "-d", IMAGE, "kept", "sleep", "1000")
    before = env.tasks()
    shims = env.shims()

    env.d.kill()
    os.kill(shims["lost"], signal.SIGKILL)
    wait_for(lambda: not alive(shims["lost"]), timeout=5)
    daemons.restart(env.d)

    # As containerd does: the dead shim's task is cleaned up (``shim delete`` kills what it ran)
    # and reported exited; it is no longer listed; the other task is untouched.
    tasks = env.tasks()
    assert tasks.get("lost", (0, "STOPPED"))[1] == "STOPPED"
    assert tasks["kept"] == before["kept"]
    wait_for(lambda: not alive(before["lost"][0]), timeout=5)
    wait_for(lambda: not os.path.exists(os.path.join(env.bundles, "lost")), timeout=5)
    assert mounts_under(os.path.join(env.bundles, "lost")) == []
    assert published_exits(env.d)  # during restore, before anyone could subscribe

    env.ctr("tasks", "rm", "lost")
    env.ok("containers", "rm", "lost")
    env.ok("tasks", "kill", "-s", "SIGKILL", "kept")
    wait_for(lambda: env.tasks()["kept"][1] == "STOPPED", timeout=10)
    env.ok("tasks", "rm", "kept")
    env.ok("containers", "rm", "kept")
    assert_nothing_left(env, shims, [pid for pid, _ in before.values()])


def published_exits(d: daemons.Daemon) -> list[dict[str, object]]:
    return [
        r
        for r in log_records(d.log_path)
        if r.get("event") == "event published" and r.get("topic") == "/tasks/exit"
    ]


def assert_nothing_left(env: Env, shims: dict[str, int], pids: list[int]) -> None:
    """No shim or container process, mount, bundle or work dir of this test remains."""
    assert env.tasks() == {} and env.ok("containers", "ls", "-q") == ""
    wait_for(lambda: not env.shims(), timeout=10)
    assert not any(alive(pid) for pid in shims.values())
    assert not any(alive(pid) for pid in pids)
    assert mounts_under(env.bundles) == []
    assert not os.path.exists(env.bundles) or os.listdir(env.bundles) == []
    assert not os.path.exists(env.workdirs) or os.listdir(env.workdirs) == []
    assert container_cgroups(env.ns) == []
    runc_state = os.path.join(RUNC_ROOT, env.ns)
    assert not os.path.exists(runc_state) or os.listdir(runc_state) == []


def test_shim_killed_while_daemon_runs_is_reported_stopped(env: Env) -> None:
    cid = "victim"
    env.ok("run", "-d", IMAGE, cid, "sleep", "1000")
    env.ok("run", "-d", IMAGE, "bystander", "sleep", "1000")
    pid = env.tasks()[cid][0]
    shim = env.shims()[cid]
    reader = env.events()

    os.kill(shim, signal.SIGKILL)
    got = exits(reader, {cid}, timeout=10.0)
    assert cid in got, env.d.log()[-3000:]
    assert (got[cid]["exit_status"], got[cid]["pid"]) == (137, pid)

    # The task is gone or stopped; its process, bundle and mounts are cleaned up.
    wait_for(lambda: env.tasks().get(cid, (0, "STOPPED"))[1] == "STOPPED", timeout=5)
    wait_for(lambda: not alive(pid), timeout=5)
    bundle = os.path.join(env.bundles, cid)
    wait_for(lambda: not os.path.exists(bundle), timeout=5)
    assert mounts_under(bundle) == []
    assert not os.path.exists(os.path.join(env.workdirs, cid))
    assert env.tasks()["bystander"][1] == "RUNNING"  # the other task is untouched

    env.ctr("tasks", "rm", cid)
    env.ok("containers", "rm", cid)
    env.ok("tasks", "kill", "-s", "SIGKILL", "bystander")
    wait_for(lambda: env.tasks()["bystander"][1] == "STOPPED", timeout=10)
    env.ok("tasks", "rm", "bystander")
    env.ok("containers", "rm", "bystander")
    wait_for(lambda: not env.shims(), timeout=10)
    assert mounts_under(env.bundles) == []


def test_a_failed_shim_cleanup_never_deletes_through_the_rootfs(env_failing_delete: Env) -> None:
    # With the native snapshotter the rootfs is a bind mount of the snapshot itself: removing the
    # bundle while it is still mounted would delete the container's files for good.
    env = env_failing_delete
    cid = "precious"
    env.ok("run", "-d", "--snapshotter", "native", IMAGE, cid, "sleep", "1000")
    pid = env.tasks()[cid][0]
    try:
        _failed_cleanup_keeps_files(env, cid)
    finally:
        # The failing `shim delete` never ran `runc delete --force`: the container's process and
        # runc's record of it are still there, and only this test knows to end them.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for root in (
            os.path.join(RUNC_ROOT, env.ns),
            os.path.join(os.path.dirname(env.d.address), "runc", env.ns),
        ):
            if os.path.isdir(root):
                subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True)


def _failed_cleanup_keeps_files(env: Env, cid: str) -> None:
    printed = env.ok("snapshots", "--snapshotter", "native", "mounts", "/unused", cid).split()
    snapshot = printed[printed.index("-t") + 2]  # mount -t bind <source> <target> -o …
    files = sorted(os.listdir(snapshot))
    assert "bin" in files
    bundle = os.path.join(env.bundles, cid)
    assert mounts_under(os.path.join(bundle, "rootfs"))

    os.kill(env.shims()[cid], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(bundle), timeout=10)
    assert mounts_under(env.bundles) == []  # also not under a renamed-away ".precious"
    assert sorted(os.listdir(snapshot)) == files
    assert os.path.exists(os.path.join(snapshot, "bin", "busybox"))
    assert cid not in env.tasks() or env.tasks()[cid][1] == "STOPPED"
    env.ok("containers", "rm", cid)
