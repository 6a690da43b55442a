"""``ctr run`` and ``ctr tasks``/``ctr containers`` on pyctrd, compared with containerd.

pyctrd drives each shim in ``SHIMS``: Debian's Go shim and ours. Each daemon works in a
namespace of its own, so the runc state the Go shims keep under
``/run/containerd/runc/<namespace>`` never collides. Every test removes
its tasks and containers, also when it fails.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import daemons, registry

pytestmark = pytest.mark.interop

SHIMS = ["containerd-shim-runc-v2", "containerd-shim-pyrunc-v2"]
MISMATCH_WARNINGS = {"WARNING: version mismatch", "WARNING: revision mismatch"}
RUNC_ROOT = "/run/containerd/runc"  # where both daemons' Go shims keep runc state, per namespace
RUNTIME_CONFIG = """version = 2
[plugins."io.containerd.runtime.v2.task"]
  runtimes = {{"io.containerd.runc.v2" = "{shim}"}}
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start_pyctrd_with_shim(shim: str) -> daemons.Daemon:
    """pyctrd whose ``io.containerd.runc.v2`` runtime is ``shim``."""
    base = daemons.new_base("pyctrd-")
    cfg = os.path.join(base, "config.toml")
    with open(cfg, "w") as f:
        f.write(RUNTIME_CONFIG.format(shim=shim))
    return daemons.start_pyctrd(base, "--config", cfg)


