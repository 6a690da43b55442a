"""``pyctr run``, ``pyctr tasks`` and ``pyctr containers`` against a real pyctrd, runc and registry.

One daemon for the module, with the test image pulled once; each test uses its own container ids
and removes its tasks and containers (``tasks rm -f``, ``containers rm``) also when it fails.
pyctr processes started in the background are stopped by their PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import daemons, registry

STOP_TIMEOUT = 15


@pytest.fixture(scope="module")
def env(image_registry: registry.Registry) -> Iterator[tuple[daemons.Daemon, str]]:
    d = daemons.start_pyctrd()
    try:
        ref = image_registry.ref("library/busybox")
        r = daemons.run([daemons.PYCTR, "-a", d.address, "images", "pull", "--plain", ref], timeout=60)
        assert r.returncode == 0, r.stderr
        yield d, ref
    finally:
        daemons.cleanup(d)


class Pyctr:
    def __init__(self, d: daemons.Daemon, image: str) -> None:
        self.d, self.image = d, image
        self.ids: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *args: str) -> list[str]:
        return [daemons.PYCTR, "-a", self.d.address, *args]

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        if input is None:
            return daemons.run(self.argv(*args), timeout=30)
        return subprocess.run(self.argv(*args), input=input, capture_output=True, text=True, timeout=30)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def new_id(self, prefix: str) -> str:
        cid = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.ids.append(cid)
        return cid

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``pyctr run [flags…] IMAGE ID CMD…``: the last flag-free words are id and command."""
        return self(*args)

    def tasks(self) -> dict[str, dict[str, object]]:
        return {t["id"]: t for t in json.loads(self.ok("tasks", "ls", "--format", "json"))}

    def wait_status(self, cid: str, status: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tasks().get(cid, {}).get("status") == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {cid} never became {status}: {self.tasks().get(cid)}")

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        if self.ids:  # both commands go on past ids that are already gone
            self("tasks", "rm", "-f", *self.ids)
            self("containers", "rm", *self.ids)


@pytest.fixture
def pyctr(env: tuple[daemons.Daemon, str]) -> Iterator[Pyctr]:
    p = Pyctr(*env)
    try:
        yield p
    finally:
        p.cleanup()


def test_run_flags_reach_the_process(pyctr: Pyctr) -> None:
    host_dir = tempfile.mkdtemp(prefix="pyctr-mount-")
    try:
        with open(os.path.join(host_dir, "hello"), "w") as f:
            f.write("from the host\n")
        os.chmod(host_dir, 0o755)  # readable by the container's user 65534
        os.chmod(os.path.join(host_dir, "hello"), 0o644)
        cid = pyctr.new_id("flags")
        script = (
            "echo FOO=$FOO; pwd; id -u; id -g; cat /data/hello; "
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; "
            "cat /proc/self/cgroup"
        )
        r = pyctr.run(
            "run", "--rm", "--env", "FOO=bar", "--cwd", "/tmp", "--user", "65534:65534",
            "--mount", f"type=bind,src={host_dir},dst=/data,options=rbind:ro",
            "--memory-limit", str(64 << 20), "--cpus", "0.5",
            pyctr.image, cid, "sh", "-c", script,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:7] == ["FOO=bar", "/tmp", "65534", "65534", "from the host", str(64 << 20), "50000"]
        assert any(line.endswith(f":/default/{cid}") for line in lines[7:]), lines
        # --rm: no container, no task left
        assert cid not in pyctr.ok("containers", "ls", "-q").split()
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_run_read_only_and_exit_code(pyctr: Pyctr) -> None:
    r = pyctr.run("run", "--rm", "--read-only", pyctr.image, pyctr.new_id("ro"), "touch", "/x")
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr
    r = pyctr.run("run", "--rm", pyctr.image, pyctr.new_id("rw"), "sh", "-c", "touch /x && exit 42")
    assert r.returncode == 42, r.stderr


def _cap_mask(names: list[str]) -> int:
    from pyctr.ctr import oci

    return sum(1 << oci.CAPABILITY_NAMES.index(name) for name in names)


def _status_caps(text: str) -> int:
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("CapEff:")), 16)


