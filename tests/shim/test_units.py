"""Pure parts of the shim: flags, socket addresses, wire helpers, the state table, cgroup readers,
mount options; the keeper's event publisher in-process; plus the reaper and the start/delete actions
as separate processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyctr.api import mount, ttrpc
from pyctr.api import pblite as pw
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api.errdefs import NotFound, Unknown
from pyctr.shim import address, cgroups
from pyctr.shim.__main__ import UsageError, parse_flags
from pyctr.shim.bundle import RuncOptions, kill_all_on_exit, runc_root
from pyctr.shim.process.state import EXEC, INIT, Op, State, transition
from tests.shim.harness import is_mounted

# -- flags -------------------------------------------------------------------------------------------


def test_go_flag_syntax() -> None:
    flags = parse_flags(
        [
            "-namespace",
            "ns",
            "--id=c1",
            "-address=/run/x.sock",
            "-debug",
            "--publish-binary",
            "/bin/c",
            "start",
            "-x",
        ]
    )
    assert (flags.namespace, flags.id, flags.address, flags.publish_binary) == (
        "ns",
        "c1",
        "/run/x.sock",
        "/bin/c",
    )
    assert flags.debug and flags.args == ["start", "-x"]
    assert parse_flags(["-debug=false", "-v"]).debug is False
    assert parse_flags(["-v"]).version
    assert parse_flags(["-namespace", "n", "--", "-id"]).args == ["-id"]
    assert parse_flags(["-bundle", "/b", "-socket", "/s", "delete"]).bundle == "/b"
    for bad in (["-nope"], ["-id"], ["-debug=maybe"], ["---id=x"]):
        with pytest.raises(UsageError):
            parse_flags(bad)


# -- socket address ----------------------------------------------------------------------------------


def test_socket_address_is_the_go_shims_hash() -> None:
    # The runc shim's own example: sha256("/run/containerd/containerd.sock/default/redis").
    addr = address.socket_address("/run/containerd/containerd.sock", "", "default", "redis")
    assert addr == "unix:///run/containerd/s/f6b99128c07bdbd0902363ba979c22f8ef053e683a7ce24dd016a1ab17092c33"
    # Our daemon's state dir: beside its ttrpc socket.
    addr = address.socket_address("/var/p/d.sock", "/run/p/d.sock.ttrpc", "ns", "c")
    digest = hashlib.sha256(b"/var/p/d.sock/ns/c").hexdigest()
    assert addr == f"unix:///run/p/s/{digest}"
    # Too long for sun_path: the fallback directory.
    long_dir = "/tmp/" + "x" * 60
    addr = address.socket_address(f"{long_dir}/d.sock", "", "ns", "c")
    assert addr.startswith(f"unix://{address.FALLBACK_DIR}/") and len(address.socket_path(addr)) <= 106


def test_address_file_is_written_atomically(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "address")
    address.write_address(path, "unix:///a")
    address.write_address(path, "unix:///b")
    with open(path) as f:
        assert f.read() == "unix:///b"
    assert os.listdir(str(tmp_path)) == ["address"]


def test_runc_root_follows_the_daemon() -> None:
    assert runc_root("", "/run/containerd/containerd.sock", "k8s") == "/run/containerd/runc/k8s"
    assert runc_root("/custom", "/run/containerd/containerd.sock", "k8s") == "/custom/k8s"
    assert runc_root("", "", "default") == "/run/pyctrd/runc/default"


# -- wire ----------------------------------------------------------------------------------------------


def test_hand_coded_delete_response_decodes_with_generated_code() -> None:
    body = pw.uint(1, 1234) + pw.uint(2, 137) + pw.message(3, pw.timestamp(1700000000.25))
    decoded = task.DeleteResponse.parse(body)
    assert (decoded.pid, decoded.exit_status) == (1234, 137)
    assert decoded.exited_at is not None and decoded.exited_at.timestamp() == 1700000000.25
    assert dict(pw.fields(pw.string(1, "a") + pw.uint(2, 3))) == {1: b"a", 2: 3}
    assert pw.varint(-1) == b"\xff" * 9 + b"\x01"


def test_runc_options_json_is_gos_omitempty() -> None:
    opts = RuncOptions(binary_name="crun", systemd_cgroup=True)
    assert opts.to_json() == '{"binary_name": "crun", "systemd_cgroup": true}'
    assert RuncOptions.from_json(opts.to_json()) == opts
    assert RuncOptions.from_json('{"root": "/r", "unknown": 1}').root == "/r"


# -- state table -----------------------------------------------------------------------------------


def test_state_table() -> None:
    assert transition(INIT, State.CREATED, Op.START) is State.RUNNING
    assert transition(INIT, State.RUNNING, Op.PAUSE) is State.PAUSED
    assert transition(INIT, State.PAUSED, Op.EXIT) is State.STOPPED
    assert transition(INIT, State.STOPPED, Op.DELETE) is State.DELETED
    with pytest.raises(Unknown, match="cannot delete a running process"):
        transition(INIT, State.RUNNING, Op.DELETE)
    with pytest.raises(Unknown, match="cannot exec in a paused state"):
        transition(INIT, State.PAUSED, Op.EXEC)
    with pytest.raises(NotFound):
        transition(INIT, State.DELETED, Op.KILL)
    with pytest.raises(Unknown):
        transition(EXEC, State.RUNNING, Op.PAUSE)  # execs are paused with their container only
    # An exit is never refused, from any state of either table.
    for table in (INIT, EXEC):
        for state in table:
            transition(table, state, Op.EXIT)


# -- cgroups -------------------------------------------------------------------------------------------


def _write_tree(root: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _message(body: bytes) -> dict[int, int | bytes]:
    return dict(pw.fields(body))


def test_v1_metrics_from_captured_files(tmp_path: object) -> None:
    base = str(tmp_path)
    dirs = {c: os.path.join(base, c, "ctr") for c in ("memory", "cpu", "cpuacct", "pids")}
    _write_tree(
        base,
        {
            "pids/ctr/pids.current": "3\n",
            "pids/ctr/pids.max": "max\n",
            "cpuacct/ctr/cpuacct.usage": "12657924\n",
            "cpuacct/ctr/cpuacct.usage_percpu": "8674374 3983550 \n",
            "cpuacct/ctr/cpuacct.stat": "user 1\nsystem 2\n",
            "cpu/ctr/cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
            "memory/ctr/memory.stat": "cache 4096\nrss 409600\ntotal_rss 409600\n",
            "memory/ctr/memory.usage_in_bytes": "413696\n",
            "memory/ctr/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/ctr/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    metrics = _message(cgroups.v1_metrics(dirs))
    pids = _message(metrics[2])  # type: ignore[arg-type]
    assert pids == {1: 3}  # v1: an unlimited pids.max is limit 0 (not sent), as containerd has it
    usage = _message(_message(metrics[3])[1])  # type: ignore[arg-type]
    assert usage[1] == 12657924 and usage[2] == 20_000_000 and usage[3] == 10_000_000
    assert usage[4] == pw.varint(8674374) + pw.varint(3983550)  # packed repeated per_cpu
    memory = _message(metrics[4])  # type: ignore[arg-type]
    assert memory[1] == 4096 and memory[2] == 409600 and memory[19] == 409600
    assert _message(memory[33])[2] == 413696  # type: ignore[arg-type]
    assert _message(metrics[9])[3] == 2  # type: ignore[arg-type]


def test_v1_blkio_always_present(tmp_path: object) -> None:
    """The BlkIOStat goes out even with no entries (dockerd shows ``null`` lists without it); the
    throttle counters stand in when the CFQ/BFQ-era files are missing or empty."""
    base = str(tmp_path)
    blkio = os.path.join(base, "blkio", "ctr")
    partitions = os.path.join(base, "partitions")
    _write_tree(
        base,
        {
            "partitions": "major minor  #blocks  name\n\n 254        0   1048576 vda\n   7        0      1024 loop0\n",
            "blkio/ctr/blkio.throttle.io_service_bytes": "Total 0\n",
            "blkio/ctr/blkio.throttle.io_serviced": "Total 0\n",
        },
    )
    metrics = _message(cgroups.v1_metrics({"blkio": blkio}))
    assert metrics[5] == b""  # present, empty

    _write_tree(
        base,
        {
            "blkio/ctr/blkio.throttle.io_service_bytes": "254:0 Read 4096\n254:0 Write 8192\n7:0 Sync 1\n"
            "Total 12289\n",
            "blkio/ctr/blkio.throttle.io_serviced": "254:0 Write 2\nTotal 2\n",
        },
    )
    entries = [(n, _message(v)) for n, v in pw.fields(cgroups.v1_blkio(blkio, partitions))]  # type: ignore[arg-type]
    assert entries == [
        (1, {1: b"Read", 2: b"/dev/vda", 3: 254, 5: 4096}),
        (1, {1: b"Write", 2: b"/dev/vda", 3: 254, 5: 8192}),
        (1, {1: b"Sync", 2: b"/dev/loop0", 3: 7, 5: 1}),
        (2, {1: b"Write", 2: b"/dev/vda", 3: 254, 5: 2}),
    ]

    # With the CFQ files there (and holding entries), the throttle ones are not read.
    _write_tree(
        base,
        {
            "blkio/ctr/blkio.io_serviced_recursive": "254:0 Read 3\nTotal 3\n",
            "blkio/ctr/blkio.sectors_recursive": "254:0 24\n",
        },
    )
    entries = [(n, _message(v)) for n, v in pw.fields(cgroups.v1_blkio(blkio, partitions))]  # type: ignore[arg-type]
    assert entries == [
        (2, {1: b"Read", 2: b"/dev/vda", 3: 254, 5: 3}),
        (8, {2: b"/dev/vda", 3: 254, 5: 24}),
    ]


def test_v2_metrics_from_captured_files(tmp_path: object) -> None:
    path = str(tmp_path)
    _write_tree(
        path,
        {
            "pids.current": "2\n",
            "pids.max": "100\n",
            "cpu.stat": "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 0\n",
            "memory.stat": "anon 8192\nfile 4096\npgfault 10\n",
            "memory.current": "12288\n",
            "memory.max": "max\n",
            "memory.events": "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n",
        },
    )
    metrics = _message(cgroups.v2_metrics(path))
    assert _message(metrics[1]) == {1: 2, 2: 100}  # type: ignore[arg-type]
    assert _message(metrics[2]) == {1: 5000, 2: 3000, 3: 2000}  # type: ignore[arg-type]
    memory = _message(metrics[4])  # type: ignore[arg-type]
    assert (memory[1], memory[2], memory[18], memory[32], memory[33]) == (
        8192,
        4096,
        10,
        12288,
        (1 << 64) - 1,
    )
    assert _message(metrics[8]) == {3: 1, 4: 1, 5: 1}  # type: ignore[arg-type]
    assert metrics[6] == b""  # no io.stat: the IOStat still goes out, empty

    _write_tree(
        path,
        {
            "io.stat": "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
            "7:0 rbytes=512 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n\nnonsense\n",
        },
    )
    io = [(n, _message(v)) for n, v in pw.fields(_message(cgroups.v2_metrics(path))[6])]  # type: ignore[arg-type]
    assert io == [
        (1, {1: 254, 3: 4096, 4: 8192, 5: 1, 6: 2}),
        (1, {1: 7, 3: 512, 5: 1}),
    ]


def test_cgroup_paths_and_mountpoints(tmp_path: object) -> None:
    mountinfo = os.path.join(str(tmp_path), "mountinfo")
    with open(mountinfo, "w") as f:
        f.write(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
            "35 31 0:32 /outer /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        )
    points = cgroups.v1_mountpoints(mountinfo)
    assert points["cpu"] == points["cpuacct"] == ("/sys/fs/cgroup/cpu,cpuacct", "/")
    assert points["memory"] == ("/sys/fs/cgroup/memory", "/outer")
    assert "unified" not in points
    own = cgroups.proc_cgroups(os.getpid())
    assert own  # every process has at least one hierarchy


def test_kill_all_on_exit_without_own_pid_namespace(tmp_path: object) -> None:
    bundle = str(tmp_path)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        f.write('{"linux": {"namespaces": [{"type": "mount"}, {"type": "pid", "path": "/proc/1/ns/pid"}]}}')
    assert kill_all_on_exit(bundle)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        f.write('{"linux": {"namespaces": [{"type": "pid"}]}}')
    assert not kill_all_on_exit(bundle)


# -- mounts ----------------------------------------------------------------------------------------


def test_mount_options_split_like_containerd() -> None:
    flags, propagation, data = mount.parse_options(["rbind", "ro", "nosuid", "rprivate", "lowerdir=/a", "rw"])
    assert flags == mount.MS_BIND | mount.MS_REC | mount.MS_NOSUID  # "rw" cleared the earlier "ro"
    assert propagation == mount.MS_PRIVATE | mount.MS_REC
    assert data == ["lowerdir=/a"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_readonly_bind_mount_and_unmount_all(tmp_path: object) -> None:
    src = os.path.join(str(tmp_path), "src")
    dst = os.path.join(str(tmp_path), "dst")
    os.makedirs(src)
    os.makedirs(dst)
    try:
        stacked = [
            mount.Mount("bind", src, options=("rbind", "ro")),
            mount.Mount("bind", src, options=("bind",)),
        ]
        mount.mount_all(stacked, dst)
        assert is_mounted(dst)
        mount.unmount_all(dst)  # both stacked mounts
        assert not is_mounted(dst)
        mount.mount_all([mount.Mount("bind", src, options=("rbind", "ro"))], dst)
        with pytest.raises(OSError):
            open(os.path.join(dst, "f"), "w").close()  # the read-only remount took effect
    finally:
        mount.unmount_all(dst)
        mount.unmount_all(dst)  # idempotent


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_long_overlay_lowerdirs_are_compacted(tmp_path: object) -> None:
    base = os.path.join(str(tmp_path), "layers-with-a-fairly-long-directory-name-to-exceed-a-page")
    lowers = []
    for i in range(60):
        lower = os.path.join(base, f"{i:04d}", "fs")
        os.makedirs(lower)
        with open(os.path.join(lower, f"f{i}"), "w") as f:
            f.write(str(i))
        lowers.append(lower)
    target = os.path.join(str(tmp_path), "merged")
    os.makedirs(target)
    option = "lowerdir=" + ":".join(lowers)
    assert len(option) > 4096
    try:
        mount.mount_all([mount.Mount("overlay", "overlay", options=(option,))], target)
        assert sorted(os.listdir(target)) == sorted(f"f{i}" for i in range(60))
    finally:
        mount.unmount_all(target)


# -- reaper and actions in their own processes -------------------------------------------------------

REAPER_SCRIPT = textwrap.dedent(
    """
    import asyncio, os
    from pyctr.shim.server import set_subreaper
    from pyctr.shim.reaper import Reaper

    async def main():
        set_subreaper()
        reaper = Reaper(asyncio.get_running_loop())
        reaper.start()
        _, done = reaper.spawn(["sh", "-c", "exit 4"])
        assert (await done).status == 4
        _, done = reaper.spawn(["sh", "-c", "kill -9 $$"])
        assert (await done).status == 137
        # An orphan (re-parented to us) is nobody's command: it is reaped all the same, no zombie.
        r, w = os.pipe()
        _, done = reaper.spawn(["sh", "-c", "sleep 0.2 & echo $!"], stdio=(0, w, 2))
        os.close(w)
        await done
        orphan = int(os.read(r, 100))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not os.path.exists(f"/proc/{orphan}"):
                break
        assert not os.path.exists(f"/proc/{orphan}"), orphan
        # The thread found no children left meanwhile (ECHILD): a new command still reports its exit.
        _, done = reaper.spawn(["true"])
        assert (await done).status == 0
        print("ok")

    asyncio.run(main())
    """
)


def test_reaper_reports_signals_and_reaps_orphans() -> None:
    result = subprocess.run([sys.executable, "-c", REAPER_SCRIPT], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def _shim(*args: str, cwd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pyctr.shim", *args],
        cwd=cwd,
        capture_output=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root")
def test_delete_action_is_idempotent_and_fast(tmp_path: object) -> None:
    bundle = os.path.join(str(tmp_path), "c1")
    os.makedirs(os.path.join(bundle, "rootfs"))
    with open(os.path.join(bundle, "init.pid"), "w") as f:
        f.write("4242")
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    for _ in range(2):
        started = time.monotonic()
        result = _shim(
            "-namespace", "ns", "-id", "c1", "-address", f"{tmp_path}/d.sock", "delete", cwd=bundle, env=env
        )
        assert time.monotonic() - started < 3
        assert result.returncode == 0, result.stderr
        response = task.DeleteResponse.parse(result.stdout)
        assert (response.pid, response.exit_status) == (4242, 137)
        assert response.exited_at is not None and abs(response.exited_at.timestamp() - time.time()) < 10


def test_version_usage_and_errors(tmp_path: object) -> None:
    result = _shim("-v", cwd=str(tmp_path))
    assert result.returncode == 0 and result.stdout.startswith(b"containerd-shim-pyrunc-v2:\n  Version:")
    assert _shim("-bogus", cwd=str(tmp_path)).returncode == 2
    assert _shim("-id", "x", "start", cwd=str(tmp_path)).stderr == b"shim namespace cannot be empty\n"


def test_serve_on_a_socket_flag_answers_connect(tmp_path: object) -> None:
    import asyncio

    from pyctr.api import ttrpc

    bundle = str(tmp_path)
    path = os.path.join(bundle, "s.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyctr.shim", "-namespace", "ns", "-id", "x", "-socket", path],
        cwd=bundle,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    async def connect() -> task.ConnectResponse:
        for _ in range(200):
            if os.path.exists(path):
                break
            await asyncio.sleep(0.02)
        async with await ttrpc.Client.connect(path) as client:
            reply = await client.call(
                "containerd.task.v2.Task", "Connect", bytes(task.ConnectRequest(id="x"))
            )
        return task.ConnectResponse.parse(reply)

    try:
        response = asyncio.run(connect())
        assert (response.shim_pid, response.task_pid) == (proc.pid, 0)
        proc.terminate()  # SIGTERM: the shim exits cleanly and removes its socket
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
    finally:
        proc.kill()
        proc.wait()


class _Events:
    """A daemon's Events/Forward endpoint, recording (topic, type URL, namespace) of what it takes;
    the first ``refuse`` calls are answered UNAVAILABLE."""

    def __init__(self, refuse: int = 0) -> None:
        self.received: list[tuple[str, str, str | None]] = []
        self.refuse = refuse
        self.calls = 0

    async def forward(self, payload: bytes, ctx: ttrpc.Context) -> bytes:
        from pyctr.api._pb.containerd.services.events.ttrpc.v1 import ForwardRequest
        from pyctr.api.errdefs import Unavailable

        self.calls += 1
        if self.calls <= self.refuse:
            raise Unavailable("daemon busy")
        envelope = ForwardRequest.parse(payload).envelope
        assert envelope is not None and envelope.event is not None
        self.received.append((envelope.topic, envelope.event.type_url, ctx.namespace))
        return b""

    async def serve(self, path: str) -> ttrpc.Server:
        server = ttrpc.Server()
        server.register("containerd.services.events.ttrpc.v1.Events", {"Forward": self.forward})
        await server.serve_unix(path)
        return server


@contextlib.contextmanager
def _keeper_publisher(path: str, budget: float) -> Iterator[tuple[Any, Callable[[], None]]]:
    """The keeper's Publisher on a keeper that is not running, and one pass of the keeper's loop
    (its fd handlers and due timers), for a test to drive between awaits of its own loop."""
    import socket

    from pyctr.shim import keeper

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    k = keeper.Keeper("ns", "", listener, "/")
    publisher = keeper.Publisher(k, path, "ns", budget=budget)

    try:
        yield publisher, lambda: k.turn(0)
    finally:
        publisher.drop_conn()
        k.ep.close()
        os.close(k.wake_r)
        os.close(k.wake_w)
        listener.close()


async def _drive(turn: Callable[[], None], seconds: float, until: Callable[[], bool] = lambda: False) -> None:
    import asyncio

    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        turn()
        await asyncio.sleep(0.005)


def _publish(publisher: Any, topic: str, event: Any) -> None:
    from pyctr.shim.events import type_url

    publisher.publish(topic, type_url(event), bytes(event))


def test_keeper_publisher_retries_in_order_until_the_daemon_takes_them(tmp_path: object) -> None:
    import asyncio

    from pyctr.api._pb.containerd import events as ev

    path = os.path.join(str(tmp_path), "events.sock")
    daemon = _Events(refuse=1)

    async def main() -> None:
        with _keeper_publisher(path, budget=10) as (publisher, turn):
            _publish(publisher, "/tasks/start", ev.TaskStart(container_id="c", pid=1))
            _publish(publisher, "/tasks/oom", ev.TaskOom(container_id="c"))
            await _drive(turn, 0.5)  # nobody listens yet: the sender retries
            assert not publisher.idle
            server = await daemon.serve(path)
            await _drive(turn, 10, lambda: publisher.idle)
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert daemon.calls == 3  # the first answer was UNAVAILABLE: /tasks/start went again
    assert daemon.received == [
        ("/tasks/start", "containerd.events.TaskStart", "ns"),
        ("/tasks/oom", "containerd.events.TaskOOM", "ns"),
    ]


def test_keeper_publisher_drops_an_event_after_its_budget(tmp_path: object) -> None:
    import asyncio

    from pyctr.api._pb.containerd import events as ev

    path = os.path.join(str(tmp_path), "events.sock")
    daemon = _Events()

    async def main() -> None:
        with _keeper_publisher(path, budget=0.5) as (publisher, turn):
            _publish(publisher, "/tasks/exit", ev.TaskExit(container_id="c", id="c", pid=1))
            started = time.monotonic()
            await _drive(turn, 5, lambda: publisher.idle)
            assert publisher.idle and time.monotonic() - started < 2  # given up, not delivered
            server = await daemon.serve(path)
            _publish(publisher, "/tasks/oom", ev.TaskOom(container_id="c"))  # the next one still goes
            await _drive(turn, 5, lambda: publisher.idle)
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert daemon.received == [("/tasks/oom", "containerd.events.TaskOOM", "ns")]


def test_launcher_notices_new_code_within_its_interval(tmp_path: str) -> None:
    from pyctr.shim import launcher

    module = os.path.join(tmp_path, "mod.py")
    with open(module, "w") as f:
        f.write("x = 1\n")
    before = os.stat(module)
    freshness = launcher._Freshness([str(tmp_path)], interval=0.05)
    with open(module, "w") as f:
        f.write("x = 22\n")
    assert not freshness.stale()  # checked moments ago: not walked again yet
    time.sleep(0.06)
    assert freshness.stale()
    with open(module, "w") as f:  # the code the launcher started with, as it was
        f.write("x = 1\n")
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(0.06)
    assert not freshness.stale()


def test_launcher_hands_a_shim_only_the_environment_that_differs() -> None:
    from pyctr.shim import launcher

    own = launcher._Environment({"PATH": "/bin", "HOME": "/root", "LANG": "C"})
    # The same variables in another order are the same block: nothing to do in the shim.
    assert own.changes(launcher.environment_block({"LANG": "C", "PATH": "/bin", "HOME": "/root"})) is None
    assert own.changes(launcher.environment_block({"PATH": "/opt:/bin", "HOME": "/root", "NEW": "a=b"})) == (
        {"PATH": "/opt:/bin", "NEW": "a=b"},
        ["LANG"],
    )
    assert own.changes(b"") == ({}, ["PATH", "HOME", "LANG"])
    odd = "caf\udce9"  # not UTF-8 on the wire (surrogateescape), as os.environ can hold it
    assert own.changes(launcher.environment_block({"PATH": "/bin", "HOME": odd, "LANG": "C"})) == (
        {"HOME": odd},
        [],
    )
    with pytest.raises(ValueError, match="bad environment entry"):
        own.changes(b"PATH=/bin\0NOEQUALS")


def test_launcher_request_is_json_then_the_environment() -> None:
    from pyctr.shim import launcher

    own = launcher._Environment({"A": "1"})
    head = json.dumps({"argv": ["-id", "x"], "cwd": "/b"}).encode()
    assert launcher._parse_request(head + b"\nA=1", own) == {"argv": ["-id", "x"], "cwd": "/b", "env": None}
    assert launcher._parse_request(head + b"\nA=2", own)["env"] == ({"A": "2"}, [])
    for bad in (head, b'{"argv": "x", "cwd": "/b"}\nA=1', b'{"argv": []}\nA=1', b"[]\nA=1", b"{\nA=1"):
        with pytest.raises(ValueError):
            launcher._parse_request(bad, own)


def test_launcher_fills_the_holes_in_its_heap_before_forking() -> None:
    """A shim's new objects must come from fresh pools, not from holes scattered over the launcher's
    heap (each page written is a private copy): once the launcher has filled them, a batch of new
    objects of every size class takes about a page per class."""
    script = textwrap.dedent(
        """
        import gc, json
        import pyctr.shim.keeper, pyctr.shim.worker
        from pyctr.shim import launcher

        def pages():
            objs = [bytes(size - 33) for size in range(48, 513, 16) for _ in range(8)]
            return len({id(o) // 4096 for o in objs}), objs

        gc.collect()
        before, kept = pages()
        used = launcher._fill_free_blocks()
        after, kept2 = pages()
        print(json.dumps([before, used, after]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    before, used, after = json.loads(out)
    classes = len(range(48, 513, 16))
    assert used > 0
    assert after <= classes + 6, (before, after)
    assert before >= 1.5 * after, (before, after)  # without the fill they scatter


def test_hugepage_sizes_are_named_as_containerd_names_them(tmp_path: object) -> None:
    root = str(tmp_path)
    for name in ("hugepages-2048kB", "hugepages-1048576kB", "hugepages-64kB", "not-a-size"):
        os.makedirs(os.path.join(root, name))
    assert cgroups.hugepage_sizes(root) == ["1GB", "2MB", "64KB"]
    assert cgroups.hugepage_sizes(os.path.join(root, "missing")) == []


def test_v1_hugetlb_and_rdma(tmp_path: object) -> None:
    base = str(tmp_path)
    dirs = {c: os.path.join(base, c, "ctr") for c in ("hugetlb", "rdma")}
    _write_tree(
        base,
        {
            "hugetlb/ctr/hugetlb.2MB.usage_in_bytes": "4194304\n",
            "hugetlb/ctr/hugetlb.2MB.max_usage_in_bytes": "6291456\n",
            "hugetlb/ctr/hugetlb.2MB.failcnt": "1\n",
            "rdma/ctr/rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
            "rdma/ctr/rdma.max": "mlx4_0 hca_handle=max hca_object=max\n",
        },
    )
    fields = list(pw.fields(cgroups.v1_metrics(dirs, hugepages=["1GB", "2MB"])))
    hugetlb = [_message(v) for n, v in fields if n == 1]  # type: ignore[arg-type]
    assert hugetlb == [{4: b"1GB"}, {1: 4194304, 2: 6291456, 3: 1, 4: b"2MB"}]
    rdma = [(n, _message(v)) for n, v in pw.fields(dict(fields)[6])]  # type: ignore[arg-type]
    assert rdma == [
        (1, {1: b"mlx4_0", 2: 2, 3: 2000}),
        (2, {1: b"mlx4_0", 2: (1 << 32) - 1, 3: (1 << 32) - 1}),
    ]


def test_v2_hugetlb_and_rdma(tmp_path: object) -> None:
    path = str(tmp_path)
    metrics = dict(pw.fields(cgroups.v2_metrics(path)))
    assert metrics[5] == b"" and 7 not in metrics  # no rdma files: empty RdmaStat; no hugetlb
    _write_tree(
        path,
        {
            "hugetlb.2MB.current": "2097152\n",
            "hugetlb.2MB.max": "max\n",
            "hugetlb.2MB.rsvd.current": "0\n",  # reservations: not in containerd's HugeTlbStat
            "hugetlb.2MB.events": "max 0\n",
            "hugetlb.1GB.current": "0\n",
            "hugetlb.1GB.max": "0\n",
            "rdma.current": "mlx4_0 hca_handle=1 hca_object=10\n",
        },
    )
    fields = list(pw.fields(cgroups.v2_metrics(path)))
    assert [_message(v) for n, v in fields if n == 7] == [  # type: ignore[arg-type]
        {3: b"1GB"},
        {1: 2097152, 2: (1 << 64) - 1, 3: b"2MB"},
    ]
    assert [(n, _message(v)) for n, v in pw.fields(dict(fields)[5])] == [(1, {1: b"mlx4_0", 2: 1, 3: 10})]  # type: ignore[arg-type]


def test_pyctr_decodes_every_metric_the_shim_sends(tmp_path: object) -> None:
    """The shim's encoder and pyctr's field tables (`pyctr tasks metrics`) name the same fields."""
    from pyctr.ctr.commands.tasks import decode_message

    base = str(tmp_path)
    v1_dirs = {c: os.path.join(base, "v1", c) for c in ("hugetlb", "rdma", "pids", "memory")}
    _write_tree(
        base,
        {
            "v1/hugetlb/hugetlb.2MB.usage_in_bytes": "4194304\n",
            "v1/rdma/rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
            "v1/rdma/rdma.max": "mlx4_0 hca_handle=max hca_object=max\n",
            "v1/pids/pids.current": "3\n",
            "v1/memory/memory.usage_in_bytes": "413696\n",
            "v1/memory/memory.oom_control": "oom_kill 2\n",
            "v2/pids.current": "2\n",
            "v2/rdma.current": "mlx4_0 hca_handle=1 hca_object=10\n",
            "v2/hugetlb.2MB.current": "2097152\n",
            "v2/io.stat": "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2\n",
        },
    )
    v1 = decode_message(cgroups.v1_metrics(v1_dirs, hugepages=["2MB"]), "v1.Metrics")
    assert not [k for k in v1 if k.startswith("field_")], v1
    assert v1["hugetlb"] == [{"usage": 4194304, "max": 0, "failcnt": 0, "pagesize": "2MB"}]
    assert v1["rdma"]["current"] == [{"device": "mlx4_0", "hca_handles": 2, "hca_objects": 2000}]
    assert v1["rdma"]["limit"][0]["hca_handles"] == (1 << 32) - 1
    assert v1["pids"] == {"current": 3, "limit": 0}
    assert v1["memory"]["usage"]["usage"] == 413696 and v1["memory_oom_control"]["oom_kill"] == 2
    v2 = decode_message(cgroups.v2_metrics(os.path.join(base, "v2")), "v2.Metrics")
    assert not [k for k in v2 if k.startswith("field_")], v2
    assert v2["rdma"] == {"current": [{"device": "mlx4_0", "hca_handles": 1, "hca_objects": 10}]}
    assert v2["hugetlb"] == [{"current": 2097152, "max": 0, "pagesize": "2MB"}]
    assert v2["io"]["usage"][0]["wbytes"] == 8192 and v2["pids"]["current"] == 2
