"""Figures on containers: `ctr run --rm`, and fifty detached containers from start to teardown."""

from __future__ import annotations

import time

from bench import proc
from bench.figures import RUN_RPCS, Context, Figure, Metric, register
from bench.harness import NAMESPACE, Daemon, Side
from bench.stats import median

MiB = 1024 * 1024


def _pull(ctx: Context, d: Daemon, name: str) -> str:
    ref = ctx.fixtures.image(name).ref
    proc.run(d.ctr("images", "pull", "--plain-http", ref), timeout=900)
    return ref


def _tasks(d: Daemon) -> dict[str, tuple[int, str]]:
    """``ctr tasks ls``: container ID → (PID, status)."""
    out = proc.run(d.ctr("tasks", "ls"), timeout=60).stdout.splitlines()[1:]
    found = {}
    for line in out:
        parts = line.split()
        if len(parts) >= 3:
            found[parts[0]] = (int(parts[1]), parts[2])
    return found


@register
class CtrRunRm(Figure):
    id = "ctr-run-rm"
    title = "`ctr run --rm busybox … echo hi` wall time (median of 3 per repetition)"
    metrics = (Metric("run_rm_ms", "`ctr run --rm … echo hi`", "ms"),)
    fixtures = ("busybox",)
    needs = RUN_RPCS
    ref = ""

    def setup(self, ctx: Context, side: Side) -> None:
        self.ref = _pull(ctx, side.daemon, "busybox")

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        times = []
        for i in range(3):
            cmd = side.daemon.ctr("run", "--rm", self.ref, f"bench-run-{rep}-{i}", "echo", "hi")
            t0 = time.perf_counter()
            res = proc.run(cmd, timeout=120)
            times.append(time.perf_counter() - t0)
            if res.stdout.strip() != "hi":
                raise RuntimeError(f"{side.kind}: `ctr run` printed {res.stdout!r}, expected 'hi'")
        return {"run_rm_ms": median(times) * 1000}

    def teardown(self, ctx: Context, side: Side) -> None:
        # After a failed restart the containers are still there; only the daemon may remove them.
        if side.daemon.revive():
            side.daemon.remove_all_containers()


