"""Content ingest under faults, on a real pyctrd: a SIGKILLed daemon, a vanished client, a wrong
digest, a second writer on a ref, a full disk.

The writes go through the real Go ``ctr content ingest`` where a client of that kind is needed, and
through a grpclib Write stream where the test must drive the STAT / WRITE / COMMIT steps itself
(resuming from the offset the server reports, as containerd's remote writer does).
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from pyctr.api import digest as digestmod
from pyctr.api._pb.containerd.services.content import v1 as pb
from tests.helpers import daemons

MiB = 1 << 20
NS = "default"
WRITE = "/containerd.services.content.v1.Content/Write"
CONTENT_DIR = "io.containerd.content.v1.content"


# -- a grpclib client that drives Write step by step ------------------------------------------------


class Session:
    """One Content.Write stream: each request gets exactly one reply."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def step(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        await self.stream.send_message(req)
        resp = await self.stream.recv_message()
        if resp is None:
            await self.stream.end()
            await self.stream.recv_trailing_metadata()  # raises the call's error status
            raise AssertionError("the server ended the Write stream without a reply or an error")
        return resp

    async def stat(self, ref: str, total: int = 0, expected: str = "") -> pb.WriteContentResponse:
        return await self.step(
            pb.WriteContentRequest(action=pb.WriteAction.STAT, ref=ref, total=total, expected=expected)
        )

    async def copy(self, path: str, offset: int, size: int, expected: str) -> pb.WriteContentResponse:
        """WRITE from ``offset`` in 1 MiB pieces, then COMMIT; as content.Copy does after a STAT."""
        while offset < size:
            chunk = read_range(path, offset, min(MiB, size - offset))
            resp = await self.step(
                pb.WriteContentRequest(action=pb.WriteAction.WRITE, offset=offset, data=chunk)
            )
            assert resp.offset == offset + len(chunk), f"server at {resp.offset}, sent up to {offset}"
            offset += len(chunk)
        return await self.step(
            pb.WriteContentRequest(
                action=pb.WriteAction.COMMIT,
                total=size,
                offset=offset,
                expected=expected,
                # A GC root: a collection right after a (re)start may otherwise take the blob.
                labels={"containerd.io/gc.root": "test"},
            )
        )


class Client:
    def __init__(self, address: str, ns: str = NS) -> None:
        self.channel = Channel(path=address)
        self.md = {"containerd-namespace": ns}
        self.stub = pb.ContentStub(self.channel, metadata=self.md)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Session]:
        async with self.channel.request(
            WRITE,
            Cardinality.STREAM_STREAM,
            pb.WriteContentRequest,
            pb.WriteContentResponse,
            metadata=self.md,
        ) as stream:
            await stream.send_request()
            yield Session(stream)
            await stream.end()

    async def status(self, ref: str) -> pb.Status | None:
        try:
            return (await self.stub.status(pb.StatusRequest(ref=ref))).status
        except GRPCError as exc:
            if exc.status == Status.NOT_FOUND:
                return None
            raise

    async def digests(self) -> list[str]:
        return [i.digest async for batch in self.stub.list(pb.ListContentRequest()) for i in batch.info]

    async def read(self, dgst: str, offset: int, size: int) -> bytes:
        req = pb.ReadContentRequest(digest=dgst, offset=offset, size=size)
        return b"".join([r.data async for r in self.stub.read(req)])

    def close(self) -> None:
        self.channel.close()


def with_client(address: str, fn: Any) -> Any:
    async def main() -> Any:
        client = Client(address)
        try:
            return await fn(client)
        finally:
            client.close()

    return asyncio.run(main())


# -- helpers ------------------------------------------------------------------------------------------