def stderr_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without version warnings, with logrus times blanked."""
    return [
        re.sub(r'^time="[^"]*"', 'time="…"', line)
        for line in r.stderr.splitlines()
        if line.strip() not in MISMATCH_WARNINGS
    ]


class Ctr:
    def __init__(self, exe: str, d: daemons.Daemon, ns: str, image: str) -> None:
        self.exe, self.d, self.ns, self.image = exe, d, ns, image

    def argv(self, *args: str) -> list[str]:
        return [self.exe, "-a", self.d.address, "-n", self.ns, *args]

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.argv(*args)
        if input is None:
            return daemons.run(cmd, timeout=timeout)
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, (self.d.address, args, r.stderr)
        return r.stdout

    def tasks(self) -> dict[str, list[str]]:
        """``ctr tasks ls`` rows: id → [pid, status]."""
        return {c[0]: c[1:] for c in (line.split() for line in self.ok("tasks", "ls").splitlines()[1:]) if c}

    def wait_status(self, cid: str, status: str, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.tasks().get(cid)
            if (row and row[1] == status) or time.monotonic() > deadline:
                assert row and row[1] == status, (cid, row, status)
                return row
            time.sleep(0.05)

    def remove_everything(self) -> None:
        """Force away every task and container of the namespace (cleanup, also after failures)."""
        for cid in self.tasks():
            self("tasks", "kill", "-s", "SIGKILL", cid)
            self("tasks", "rm", "-f", cid)
        for cid in self.ok("containers", "ls", "-q").split():
            self("containers", "rm", cid)


@pytest.fixture(scope="module", params=SHIMS)
def pyd(request: pytest.FixtureRequest) -> Iterator[daemons.Daemon]:
    d = start_pyctrd_with_shim(request.param)
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture(scope="module")
def pulled(
    pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str, image_registry: registry.Registry
) -> Iterator[tuple[Ctr, Ctr]]:
    """busybox pulled into a fresh namespace on each daemon; emptied afterwards."""
    image = image_registry.ref("library/busybox")
    pair = (Ctr(ctr_bin, pyd, unique("run-py"), image), Ctr(ctr_bin, containerd, unique("run-cd"), image))
    for ctr in pair:
        ctr.ok("images", "pull", "--plain-http", image)
    try:
        yield pair
    finally:
        for ctr in pair:
            ctr.remove_everything()
            ctr("images", "rm", "--sync", image)
            ctr("namespaces", "rm", ctr.ns)
            # runc leaves its state root and cgroups of the namespace behind, empty (as with
            # containerd): a container's own ones must be gone.
            assert [p for p in glob.glob(f"/sys/fs/cgroup/*/{ctr.ns}/*") if os.path.isdir(p)] == []
            for path in [os.path.join(RUNC_ROOT, ctr.ns), *glob.glob(f"/sys/fs/cgroup/*/{ctr.ns}")]:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


@pytest.fixture
def both(pulled: tuple[Ctr, Ctr]) -> Iterator[tuple[Ctr, Ctr]]:
    try:
        yield pulled
    finally:
        for ctr in pulled:
            ctr.remove_everything()


def test_run_rm_echo(both: tuple[Ctr, Ctr]) -> None:
    for ctr in both:
        r = ctr("run", "--rm", ctr.image, unique("echo"), "echo", "hi")
        assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
        assert stderr_lines(r) == []
        assert ctr.ok("containers", "ls", "-q") == ""


def test_run_exit_code(both: tuple[Ctr, Ctr]) -> None:
    for ctr in both:
        r = ctr("run", "--rm", ctr.image, unique("exit"), "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, stderr_lines(r)) == (3, "out\n", ["err"])


def test_run_stdin(both: tuple[Ctr, Ctr]) -> None:
    # ctr 1.6 always connects its stdin to the task (it has no -i flag), and sends CloseIO at
    # stdin's EOF, but only once the task exists: an EOF before that is lost and the task waits
    # for input forever (with containerd too). So the input goes in once the task runs.
    for ctr in both:
        cid = unique("cat")
        proc = subprocess.Popen(
            ctr.argv("run", "--rm", ctr.image, cid, "sh", "-c", "cat; echo done"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            ctr.wait_status(cid, "RUNNING")
            out, err = proc.communicate(b"data\nmore\n", timeout=15)
        finally:
            if proc.poll() is None:
                ctr("tasks", "kill", "-s", "SIGKILL", cid)
                proc.communicate(timeout=15)
        assert (proc.returncode, out) == (0, b"data\nmore\ndone\n"), err


def test_detached_task_life_cycle(both: tuple[Ctr, Ctr]) -> None:
    seen = []
    cid = unique("life")  # the same id on both: the namespaces differ
    for ctr in both:
        got: dict[str, object] = {}
        ctr.ok("run", "-d", ctr.image, cid, "sleep", "1000")
        header, *_ = ctr.ok("tasks", "ls").splitlines()
        got["tasks header"] = header.split()
        pid, status = ctr.tasks()[cid]
        got["status"] = status
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]

        r = ctr("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo x; id -u")
        got["exec"] = (r.returncode, r.stdout, stderr_lines(r))
        ps = ctr.ok("tasks", "ps", cid).splitlines()
        got["ps header"] = ps[0].split()
        assert pid in [line.split()[0] for line in ps[1:]]

        ctr.ok("tasks", "pause", cid)
        got["paused"] = ctr.wait_status(cid, "PAUSED")[1]
        ctr.ok("tasks", "resume", cid)
        got["resumed"] = ctr.wait_status(cid, "RUNNING")[1]

        metrics = ctr.ok("tasks", "metrics", cid).splitlines()
        got["metrics"] = (metrics[0].split(), metrics[1].split()[0], [m.split()[0] for m in metrics[2:] if m])
        # Values differ between two containers, but not an unlimited limit's encoding.
        got["pids limit"] = [m.split()[1:] for m in metrics if m.startswith("pids.limit")]
        assert '"pids"' in ctr.ok("tasks", "metrics", "--format", "json", cid)

        r = ctr("containers", "rm", cid)
        got["rm running"] = (r.returncode, [line.replace(cid, "<id>") for line in stderr_lines(r)])

        ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
        got["stopped pid"] = ctr.wait_status(cid, "STOPPED")[0] == pid
        r = ctr("tasks", "rm", cid)
        got["tasks rm"] = (r.returncode, [line.replace(cid, "<id>") for line in stderr_lines(r)])
        assert cid not in ctr.tasks()

        cls = ctr.ok("containers", "ls").splitlines()
        got["containers ls"] = (cls[0].split(), [line.split() for line in cls[1:]])
        got["info"] = ctr.ok("containers", "info", cid).count(f'"ID": "{cid}"')
        ctr.ok("containers", "rm", cid)
        got["after rm"] = ctr.ok("containers", "ls", "-q")
        seen.append(got)
        assert not os.path.exists(f"/proc/{pid}/cmdline") or _is_zombie_or_other(pid)
    p, c = seen
    assert p == c
    assert p["tasks header"] == ["TASK", "PID", "STATUS"]
    assert (p["status"], p["paused"], p["resumed"]) == ("RUNNING", "PAUSED", "RUNNING")
    assert p["exec"] == (0, "x\n0\n", [])
    assert p["metrics"][0] == ["ID", "TIMESTAMP"]  # type: ignore[index]
    assert p["rm running"][0] == 1  # type: ignore[index]
    assert p["tasks rm"] == (0, ['time="…" level=warning msg="task <id> exit with non-zero exit code 137"'])
    assert p["containers ls"][0] == ["CONTAINER", "IMAGE", "RUNTIME"]  # type: ignore[index]
    assert p["info"] == 1 and p["after rm"] == ""


def _is_zombie_or_other(pid: str) -> bool:
    """True when ``pid`` is no longer our sleep (reaped and reused, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True
    return fields[0] == "Z" or not cmdline.startswith(b"sleep\0")


def test_tasks_ls_and_containers_ls_format_match(both: tuple[Ctr, Ctr]) -> None:
    outs = []
    ids = [unique("fmt-run"), unique("fmt-new")]  # the same on both: the namespaces differ
    for ctr in both:
        ctr.ok("run", "-d", ctr.image, ids[0], "sleep", "1000")
        ctr.ok("containers", "create", ctr.image, ids[1], "true")
        tasks = ctr.ok("tasks", "ls").splitlines()
        containers = ctr.ok("containers", "ls").splitlines()
        pid = ctr.tasks()[ids[0]][0]
        # Padding depends on the widest cell (pids differ), so: cells compared, and the layout
        # checked to be ctr's tabwriter columns (every cell starts where its header does).
        for table in (tasks, containers):
            assert len({tuple(cell_starts(line)) for line in table}) == 1, table
        rows = [["<pid>" if cell == pid else cell for cell in line.split()] for line in tasks[1:]]
        outs.append(
            (tasks[0].split(), rows, containers[0].split(), sorted(x.split() for x in containers[1:]))
        )
    assert outs[0] == outs[1]
    assert outs[0][1] == [[ids[0], "<pid>", "RUNNING"]]
    assert outs[0][3] == sorted([[i, both[0].image, "io.containerd.runc.v2"] for i in ids])


def cell_starts(line: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", line)]


def test_task_errors_match_containerd(both: tuple[Ctr, Ctr]) -> None:
    results = []
    for ctr in both:
        cid = unique("notask")
        ctr.ok("containers", "create", ctr.image, cid, "true")
        got = []
        for args in (
            ("tasks", "kill", cid),
            ("tasks", "pause", cid),
            ("tasks", "rm", cid),
            ("tasks", "kill", "no-such-container"),
            ("tasks", "start", cid),
        ):
            r = ctr(*args)
            err = [line.replace(cid, "<id>").replace(ctr.ns, "<ns>") for line in stderr_lines(r)]
            got.append((args[:2], r.returncode, err))
        ctr.ok("containers", "rm", cid)
        results.append(got)
    assert results[0] == results[1]
    assert results[0][0][1:] == (1, ["ctr: no running task found: task <id> not found: not found"])


def test_containers_rm_of_a_running_container_fails_like_containerd(both: tuple[Ctr, Ctr]) -> None:
    results = []
    for ctr in both:
        cid = unique("busy")
        ctr.ok("run", "-d", ctr.image, cid, "sleep", "1000")
        r = ctr("containers", "rm", cid)
        results.append((r.returncode, [line.replace(cid, "<id>") for line in stderr_lines(r)]))
        assert ctr.tasks()[cid][1] == "RUNNING"  # untouched
        ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
        ctr.wait_status(cid, "STOPPED")
        ctr.ok("tasks", "rm", cid)
        ctr.ok("containers", "rm", cid)
    assert results[0] == results[1]
    assert results[0][0] == 1
    assert results[0][1][-1].startswith("ctr: cannot delete a non stopped container")


def test_wait_reports_signal_exit(both: tuple[Ctr, Ctr]) -> None:
    # ctr run (attached) returns 128+n when the task dies of signal n.
    for ctr in both:
        cid = unique("sig")
        proc = subprocess.Popen(
            ctr.argv("run", "--rm", ctr.image, cid, "sleep", "1000"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            ctr.wait_status(cid, "RUNNING")
            ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
            assert proc.wait(15) == 128 + signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            proc.communicate()
        assert cid not in ctr.ok("containers", "ls", "-q").split()
