"""Figures on the API surface pyctrd serves today (plus Images.List, gated): start-up, memory, RPCs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Awaitable, Callable

from bench import clients, proc
from bench.figures import Context, Figure, Metric, register, rpc
from bench.harness import VENV_BIN, Daemon, Side
from bench.stats import median
from pyctr.api._pb.containerd.services.images.v1 import (
    CreateImageRequest,
    DeleteImageRequest,
    Image,
    ImagesStub,
    ListImagesRequest,
)
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, DeleteRequest, LeasesStub, ListRequest
from pyctr.api._pb.containerd.services.namespaces.v1 import DeleteNamespaceRequest, NamespacesStub
from pyctr.api._pb.containerd.services.version.v1 import VersionStub
from pyctr.api._pb.containerd.types import Descriptor

MiB = 1024 * 1024


def _ctr_version_until_ok(d: Daemon, timeout: float = 30.0) -> None:
    """Poll the socket every 2 ms, then run ``ctr version`` until it exits 0.

    ``ctr`` itself would block for up to 10 s on a socket that does not exist yet, so the cheap
    connect() probe comes first; the figure still ends only on a successful ``ctr version``.
    """
    deadline = time.monotonic() + timeout
    d.wait_ready(timeout)
    while time.monotonic() < deadline:
        res = subprocess.run(d.ctr("version"), capture_output=True, timeout=timeout)
        if res.returncode == 0:
            return
        time.sleep(0.002)
    raise TimeoutError(f"{d.kind}: no successful `ctr version` within {timeout}s:\n{d.log_tail()}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(proc.parent_pid(int(entry)), []).append(int(entry))
            except (OSError, ProcessLookupError):
                continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _median_wall_ms(cmd: list[str], n: int) -> float:
    return median([proc.timed(cmd) for _ in range(n)]) * 1000


@register
class StartUp(Figure):
    id = "start"
    title = "daemon start → first successful `ctr version` (fresh root each time)"
    metrics = (Metric("start_ms", "start → first `ctr version`", "ms"),)
    quick = True

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        if side.kind == "pyctrd" and rep == "0":
            # The floor under any asyncio daemon on this machine, for reading start and restart
            # figures: the interpreter alone, then with the two imports serving needs first.
            python = os.path.join(VENV_BIN, "python3")
            bare = _median_wall_ms([python, "-c", "pass"], 10)
            loop = _median_wall_ms([python, "-c", "import asyncio, uvloop"], 10)
            ctx.note(
                f"pyctrd: its interpreter starts in {bare:.0f} ms and imports asyncio and uvloop in "
                f"{loop:.0f} ms, before any of pyctrd's own code"
            )
        with side.fresh(f"start-{rep}") as d:
            t0 = time.perf_counter()
            d.launch()
            _ctr_version_until_ok(d)
            return {"start_ms": (time.perf_counter() - t0) * 1000}


@register
class IdleMemory(Figure):
    id = "idle-memory"
    title = "idle daemon memory, 2 s after the first `ctr version`"
    metrics = (
        Metric("rss_mib", "idle RSS (VmRSS)", "MiB"),
        Metric("pss_mib", "idle PSS (smaps_rollup)", "MiB"),
    )
    quick = True
    SETTLE = 2.0

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        with side.fresh(f"mem-{rep}") as d:
            d.launch()
            _ctr_version_until_ok(d)
            time.sleep(self.SETTLE)
            mem = proc.memory(d.pid)
            kids = _descendants(d.pid)
            if kids and rep == "0":
                ctx.note(f"{d.kind} had {len(kids)} child process(es) at idle, not counted in its figure")
            return {"rss_mib": mem.rss / MiB, "pss_mib": mem.pss / MiB}


@register
class CtrVersion(Figure):
    id = "ctr-version"
    title = "`ctr version` wall time (median of 10 per repetition)"
    metrics = (Metric("ctr_version_ms", "`ctr version`", "ms"),)
    quick = True

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        return {"ctr_version_ms": _median_wall_ms(side.daemon.ctr("version"), 10)}


async def _unary_latencies(address: str, n: int) -> list[float]:
    ch = clients.channel(address)
    stub = VersionStub(ch, metadata=clients.METADATA)
    try:
        for _ in range(20):  # connection set-up and first-call costs stay out of the figure
            await stub.version()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.version()
            out.append(time.perf_counter() - t0)
        return out
    finally:
        ch.close()


@register
class UnaryLatency(Figure):
    id = "unary-latency"
    title = "raw gRPC Version.Version, sequential: median of 500 calls"
    metrics = (Metric("unary_us", "gRPC unary latency", "µs"),)
    quick = True

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        lat = clients.run(_unary_latencies(side.daemon.address, 500))
        return {"unary_us": median(lat) * 1e6}


async def _throughput(address: str, callers: int, seconds: float) -> tuple[float, float]:
    """Calls/s of ``callers`` tasks sharing one channel (one HTTP/2 connection, as Go clients do),
    and the share of one CPU this client process used meanwhile."""
    ch = clients.channel(address)
    stub = VersionStub(ch, metadata=clients.METADATA)
    count = 0

    async def caller(stop: float) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await stub.version()
            count += 1

    try:
        await asyncio.gather(*(stub.version() for _ in range(callers)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(t0 + seconds) for _ in range(callers)))
        elapsed = time.perf_counter() - t0
        return count / elapsed, (time.process_time() - cpu0) / elapsed
    finally:
        ch.close()


@register
class UnaryThroughput(Figure):
    id = "unary-throughput"
    title = "raw gRPC Version.Version, 20 concurrent callers on one connection for 3 s"
    metrics = (Metric("calls_per_s", "gRPC unary throughput, 20 callers", "calls/s", "higher"),)

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        rate, client_cpu = clients.run(_throughput(side.daemon.address, 20, 3.0))
        if rep == "0":
            # One Python process drives the calls; near 100 % of a CPU it, not the daemon, sets the rate.
            capped = " (near saturation: the client caps the rate)" if client_cpu > 0.85 else ""
            ctx.note(f"the bench client used {client_cpu:.0%} of a CPU against {side.kind}{capped}")
        return {"calls_per_s": rate}


@register
class CtrNamespacesLs(Figure):
    id = "ctr-namespaces-ls"
    title = "`ctr namespaces ls` wall time (median of 10 per repetition)"
    metrics = (Metric("ns_ls_ms", "`ctr namespaces ls`", "ms"),)

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        return {"ns_ls_ms": _median_wall_ms(side.daemon.ctr("namespaces", "ls"), 10)}


@register
class CtrLeases(Figure):
    id = "ctr-leases"
    title = "`ctr leases create` + `ctr leases rm` wall time (median of 10 pairs per repetition)"
    metrics = (Metric("lease_ms", "`ctr leases create` + `rm`", "ms"),)

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        pairs = []
        for i in range(10):
            lid = f"bench-ctr-{rep}-{i}"
            pairs.append(
                proc.timed(side.daemon.ctr("leases", "create", "--id", lid))
                + proc.timed(side.daemon.ctr("leases", "rm", lid))
            )
        return {"lease_ms": median(pairs) * 1000}


async def _timed_calls(n: int, call: Callable[[], Awaitable[object]]) -> float:
    """Median seconds of ``n`` sequential awaits of ``call()`` after two untimed ones."""
    for _ in range(2):
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return median(out)


@register
class LeasesList200(Figure):
    id = "leases-list-200"
    title = "raw gRPC Leases.List with 200 leases (median of 20 calls per repetition)"
    metrics = (Metric("leases_list_ms", "Leases.List, 200 leases", "ms"),)
    N = 200

    def _ids(self) -> list[str]:
        return [f"bench-list-{i:03d}" for i in range(self.N)]

    def setup(self, ctx: Context, side: Side) -> None:
        async def create() -> None:
            ch = clients.channel(side.daemon.address)
            stub = LeasesStub(ch, metadata=clients.METADATA)
            try:
                for lid in self._ids():
                    await stub.create(CreateRequest(id=lid, labels={"bench": "leases-list"}))
            finally:
                ch.close()

        clients.run(create())

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        async def go() -> float:
            ch = clients.channel(side.daemon.address)
            stub = LeasesStub(ch, metadata=clients.METADATA)
            try:
                got = len((await stub.list(ListRequest())).leases)
                if got < self.N:
                    raise RuntimeError(f"{side.kind} listed {got} leases, expected at least {self.N}")
                return await _timed_calls(20, lambda: stub.list(ListRequest()))
            finally:
                ch.close()

        return {"leases_list_ms": clients.run(go()) * 1000}

    def teardown(self, ctx: Context, side: Side) -> None:
        async def delete() -> None:
            ch = clients.channel(side.daemon.address)
            stub = LeasesStub(ch, metadata=clients.METADATA)
            try:
                for lid in self._ids():
                    await stub.delete(DeleteRequest(id=lid))
            finally:
                ch.close()

        clients.run(delete())


def _lister(stub: ImagesStub) -> Callable[[], Awaitable[object]]:
    return lambda: stub.list(ListImagesRequest())


def _fake_manifest(i: int) -> Descriptor:
    # Images.Create records metadata only; the target need not exist in the content store.
    digest = "sha256:" + hashlib.sha256(f"bench-manifest-{i}".encode()).hexdigest()
    return Descriptor(media_type="application/vnd.oci.image.manifest.v1+json", digest=digest, size=1234)


@register
class ImagesList(Figure):
    id = "images-list"
    title = "raw gRPC Images.List with 1 and with 200 images (median of 20 calls per repetition)"
    metrics = (
        Metric("images_list_1_ms", "Images.List, 1 image", "ms"),
        Metric("images_list_200_ms", "Images.List, 200 images", "ms"),
    )
    needs = (rpc("images", "List"), rpc("images", "Create"), rpc("images", "Delete"))
    # Two namespaces hold the two populations at once, so one repetition measures both.
    NAMESPACES = {"images_list_1_ms": ("bench-img1", 1), "images_list_200_ms": ("bench-img200", 200)}

    def _names(self, n: int) -> list[str]:
        return [f"registry.example/bench/img-{i:03d}:latest" for i in range(n)]

    def setup(self, ctx: Context, side: Side) -> None:
        async def create() -> None:
            ch = clients.channel(side.daemon.address)
            try:
                for ns, n in self.NAMESPACES.values():
                    stub = ImagesStub(ch, metadata=clients.metadata(ns))
                    for i, name in enumerate(self._names(n)):
                        img = Image(name=name, labels={"bench": "images-list"}, target=_fake_manifest(i))
                        await stub.create(CreateImageRequest(image=img))
            finally:
                ch.close()

        clients.run(create())

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        async def go() -> dict[str, float]:
            ch = clients.channel(side.daemon.address)
            out = {}
            try:
                for key, (ns, n) in self.NAMESPACES.items():
                    stub = ImagesStub(ch, metadata=clients.metadata(ns))
                    got = len((await stub.list(ListImagesRequest())).images)
                    if got != n:
                        raise RuntimeError(f"{side.kind} listed {got} images in {ns}, expected {n}")
                    out[key] = await _timed_calls(20, _lister(stub)) * 1000
                return out
            finally:
                ch.close()

        return clients.run(go())

    def teardown(self, ctx: Context, side: Side) -> None:
        async def delete() -> None:
            ch = clients.channel(side.daemon.address)
            try:
                for ns, n in self.NAMESPACES.values():
                    stub = ImagesStub(ch, metadata=clients.metadata(ns))
                    for name in self._names(n):
                        await stub.delete(DeleteImageRequest(name=name))
                    await NamespacesStub(ch, metadata=clients.METADATA).delete(
                        DeleteNamespaceRequest(name=ns)
                    )
            finally:
                ch.close()

        clients.run(delete())