@register
class FiftyContainers(Figure):
    """One repetition walks fifty containers through their life, measuring at each stage.

    The daemon is SIGKILLed and restarted with the containers running: shims and containers must
    survive, and the figure is the time until the restarted daemon reports all fifty RUNNING.
    """

    id = "fifty-containers"
    title = "50 detached busybox `sleep` containers: start, memory, daemon crash + restart, teardown"
    metrics = (
        Metric("start50_s", "50 x `ctr run -d`, sequential", "s"),
        Metric("rss50_mib", "daemon RSS with 50 running", "MiB"),
        Metric("shim_uss_mib", "per-shim USS (median)", "MiB"),
        Metric("shim_pss_mib", "per-shim PSS (median)", "MiB"),
        Metric("restart50_s", "SIGKILL + restart → all 50 RUNNING", "s"),
        Metric("teardown50_s", "teardown of 50 (`tasks rm -f`, `containers rm`)", "s"),
    )
    fixtures = ("busybox",)
    needs = RUN_RPCS
    N = 50
    ref = ""

    def setup(self, ctx: Context, side: Side) -> None:
        self.ref = _pull(ctx, side.daemon, "busybox")

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        d = side.daemon
        ids = [f"bench-{rep}-{i:02d}" for i in range(self.N)]
        out: dict[str, float] = {}

        t0 = time.perf_counter()
        for cid in ids:
            proc.run(d.ctr("run", "-d", "--null-io", self.ref, cid, "sleep", "1000000"), timeout=120)
        out["start50_s"] = time.perf_counter() - t0

        time.sleep(1.0)  # let the daemon settle after the burst, as the idle figure does
        out["rss50_mib"] = proc.memory(d.pid).rss / MiB
        # A container's init is a child of its shim (the shim is the subreaper), so its parent is it.
        tasks = _tasks(d)
        shims = {proc.parent_pid(pid) for cid, (pid, _) in tasks.items() if cid in ids}
        mems = [proc.memory(pid) for pid in shims]
        out["shim_uss_mib"] = median([m.uss for m in mems]) / MiB
        out["shim_pss_mib"] = median([m.pss for m in mems]) / MiB
        if rep == "0":
            ctx.note(f"{side.kind}: {len(shims)} shim process(es) for {self.N} containers")
            # Helpers outside daemon and shims (pyctrd's shim launcher) are in no row; say so.
            users = proc.holders(d.base)
            containers = {pid for pid, _ in tasks.values()}
            for pid in sorted(set(users) - shims - containers - {d.pid}):
                m = proc.memory(pid)
                ctx.note(
                    f"{side.kind}: helper process `{users[pid][:70]}` RSS {m.rss / MiB:.1f} MiB, "
                    f"PSS {m.pss / MiB:.1f} MiB, in no row above"
                )

        d.kill()
        t0 = time.perf_counter()
        d.launch()
        d.wait_ready()

        def all_running() -> bool:
            try:
                now = _tasks(d)
            except proc.CommandError:
                return False
            return all(now.get(cid, (0, ""))[1] == "RUNNING" for cid in ids)

        proc.wait_until(all_running, 120.0, interval=0.01, what=f"{self.N} RUNNING tasks after restart")
        out["restart50_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for cid in ids:
            proc.run(d.ctr("tasks", "rm", "-f", cid), timeout=120)
            proc.run(d.ctr("containers", "rm", cid), timeout=120)
        out["teardown50_s"] = time.perf_counter() - t0
        return out

    def teardown(self, ctx: Context, side: Side) -> None:
        # After a failed restart the containers are still there; only the daemon may remove them.
        if side.daemon.revive():
            side.daemon.remove_all_containers()


def _criu_unusable() -> str:
    """Why checkpoints cannot be taken on this host ("" when criu passes ``criu check``)."""
    from pyctr.api import binaries

    criu = binaries.criu()
    if criu is None:
        return "criu is not installed"
    res = proc.run([criu, "check"], check=False, timeout=60)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        return f"`criu check` fails on this host: {lines[0] if lines else res.returncode}"
    return ""


async def _restore(address: str, cid: str, image: str) -> None:
    """Tasks.Create from the checkpoint image's criu tar, then Start (no stdio, as `ctr run -d --null-io`)."""
    from pyctr.api._pb.containerd.services.containers.v1 import GetContainerRequest
    from pyctr.api._pb.containerd.services.snapshots.v1 import MountsRequest
    from pyctr.api._pb.containerd.services.tasks import v1 as tpb
    from pyctr.ctr import checkpoint
    from pyctr.ctr.client import Client

    with Client(address, NAMESPACE, timeout=120) as c:
        container = (await c.containers.get(GetContainerRequest(id=cid))).container
        assert container is not None
        mounts = (
            await c.snapshots.mounts(
                MountsRequest(snapshotter=container.snapshotter, key=container.snapshot_key)
            )
        ).mounts
        desc = await checkpoint.find_checkpoint(c, image)
        await c.tasks.create(tpb.CreateTaskRequest(container_id=cid, rootfs=list(mounts), checkpoint=desc))
        await c.tasks.start(tpb.StartRequest(container_id=cid))


@register
class CheckpointRestore(Figure):
    """A busybox ``sleep`` checkpointed by the real ``ctr`` into a checkpoint image, then created
    again from that image and started. The restore goes through pyctr's client code in this
    process, the same on both daemons; it is timed from Tasks.Create to Start's reply."""

    id = "checkpoint-restore"
    title = "checkpoint (`ctr tasks checkpoint --exit`) and restore (Create from the image + Start)"
    metrics = (
        Metric("checkpoint_ms", "`ctr tasks checkpoint --exit`", "ms"),
        Metric("restore_ms", "Tasks.Create from the checkpoint + Start", "ms"),
    )
    fixtures = ("busybox",)
    needs = RUN_RPCS
    ref = ""

    def host_unsupported(self) -> str:
        return _criu_unusable()

    def setup(self, ctx: Context, side: Side) -> None:
        self.ref = _pull(ctx, side.daemon, "busybox")

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        from bench import clients

        d = side.daemon
        cid = f"bench-ckpt-{rep}"
        proc.run(d.ctr("run", "-d", "--null-io", self.ref, cid, "sleep", "1000000"), timeout=120)
        try:
            t0 = time.perf_counter()
            image = proc.run(d.ctr("tasks", "checkpoint", "--exit", cid), timeout=120).stdout.strip()
            checkpoint_ms = (time.perf_counter() - t0) * 1000
            deadline = time.monotonic() + 30
            while _tasks(d)[cid][1] != "STOPPED":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{side.kind}: the task did not stop after `checkpoint --exit`")
                time.sleep(0.02)
            proc.run(d.ctr("tasks", "rm", cid), timeout=120)
            t0 = time.perf_counter()
            clients.run(_restore(d.address, cid, image))
            restore_ms = (time.perf_counter() - t0) * 1000
            if _tasks(d).get(cid, (0, ""))[1] != "RUNNING":
                raise RuntimeError(f"{side.kind}: the restored task is not RUNNING: {_tasks(d).get(cid)}")
        finally:
            proc.run(d.ctr("tasks", "rm", "-f", cid), check=False, timeout=120)
            proc.run(d.ctr("containers", "rm", cid), check=False, timeout=120)
            for name in proc.run(d.ctr("images", "ls", "-q"), timeout=60).stdout.split():
                if name.startswith(f"containerd.io/checkpoint/{cid}:"):
                    proc.run(d.ctr("images", "rm", "--sync", name), check=False, timeout=120)
        return {"checkpoint_ms": checkpoint_ms, "restore_ms": restore_ms}

    def teardown(self, ctx: Context, side: Side) -> None:
        if side.daemon.revive():
            side.daemon.remove_all_containers()