def test_run_privileged_and_capability_flags(pyctr: Pyctr) -> None:
    from pyctr.ctr import oci

    script = "cat /proc/self/status; echo DEV $(ls /dev); echo TIMERS $(wc -c < /proc/timer_list)"
    r = pyctr.run("run", "--rm", pyctr.image, pyctr.new_id("plain"), "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert _status_caps(r.stdout) == _cap_mask(oci.DEFAULT_CAPS)
    plain_dev = next(line for line in r.stdout.splitlines() if line.startswith("DEV ")).split()[1:]
    assert "TIMERS 0" in r.stdout  # masked: /dev/null is bound over it

    # Privileged: the caller's own capabilities, the host's devices, nothing masked.
    r = pyctr.run("run", "--rm", "--privileged", pyctr.image, pyctr.new_id("priv"), "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert _status_caps(r.stdout) == _cap_mask(oci.current_capabilities())
    dev = next(line for line in r.stdout.splitlines() if line.startswith("DEV ")).split()[1:]
    host_only = {d["path"].removeprefix("/dev/") for d in oci.host_devices()} - set(plain_dev)
    assert host_only and {name for name in host_only if "/" not in name} <= set(dev)
    assert "TIMERS 0" not in r.stdout

    # Added and dropped capabilities, on the default set.
    r = pyctr.run(
        "run", "--rm", "--cap-add", "CAP_SYS_ADMIN", "--cap-drop", "CAP_CHOWN",
        pyctr.image, pyctr.new_id("caps"), "cat", "/proc/self/status",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = [c for c in oci.DEFAULT_CAPS if c != "CAP_CHOWN"] + ["CAP_SYS_ADMIN"]
    assert _status_caps(r.stdout) == _cap_mask(want)
    r = pyctr.run("run", "--rm", "--cap-add", "SYS_ADMIN", pyctr.image, pyctr.new_id("bad"), "true")
    assert r.returncode != 0 and "'CAP_' prefix" in r.stderr, r.stderr


def test_run_net_host_sees_host_interfaces(pyctr: Pyctr) -> None:
    r = pyctr.run("run", "--rm", "--net-host", pyctr.image, pyctr.new_id("net"), "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(os.listdir("/sys/class/net"))
    own = pyctr.ok("run", "--rm", pyctr.image, pyctr.new_id("net"), "ls", "/sys/class/net")
    assert own.split() == ["lo"]


def test_run_tty_under_a_pty(pyctr: Pyctr) -> None:
    if shutil.which("script") is None:
        pytest.skip("script(1) is not installed")
    cmd = " ".join(
        pyctr.argv("run", "--rm", "-t", pyctr.image, pyctr.new_id("tty"), "sh", "-c", "'tty; exit 7'")
    )
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert "/dev/pts/0" in r.stdout
    # -t -i: our terminal goes raw and its input reaches the process's terminal
    script = "'read x; echo got-$x'"
    cmd = " ".join(
        pyctr.argv("run", "--rm", "-t", "-i", pyctr.image, pyctr.new_id("tty"), "sh", "-c", script)
    )
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], input="hello\n", capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "got-hello" in r.stdout


def test_ctrl_c_stops_a_sleep_container_with_130(pyctr: Pyctr) -> None:
    cid = pyctr.new_id("intr")
    p = subprocess.Popen(
        pyctr.argv("run", "--rm", pyctr.image, cid, "sleep", "100"), stdin=subprocess.DEVNULL, text=True
    )
    pyctr.procs.append(p)
    pyctr.wait_status(cid, "RUNNING")
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(STOP_TIMEOUT) == 130
    assert cid not in pyctr.tasks()


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = out.splitlines()
    return lines[0].split(), [line.split() for line in lines[1:] if line.strip()]


def test_detached_task_lifecycle(pyctr: Pyctr) -> None:
    cid = pyctr.new_id("life")
    pyctr.ok("run", "-d", "--label", "tier=test", pyctr.image, cid, "sleep", "100")
    pyctr.wait_status(cid, "RUNNING")

    header, rows = _table(pyctr.ok("tasks", "ls"))
    assert header == ["TASK", "PID", "STATUS"]
    row = {r[0]: r for r in rows}[cid]
    pid = int(row[1])
    assert row[2] == "RUNNING"
    header, rows = _table(pyctr.ok("ps", cid))
    assert header == ["PID", "INFO"] and [pid, "-"] == [int(rows[0][0]), rows[0][1]]

    # exec: exit code, stdin, and the exec's options
    assert pyctr("exec", cid, "sh", "-c", "exit 5").returncode == 5
    r = pyctr("tasks", "exec", "--exec-id", "e1", "--cwd", "/tmp", "--env", "X=1", "-u", "65534", cid,
              "sh", "-c", "pwd; echo $X; id -u")  # fmt: skip
    assert (r.returncode, r.stdout.split()) == (0, ["/tmp", "1", "65534"]), r.stderr
    assert pyctr("exec", "-i", cid, "cat", input="through stdin\n").stdout == "through stdin\n"

    pyctr.ok("tasks", "pause", cid)
    assert pyctr.tasks()[cid]["status"] == "PAUSED"
    pyctr.ok("tasks", "resume", cid)
    assert pyctr.tasks()[cid]["status"] == "RUNNING"

    metrics = json.loads(pyctr.ok("tasks", "metrics", "--format", "json", cid))
    assert metrics["pids"]["current"] >= 1
    assert metrics["memory"]["usage"]["usage"] > 0
    table = pyctr.ok("tasks", "metrics", cid)
    assert "memory.usage_in_bytes" in table and "pids.current" in table

    # containers ls / info
    header, rows = _table(pyctr.ok("containers", "ls"))
    assert header == ["CONTAINER", "IMAGE", "RUNTIME"]
    assert [cid, pyctr.image, "io.containerd.runc.v2"] in rows
    assert cid in pyctr.ok("c", "ls", "-q").split()
    assert cid in [c["ID"] for c in json.loads(pyctr.ok("containers", "ls", "--format", "json"))]
    info = json.loads(pyctr.ok("containers", "info", cid))
    assert info["Spec"]["process"]["args"] == ["sleep", "100"]
    assert info["Labels"]["tier"] == "test"
    assert pyctr.ok("containers", "label", cid, "tier=", "extra=1").strip() == (
        "extra=1,io.containerd.image.config.stop-signal=SIGTERM"
    )

    # a running task keeps its container; SIGTERM is ignored by sleep as pid 1, SIGKILL is not
    r = pyctr("containers", "rm", cid)
    assert r.returncode == 1 and "cannot delete a non stopped container" in r.stderr
    r = pyctr("tasks", "rm", cid)
    assert r.returncode == 1 and "task must be stopped before deletion" in r.stderr
    pyctr.ok("kill", "-s", "KILL", cid)
    pyctr.wait_status(cid, "STOPPED")
    assert pyctr.tasks()[cid]["exit_status"] == 137
    pyctr.ok("containers", "rm", cid)
    assert cid not in pyctr.ok("containers", "ls", "-q").split()
    assert cid not in pyctr.ok("snapshots", "ls")


def test_tasks_rm_force_kills_first(pyctr: Pyctr) -> None:
    cid = pyctr.new_id("force")
    pyctr.ok("run", "-d", pyctr.image, cid, "sleep", "100")
    pyctr.wait_status(cid, "RUNNING")
    r = pyctr("tasks", "rm", "-f", cid)
    assert r.returncode == 0, r.stderr
    assert cid not in pyctr.tasks()


def test_attach_then_start_again(pyctr: Pyctr) -> None:
    cid = pyctr.new_id("att")
    pyctr.ok("run", "-d", pyctr.image, cid, "sh", "-c", "echo early; sleep 1; echo late; exit 4")
    r = pyctr("tasks", "attach", cid)
    assert r.returncode == 4, r.stderr
    assert r.stdout.split()[-1] == "late"
    assert cid not in pyctr.tasks()  # attach deletes the task it followed, as ctr's does
    # start: a new task on the same container, followed until it exits
    r = pyctr("tasks", "start", cid)
    assert (r.returncode, r.stdout.split()) == (4, ["early", "late"]), r.stderr


def test_exec_exit_code_and_kill_exec(pyctr: Pyctr) -> None:
    cid = pyctr.new_id("ex")
    stop = "io.containerd.image.config.stop-signal=SIGKILL"  # what pyctr kill sends by default
    pyctr.ok("run", "-d", "--label", stop, pyctr.image, cid, "sleep", "100")
    pyctr.wait_status(cid, "RUNNING")
    pyctr.ok("exec", "-d", "--exec-id", "bg", cid, "sleep", "50")
    infos = [line.split() for line in pyctr.ok("ps", cid).splitlines()[1:]]
    assert any(len(i) > 1 and i[1] == "execId:bg" for i in infos), infos
    pyctr.ok("kill", "--exec-id", "bg", "-s", "SIGKILL", cid)
    wait_exec_exit(lambda: pyctr("tasks", "rm", "--exec-id", "bg", cid))
    pyctr.ok("kill", cid)
    pyctr.wait_status(cid, "STOPPED")
    assert pyctr.tasks()[cid]["exit_status"] == 137


def wait_exec_exit(delete: Callable[[], subprocess.CompletedProcess[str]]) -> None:
    deadline = time.monotonic() + 10
    while True:
        r = delete()
        if r.returncode == 137:
            return
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.1)
