"""Figures on content and images: ingest, get, cold pulls (all gated until pyctrd serves them)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import ClassVar

from grpclib.const import Cardinality

from bench import clients, proc
from bench.figures import PULL_RPCS, Context, Figure, Metric, Rpc, register, rpc
from bench.harness import PYCTR, Daemon, Side
from bench.stats import median
from pyctr.api._pb.containerd.services.content.v1 import ContentStub, WriteAction, WriteContentRequest

MiB = 1024 * 1024
CHUNK = MiB  # gRPC messages of 1 MiB: well under the 16 MiB limit, as containerd's own clients send


def _random_file(path: str, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (left in the page cache); return the digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            chunk = os.urandom(CHUNK)
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


class _BlobFigure(Figure):
    """A random blob of SIZE bytes in the scratch dir of the loop fs, created in ``prepare``."""

    SIZE = 0
    NAME = ""
    path = ""
    digest = ""

    def prepare(self, ctx: Context) -> None:
        self.path = os.path.join(ctx.session.scratch, self.NAME)
        self.digest = _random_file(self.path, self.SIZE)

    def finish(self, ctx: Context) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


@register
class ContentIngest(_BlobFigure):
    id = "content-ingest"
    title = "`ctr content ingest` of 512 MiB from the page cache (blob removed between runs)"
    metrics = (Metric("ingest_mibs", "`ctr content ingest` 512 MiB", "MiB/s", "higher"),)
    needs = (rpc("content", "Write", Cardinality.STREAM_STREAM), rpc("content", "Delete"))
    SIZE = 512 * MiB
    NAME = "ingest-512.bin"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        # The disk's own ceiling for the same bytes: containerd fsyncs a blob before commit.
        out = os.path.join(ctx.session.scratch, "dd.out")
        rates = []
        for _ in range(3):
            secs = proc.timed(["dd", f"if={self.path}", f"of={out}", "bs=1M", "conv=fsync"])
            rates.append(self.SIZE / MiB / secs)
            os.unlink(out)
        ctx.note(f"`dd bs=1M conv=fsync` of the same file to the same disk: {median(rates):.0f} MiB/s")

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        d = side.daemon
        secs = proc.timed(d.ctr("content", "ingest", f"bench-ingest-{rep}"), stdin_path=self.path)
        proc.run(d.ctr("content", "rm", self.digest))  # the next run must write every byte again
        return {"ingest_mibs": self.SIZE / MiB / secs}


async def _write_blob(address: str, path: str, digest: str, size: int, ref: str) -> None:
    """Content.Write over raw gRPC, committed with a gc.root label so that GC keeps the blob.

    (``ctr content ingest`` takes no label or lease, and an unreferenced blob may be collected.)
    """

    def requests() -> Iterator[WriteContentRequest]:
        yield WriteContentRequest(action=WriteAction.STAT, ref=ref)
        offset = 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield WriteContentRequest(action=WriteAction.WRITE, ref=ref, offset=offset, data=chunk)
                offset += len(chunk)
        yield WriteContentRequest(
            action=WriteAction.COMMIT,
            ref=ref,
            offset=offset,
            total=size,
            expected=digest,
            labels={"containerd.io/gc.root": "bench"},
        )

    ch = clients.channel(address)
    try:
        async for _ in ContentStub(ch, metadata=clients.METADATA).write(requests()):
            pass
    finally:
        ch.close()


@register
class ContentGet(_BlobFigure):
    id = "content-get"
    title = "`ctr content get` of a 256 MiB blob to /dev/null"
    metrics = (Metric("get_mibs", "`ctr content get` 256 MiB", "MiB/s", "higher"),)
    needs = (
        rpc("content", "Write", Cardinality.STREAM_STREAM),
        rpc("content", "Info"),
        rpc("content", "Read", Cardinality.UNARY_STREAM),
        rpc("content", "Delete"),
    )
    SIZE = 256 * MiB
    NAME = "get-256.bin"

    def setup(self, ctx: Context, side: Side) -> None:
        clients.run(_write_blob(side.daemon.address, self.path, self.digest, self.SIZE, "bench-get"))

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        return {"get_mibs": self.SIZE / MiB / proc.timed(side.daemon.ctr("content", "get", self.digest))}

    def teardown(self, ctx: Context, side: Side) -> None:
        proc.run(side.daemon.ctr("content", "rm", self.digest), check=False)


class _ColdPull(Figure):
    """Each pull on a daemon with a brand-new root: nothing cached, no shared base layer."""

    fixtures = ("busybox", "big")
    needs: ClassVar[tuple[Rpc, ...]] = PULL_RPCS

    def pull_command(self, d: Daemon, ref: str) -> list[str]:
        raise NotImplementedError

    def measure(self, ctx: Context, side: Side, rep: str) -> dict[str, float]:
        out = {}
        for name, key, scale in (("busybox", self.metrics[0].key, 1000.0), ("big", self.metrics[1].key, 1.0)):
            ref = ctx.fixtures.image(name).ref
            with side.fresh(f"pull-{name}-{rep}") as d:
                d.launch()
                d.wait_ready()
                proc.run(d.ctr("version"))  # serving, not just listening
                out[key] = proc.timed(self.pull_command(d, ref), timeout=1800) * scale
        return out


@register
class CtrPull(_ColdPull):
    id = "ctr-pull"
    title = "cold `ctr images pull --plain-http` from a local registry (busybox; ~200 MB, 6 layers)"
    metrics = (
        Metric("ctr_pull_busybox_ms", "cold `ctr images pull` busybox", "ms"),
        Metric("ctr_pull_big_s", "cold `ctr images pull` 200 MB image", "s"),
    )

    def pull_command(self, d: Daemon, ref: str) -> list[str]:
        return d.ctr("images", "pull", "--plain-http", ref)


@register
class PyctrPull(_ColdPull):
    id = "pyctr-pull"
    title = "cold `pyctr images pull`: the same pulls through pyctr's own client"
    metrics = (
        Metric("pyctr_pull_busybox_ms", "cold `pyctr images pull` busybox", "ms"),
        Metric("pyctr_pull_big_s", "cold `pyctr images pull` 200 MB image", "s"),
    )
    # pyctr pulls through the Transfer service (containerd 1.7's API), not client-side as ctr 1.6 does.
    needs = (*PULL_RPCS, rpc("transfer", "Transfer"))
    needs_pyctr = ("images pull",)
    _plain_http: bool | None = None

    def pull_command(self, d: Daemon, ref: str) -> list[str]:
        # pyctr speaks plain HTTP to loopback registries by itself (containerd's resolver does the
        # same for localhost); pass ctr's flag only if this pyctr has it.
        if self._plain_http is None:
            usage = proc.run([PYCTR, "images", "pull", "--help"], check=False).stdout
            self._plain_http = "--plain-http" in usage
        flags = ["--plain-http"] if self._plain_http else []
        return d.pyctr("images", "pull", *flags, ref)