def ctr(d: daemons.Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ctr")
    if exe is None:
        pytest.skip("the real Go ctr is not installed")
    return daemons.run([exe, "-a", d.address, *args], timeout=30)


def read_range(path: str, offset: int, size: int = -1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def sha256_file(path: str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit if limit is not None else 1 << 62
    with open(path, "rb") as f:
        while left and (chunk := f.read(min(4 * MiB, left))):
            h.update(chunk)
            left -= len(chunk)
    return f"sha256:{h.hexdigest()}"


def blob_files(d: daemons.Daemon) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(d.root, CONTENT_DIR, "blobs")):
        out += [os.path.join(dirpath, f) for f in files]
    return out


def ingest_dirs(d: daemons.Daemon) -> list[str]:
    return os.listdir(os.path.join(d.root, CONTENT_DIR, "ingest"))


class Feeder:
    """``ctr content ingest <ref>`` reading a pipe that the test fills as far as it wants."""

    def __init__(self, d: daemons.Daemon, ref: str, path: str) -> None:
        exe = shutil.which("ctr")
        if exe is None:
            pytest.skip("the real Go ctr is not installed")
        self.proc = subprocess.Popen(
            [exe, "-a", d.address, "content", "ingest", ref],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.path = path
        self.error: BaseException | None = None

    def feed(self, upto: int) -> threading.Thread:
        """Write the first ``upto`` bytes of the file into ctr's stdin, in the background."""

        def run() -> None:
            assert self.proc.stdin is not None
            try:
                with open(self.path, "rb") as f:
                    left = upto
                    while left and (chunk := f.read(min(MiB, left))):
                        self.proc.stdin.write(chunk)
                        left -= len(chunk)
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            except BaseException as exc:
                self.error = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def finish(self) -> tuple[int, str]:
        """Close stdin and wait: (exit status, stderr)."""
        with contextlib.suppress(BrokenPipeError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def wait_for_offset(d: daemons.Daemon, ref: str, offset: int, timeout: float = 30.0) -> None:
    async def fn(client: Client) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            st = await client.status(ref)
            last = st.offset if st else None
            if last == offset:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"ingest {ref} at {last}, expected {offset} within {timeout}s")

    with_client(d.address, fn)


@pytest.fixture
def big_file(tmp_path: Any) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "big")
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=256", "status=none"], check=True, timeout=60
    )
    yield path


# -- tests -------------------------------------------------------------------------------------------


def test_sigkill_mid_ingest_then_resume(pyctrd: daemons.Daemon, big_file: str) -> None:
    size = os.path.getsize(big_file)
    dgst = sha256_file(big_file)
    cut = 192 * MiB  # ctr moves most of the bytes; the resume sends the rest through grpclib
    feeder = Feeder(pyctrd, "big", big_file)
    try:
        feeder.feed(cut)
        wait_for_offset(pyctrd, "big", cut)
        assert ctr(pyctrd, "content", "ls", "-q").stdout.split() == [], "an open ingest is listed"
        pyctrd.kill()  # SIGKILL by PID, while ctr still holds the Write stream open
    finally:
        feeder.kill()
    daemons.restart(pyctrd)

    listed = ctr(pyctrd, "content", "ls", "-q")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [], "a partial blob is listed"
    assert blob_files(pyctrd) == [], "a partial blob was published"
    active = ctr(pyctrd, "content", "active")
    assert "big" in active.stdout, active.stdout

    async def resume(client: Client) -> None:
        st = await client.status("big")
        assert st is not None and st.offset == cut, f"status after restart: {st}"
        assert await client.digests() == []
        async with client.write() as w:
            stat = await w.stat("big", size, dgst)
            assert stat.offset == cut, f"STAT offset {stat.offset}"
            assert stat.digest == sha256_file(big_file, cut), "digest does not continue from the stored bytes"
            done = await w.copy(big_file, stat.offset, size, dgst)
            assert (done.offset, done.digest) == (size, dgst)
        assert await client.digests() == [dgst]
        assert await client.status("big") is None
        # The bytes around the resume point, and the end, as a client reads them.
        around = cut - 3 * MiB // 2
        assert await client.read(dgst, around, 3 * MiB) == read_range(big_file, around, 3 * MiB)
        assert await client.read(dgst, size - 100, 0) == read_range(big_file, size - 100)

    with_client(pyctrd.address, resume)
    blob = os.path.join(pyctrd.root, CONTENT_DIR, "blobs", "sha256", dgst.split(":")[1])
    assert filecmp.cmp(blob, big_file, shallow=False), "committed bytes differ from the source"
    assert ingest_dirs(pyctrd) == []
    assert ctr(pyctrd, "content", "ls", "-q").stdout.split() == [dgst]


def test_wrong_expected_digest_leaves_nothing(pyctrd: daemons.Daemon, tmp_path: Any) -> None:
    data = os.urandom(300_000)
    path = os.path.join(str(tmp_path), "data")
    with open(path, "wb") as out:
        out.write(data)
    wrong = digestmod.of(b"something else")
    exe = shutil.which("ctr")
    if exe is None:
        pytest.skip("the real Go ctr is not installed")
    with open(path, "rb") as f:
        r = subprocess.run(
            [exe, "-a", pyctrd.address, "content", "ingest", "--expected-digest", wrong, "wrong"],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode != 0
    assert f"unexpected commit digest {digestmod.of(data)}, expected {wrong}" in r.stderr, r.stderr
    assert "failed precondition" in r.stderr, r.stderr
    assert ctr(pyctrd, "content", "ls", "-q").stdout.split() == []
    assert blob_files(pyctrd) == [], "a blob was published for a rejected commit"

    async def check(client: Client) -> None:
        # containerd keeps the ingest after a failed commit (a retry can resume it): reported, then aborted.
        st = await client.status("wrong")
        assert st is not None and st.offset == len(data), st
        await client.stub.abort(pb.AbortRequest(ref="wrong"))
        assert await client.status("wrong") is None

    with_client(pyctrd.address, check)
    assert ingest_dirs(pyctrd) == []
    assert ctr(pyctrd, "content", "active").stdout.split() == ["REF", "SIZE", "AGE"]


def test_second_writer_on_a_ref_is_unavailable(pyctrd: daemons.Daemon) -> None:
    data = b"first writer wins"

    async def body(client: Client) -> None:
        async with client.write() as first:
            await first.stat("shared-ref")
            await first.step(pb.WriteContentRequest(action=pb.WriteAction.WRITE, data=data[:5]))
            with pytest.raises(GRPCError) as err:
                async with client.write() as second:
                    await second.stat("shared-ref")
            assert err.value.status == Status.UNAVAILABLE
            assert re.match(r"ref \S*shared-ref locked for ", err.value.message or ""), err.value.message
            # The first writer is unaffected.
            resp = await first.step(
                pb.WriteContentRequest(
                    action=pb.WriteAction.COMMIT,
                    offset=5,
                    data=data[5:],
                    total=len(data),
                    expected=digestmod.of(data),
                    # A GC root: the start-up collection may run after this commit on a busy machine.
                    labels={"containerd.io/gc.root": "test"},
                )
            )
            assert resp.digest == digestmod.of(data)
        # Released once the first stream ended: the ref is free again (and starts empty).
        async with client.write() as again:
            assert (await again.stat("shared-ref")).offset == 0
        assert await client.read(digestmod.of(data), 0, 0) == data

    with_client(pyctrd.address, body)


def test_client_vanishing_mid_write_leaves_a_resumable_ingest(pyctrd: daemons.Daemon, tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "data")
    with open(path, "wb") as f:
        f.write(os.urandom(5 * MiB + 123))
    size, dgst = os.path.getsize(path), sha256_file(path)
    feeder = Feeder(pyctrd, "vanish", path)
    try:
        feeder.feed(3 * MiB)
        wait_for_offset(pyctrd, "vanish", 3 * MiB)
    finally:
        feeder.kill()  # SIGKILL: the stream just stops, nothing is closed cleanly

    async def resume(client: Client) -> None:
        # The server notices the dead connection and releases the ref; a client retries until then.
        deadline = time.monotonic() + 10
        while True:
            try:
                async with client.write() as w:
                    stat = await w.stat("vanish", size, dgst)
                    assert stat.offset == 3 * MiB, f"STAT offset {stat.offset}"
                    done = await w.copy(path, stat.offset, size, dgst)
                    assert done.digest == dgst
                break
            except GRPCError as exc:
                if exc.status != Status.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert await client.read(dgst, 0, 0) == read_range(path, 0)

    with_client(pyctrd.address, resume)
    assert ingest_dirs(pyctrd) == []


@pytest.fixture
def small_root() -> Iterator[daemons.Daemon]:
    """A pyctrd whose root is an 8 MiB tmpfs."""
    base = daemons.new_base("pyctrd-full-")
    root = os.path.join(base, "root")
    os.makedirs(root)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", root], capture_output=True, text=True
    )
    if mount.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    d = None
    try:
        d = daemons.start_pyctrd(base)
        yield d
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", root], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_disk_full_is_a_clean_error(small_root: daemons.Daemon, tmp_path: Any) -> None:
    d = small_root
    path = os.path.join(str(tmp_path), "too-big")
    with open(path, "wb") as out:
        out.write(os.urandom(16 * MiB))
    size, dgst = os.path.getsize(path), sha256_file(path)

    async def body(client: Client) -> None:
        with pytest.raises(GRPCError) as err:
            async with client.write() as w:
                await w.stat("too-big", size, dgst)
                await w.copy(path, 0, size, dgst)
        assert err.value.status in (Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE), err.value
        assert "No space left on device" in (err.value.message or ""), err.value.message
        # Still serving: the failed ingest is reported, then aborted, and space comes back.
        st = await client.status("too-big")
        assert st is not None and 0 < st.offset < size, st
        await client.stub.abort(pb.AbortRequest(ref="too-big"))
        assert await client.status("too-big") is None
        assert await client.digests() == []

    with_client(d.address, body)
    small = os.path.join(str(tmp_path), "small")
    with open(small, "wb") as out:
        out.write(os.urandom(MiB))
    with open(small, "rb") as f:
        r = subprocess.run(
            [shutil.which("ctr") or "ctr", "-a", d.address, "content", "ingest", "small"],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 0, r.stderr
    sdgst = sha256_file(small)
    assert ctr(d, "content", "ls", "-q").stdout.split() == [sdgst]
    got = subprocess.run(
        [shutil.which("ctr") or "ctr", "-a", d.address, "content", "get", sdgst],
        capture_output=True,
        timeout=30,
    )
    with open(small, "rb") as f:
        assert got.stdout == f.read()
