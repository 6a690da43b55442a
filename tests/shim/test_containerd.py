"""The real containerd 1.6 driving our shim: ``ctr run --runtime io.containerd.pyrunc.v2``.

containerd starts the shim with ``start``, talks ttrpc to it, receives its events, and runs its
``delete`` action after every disconnect; ctr prepares the stdio FIFOs. See harness.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers.streams import wait_for
from tests.shim import harness
from tests.shim.harness import Containerd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("containerd") is None or shutil.which("ctr") is None,
    reason="needs root, containerd and ctr",
)


@pytest.fixture(scope="module")
def ctrd() -> Iterator[Containerd]:
    d = harness.start_with_image()
    try:
        yield d
    finally:
        d.cleanup()


@contextlib.contextmanager
def removed(d: Containerd, *ids: str) -> Iterator[None]:
    """Whatever the test did, its containers are gone afterwards."""
    try:
        yield
    finally:
        for id in ids:
            d.ctr("tasks", "kill", "-s", "SIGKILL", id, check=False)
            d.ctr("tasks", "rm", "-f", id, check=False)
            d.ctr("containers", "rm", id, check=False)


def task_row(d: Containerd, id: str) -> list[str]:
    for line in d.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == id:
            return fields
    return []


def wait_status(d: Containerd, id: str, status: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        row = task_row(d, id)
        if row and row[2] == status:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{id}: {row} never reached {status}")
        time.sleep(0.05)


def wait_exited(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running")
        time.sleep(0.05)


def test_run_rm_prints_and_exits_zero(ctrd: Containerd) -> None:
    with removed(ctrd, "echo1"):
        result = ctrd.ctr(*ctrd.run_args("echo1", "echo", "hi", flags=("--rm",)))
    assert result.stdout == "hi\n"
    assert not os.path.exists(ctrd.bundle("echo1"))


def test_run_rm_exit_code(ctrd: Containerd) -> None:
    with removed(ctrd, "exit3"):
        result = ctrd.ctr(
            *ctrd.run_args("exit3", "sh", "-c", "echo out; exit 3", flags=("--rm",)), check=False
        )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "out\n"


def test_detached_task_exec_ps_pause_metrics_kill(ctrd: Containerd) -> None:
    with removed(ctrd, "det1"):
        ctrd.ctr(*ctrd.run_args("det1", "sleep", "1000", flags=("-d",)))
        row = wait_status(ctrd, "det1", "RUNNING")
        pid = int(row[1])
        shim = ctrd.shim_pids()
        assert len(shim) == 1 and pid > 0

        assert ctrd.ctr("tasks", "exec", "--exec-id", "e1", "det1", "echo", "x").stdout == "x\n"
        exec_rc = ctrd.ctr("tasks", "exec", "--exec-id", "e2", "det1", "sh", "-c", "exit 5", check=False)
        assert exec_rc.returncode == 5

        ps = ctrd.ctr("tasks", "ps", "det1").stdout.split()
        assert str(pid) in ps

        ctrd.ctr("tasks", "pause", "det1")
        assert task_row(ctrd, "det1")[2] == "PAUSED"
        ctrd.ctr("tasks", "resume", "det1")
        assert task_row(ctrd, "det1")[2] == "RUNNING"

        metrics = ctrd.ctr("tasks", "metrics", "det1").stdout
        assert "pids.current" in metrics and "memory.usage_in_bytes" in metrics

        ctrd.ctr("tasks", "kill", "-s", "SIGKILL", "det1")
        assert wait_status(ctrd, "det1", "STOPPED")[1] == str(pid)
        ctrd.ctr("tasks", "rm", "det1")
        assert task_row(ctrd, "det1") == []
        # The shim exits once its last task is deleted (containerd sends Shutdown).
        wait_exited(shim[0])


def test_stdin_is_copied_until_close(ctrd: Containerd) -> None:
    args = [
        "ctr",
        "-a",
        ctrd.address,
        "-n",
        harness.NAMESPACE,
        *ctrd.run_args("in1", "wc", "-c", flags=("--rm",)),
    ]
    with removed(ctrd, "in1"):
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"x" * 100_000)
        proc.stdin.flush()
        # ctr sends CloseIO when its stdin ends, but only if the task exists by then (it races
        # otherwise, with the Go shim too): close it once the task runs.
        wait_status(ctrd, "in1", "RUNNING")
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait(20) == 0
    assert out.split() == [b"100000"]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a pty")
def test_terminal(ctrd: Containerd) -> None:
    command = " ".join(["ctr", "-a", ctrd.address, "-n", harness.NAMESPACE])
    command += " " + " ".join(ctrd.run_args("tty1", "sh", "-c", "'tty; echo done'", flags=("--rm", "-t")))
    with removed(ctrd, "tty1"):
        result = subprocess.run(
            ["script", "-qec", command, "/dev/null"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dev/pts/" in result.stdout and "done" in result.stdout


def test_oom_event(ctrd: Containerd) -> None:
    events = subprocess.Popen(
        ["ctr", "-a", ctrd.address, "-n", harness.NAMESPACE, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []

    def collect() -> None:
        assert events.stdout is not None
        for line in events.stdout:
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()

    def topics() -> list[str]:
        return [line.split()[5] for line in list(lines) if '"oom1"' in line and len(line.split()) > 5]

    try:
        time.sleep(0.2)
        hog = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}"
        with removed(ctrd, "oom1"):
            result = ctrd.ctr(
                *ctrd.run_args("oom1", "sh", "-c", hog, flags=("--rm", "--memory-limit", str(16 << 20))),
                check=False,
            )
        assert result.returncode == 137
        # The shim forwards its events asynchronously (containerd publishes /tasks/delete itself):
        # wait for the whole sequence rather than for a fixed time.
        wait_for(
            lambda: {"/tasks/oom", "/tasks/exit", "/tasks/delete"} <= set(topics()),
            timeout=10,
            message=lambda: "".join(lines),
        )
    finally:
        events.send_signal(signal.SIGTERM)
        events.wait(5)
        reader.join(5)
    seen = topics()
    assert seen.index("/tasks/start") < seen.index("/tasks/oom") < seen.index("/tasks/exit")
    assert seen.index("/tasks/exit") < seen.index("/tasks/delete")


def _uss_mib(pid: int) -> float:
    private = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    return private / 1024


def test_forked_shims_share_the_launchers_memory(ctrd: Containerd) -> None:
    with removed(ctrd, "mem1", "mem2"):
        for id in ("mem1", "mem2"):
            ctrd.ctr(*ctrd.run_args(id, "sleep", "1000", flags=("-d",)))
        launcher = ctrd.launcher_pid()
        assert launcher is not None, "no launcher: shims were exec'd"
        for pid in ctrd.shim_pids():
            # A fresh interpreter measures ~20 MiB here, a forked shim ~6 (see launcher.py).
            assert _uss_mib(pid) < 12, f"shim {pid} has {_uss_mib(pid):.1f} MiB of private memory"


def test_shim_survives_containerd_restart() -> None:
    d = harness.start_with_image()
    try:
        d.ctr(*d.run_args("keep1", "sleep", "1000", flags=("-d",)))
        pid = wait_status(d, "keep1", "RUNNING")[1]
        shims = d.shim_pids()
        d.stop(signal.SIGKILL)
        for shim in shims:
            assert os.path.exists(f"/proc/{shim}")
        d.start()
        assert task_row(d, "keep1") == ["keep1", pid, "RUNNING"]
        assert d.ctr("tasks", "exec", "--exec-id", "after", "keep1", "echo", "again").stdout == "again\n"
        d.ctr("tasks", "kill", "-s", "SIGKILL", "keep1")
        wait_status(d, "keep1", "STOPPED")
        d.ctr("tasks", "rm", "keep1")
        d.ctr("containers", "rm", "keep1")
        for shim in shims:
            wait_exited(shim)
    finally:
        d.cleanup()
