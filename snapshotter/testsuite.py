"""An importable conformance suite for snapshotters (containerd's snapshots/testsuite in spirit).

Each case is an async function taking a fresh snapshotter and a scratch directory; the test
module runs every case against every snapshotter (overlayfs and native). Cases that mount need
root: they mount what the snapshotter returns, exactly as a consumer would, and always unmount.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator

from pyctr.api.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pyctr.api.mount import Mount
from pyctr.snapshotter.base import Info, Kind, Snapshotter

Case = Callable[[Snapshotter, str], Awaitable[None]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@contextlib.contextmanager
def mounted(mounts: list[Mount], target: str) -> Iterator[str]:
    """Mount like a consumer: all mounts on ``target``, unmounted in reverse order."""
    os.makedirs(target, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            opts = list(m.options)
            kind = m.type
            if kind == "bind":
                kind = "none"
                if "bind" not in opts and "rbind" not in opts:
                    opts.append("bind")
            subprocess.run(["mount", "-t", kind, "-o", ",".join(opts), m.source, target], check=True)
            done += 1
        yield target
    finally:
        for _ in range(done):
            subprocess.run(["umount", target], check=False)


def write_file(path: str, data: bytes) -> None:
    """Test I/O is tiny; plain blocking calls keep the cases readable."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _expect(exc: type[Exception], awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except exc:
        return
    raise AssertionError(f"expected {exc.__name__}")


async def _layer(sn: Snapshotter, scratch: str, name: str, parent: str, files: dict[str, str | None]) -> None:
    """Prepare on ``parent``, write ``files`` through the mounts, commit as ``name``."""
    key = f"{name}-active"
    mounts = await sn.prepare(key, parent, {})
    with mounted(mounts, os.path.join(scratch, "mnt")) as root:
        for path, content in files.items():
            full = os.path.join(root, path)
            if content is None:
                os.unlink(full)
                continue
            write_file(full, content.encode())
    await sn.commit(name, key, {})


@case
async def prepare_commit_view(sn: Snapshotter, scratch: str) -> None:
    await _layer(sn, scratch, "base", "", {"a.txt": "a", "dir/b.txt": "b"})
    info = await sn.stat("base")
    assert info.kind == Kind.COMMITTED and info.parent == ""
    mounts = await sn.view("v", "base", {})
    with mounted(mounts, os.path.join(scratch, "v")) as root:
        assert read_file(os.path.join(root, "dir/b.txt")) == b"b"
        try:
            write_file(os.path.join(root, "new"), b"")
        except OSError:
            pass
        else:
            raise AssertionError("a view must be read-only")
    assert (await sn.stat("v")).kind == Kind.VIEW


@case
async def layers_stack_and_delete(sn: Snapshotter, scratch: str) -> None:
    await _layer(sn, scratch, "l1", "", {"keep": "1", "gone": "x"})
    await _layer(sn, scratch, "l2", "l1", {"gone": None, "new": "2"})
    mounts = await sn.prepare("top", "l2", {})
    with mounted(mounts, os.path.join(scratch, "top")) as root:
        assert sorted(os.listdir(root)) == ["keep", "new"]
        write_file(os.path.join(root, "written"), b"w")
    assert (await sn.stat("l2")).parent == "l1"


@case
async def deep_chain(sn: Snapshotter, scratch: str) -> None:
    parent = ""
    for i in range(24):
        await _layer(sn, scratch, f"d{i}", parent, {f"f{i}": str(i)})
        parent = f"d{i}"
    mounts = await sn.view("deep", parent, {})
    with mounted(mounts, os.path.join(scratch, "deep")) as root:
        assert len(os.listdir(root)) == 24


@case
async def errors(sn: Snapshotter, scratch: str) -> None:
    await sn.prepare("a", "", {})
    await _expect(AlreadyExists, sn.prepare("a", "", {}))
    await _expect(NotFound, sn.prepare("b", "missing", {}))
    await _expect((InvalidArgument, FailedPrecondition), sn.prepare("c", "a", {}))  # type: ignore[arg-type]
    await _expect(NotFound, sn.stat("missing"))
    await _expect(NotFound, sn.mounts("missing"))
    await sn.commit("a-c", "a", {})
    await _expect((NotFound, FailedPrecondition), sn.commit("again", "a-c", {}))  # type: ignore[arg-type]
    await sn.prepare("child", "a-c", {})
    await _expect(FailedPrecondition, sn.remove("a-c"))
    await sn.remove("child")
    await sn.remove("a-c")
    await _expect(NotFound, sn.remove("a-c"))


@case
async def labels_and_update(sn: Snapshotter, scratch: str) -> None:
    await sn.prepare("k", "", {"containerd.io/snapshot/x": "1", "other": "dropped"})
    info = await sn.stat("k")
    assert info.labels == {"containerd.io/snapshot/x": "1"}
    new = Info(name="k", parent="", kind=Kind.UNKNOWN, labels={"containerd.io/snapshot/y": "2"})
    updated = await sn.update(new, ["labels.containerd.io/snapshot/y"])
    assert updated.labels == {"containerd.io/snapshot/x": "1", "containerd.io/snapshot/y": "2"}
    await _expect(InvalidArgument, sn.update(new, ["parent"]))


@case
async def usage_and_walk(sn: Snapshotter, scratch: str) -> None:
    mounts = await sn.prepare("u", "", {})
    with mounted(mounts, os.path.join(scratch, "u")) as root:
        write_file(os.path.join(root, "blob"), os.urandom(1 << 20))
    active = await sn.usage("u")
    assert active.size >= 1 << 20 and active.inodes >= 2
    await sn.commit("u-c", "u", {})
    assert (await sn.usage("u-c")).size == active.size
    names = {i.name for i in await sn.walk()}
    assert names == {"u-c"}


@case
async def cleanup_removes_orphans(sn: Snapshotter, scratch: str) -> None:
    await sn.prepare("live", "", {})
    root = getattr(sn, "root", None)
    if root is None:
        return
    orphan = os.path.join(root, "snapshots", "999999")
    os.makedirs(os.path.join(orphan, "fs"))
    await sn.cleanup()
    assert not os.path.exists(orphan)
    assert (await sn.stat("live")).kind == Kind.ACTIVE
