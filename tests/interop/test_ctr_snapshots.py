"""``ctr snapshots`` against pyctrd and containerd, for overlayfs and native.

The same commands run on both daemons, each in a namespace of its own; outputs are compared
after normalising what legitimately differs (paths under each daemon's root, times, usage
numbers within reason). The mounts ctr prints are run for real: a file written through one
snapshot's mount must show through its committed child's mount.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import daemons

pytestmark = pytest.mark.interop

SNAPSHOTTERS = ["overlayfs", "native"]
MISMATCH_WARNINGS = {"WARNING: version mismatch", "WARNING: revision mismatch"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stderr_of(r: subprocess.CompletedProcess[str]) -> str:
    return "".join(line for line in r.stderr.splitlines(True) if line.strip() not in MISMATCH_WARNINGS)


class Ctr:
    """``ctr -a <daemon> -n <ns> snapshots --snapshotter <sn> …`` for one daemon."""

    def __init__(self, exe: str, d: daemons.Daemon, ns: str, snapshotter: str) -> None:
        self.exe, self.d, self.ns, self.sn = exe, d, ns, snapshotter

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [self.exe, "-a", self.d.address, "-n", self.ns, "snapshots", "--snapshotter", self.sn, *args]
        return daemons.run(cmd, timeout=30)

    def raw(self, *args: str) -> bytes:
        """stdout as bytes (``snapshots diff`` writes a gzipped tar)."""
        cmd = [self.exe, "-a", self.d.address, "-n", self.ns, "snapshots", "--snapshotter", self.sn, *args]
        r = subprocess.run(cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (self.d.address, args, r.stderr)
        return r.stdout

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, (self.d.address, args, r.stderr)
        return r.stdout


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture
def mountpoint() -> Iterator[str]:
    """An empty directory; anything still mounted there is unmounted afterwards."""
    path = tempfile.mkdtemp(prefix="snapmnt-", dir="/tmp")
    try:
        yield path
    finally:
        while path in mounted_targets():
            subprocess.run(["umount", path], capture_output=True)
        os.rmdir(path)


def mounted_targets() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def run_mount(printed: str) -> None:
    """Run the ``mount …`` command ctr printed."""
    cmd = shlex.split(printed.strip())
    assert cmd[0] == "mount", printed
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, (printed, res.stderr)


def layer_members(data: bytes) -> list[tuple[str, str, int, str]]:
    """(name, type, mode, sha256 of the data) of every member of a gzipped layer tar."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            body = tar.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            out.append((m.name.rstrip("/"), m.type.decode(), m.mode, hashlib.sha256(body).hexdigest()[:12]))
    return sorted(out)


def umount(path: str) -> None:
    res = subprocess.run(["umount", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and rows by their first cell."""
    lines = out.splitlines()
    return lines[0].split(), {c[0]: c[1:] for c in (line.split() for line in lines[1:]) if c}


def exercise(ctr: Ctr, mnt: str) -> dict[str, object]:
    """One snapshot life cycle through the real ctr; returns what is compared between daemons."""
    seen: dict[str, object] = {}
    ctr.ok("prepare", "base")
    run_mount(ctr.ok("mounts", mnt, "base"))
    with open(os.path.join(mnt, "hello"), "w") as f:
        f.write("hello from base\n")
    os.mkdir(os.path.join(mnt, "dir"))
    umount(mnt)
    ctr.ok("commit", "layer1", "base")

    # A child sees the committed file, and writes of its own.
    ctr.ok("prepare", "child", "layer1")
    printed = ctr.ok("mounts", mnt, "child")
    seen["child mount type"] = shlex.split(printed)[2]
    run_mount(printed)
    with open(os.path.join(mnt, "hello")) as f:
        seen["child reads"] = f.read()
    with open(os.path.join(mnt, "dir", "child-file"), "wb") as f:
        f.write(b"x" * 10000)
    os.unlink(os.path.join(mnt, "hello"))
    umount(mnt)

    # A view of the parent is read-only and does not see the child's changes.
    ctr.ok("view", "ro-view", "layer1")
    # ctr gives views no gc.root label: without one, the view could be collected at any moment.
    ctr.ok("label", "ro-view", "containerd.io/gc.root=test")
    run_mount(ctr.ok("mounts", mnt, "ro-view"))
    seen["view lists"] = sorted(os.listdir(mnt))
    seen["view is read-only"] = subprocess.run(["touch", f"{mnt}/new"], capture_output=True).returncode != 0
    umount(mnt)

    ctr.ok("commit", "layer2", "child")
    ctr.ok("prepare", "grandchild", "layer2")
    run_mount(ctr.ok("mounts", mnt, "grandchild"))
    seen["grandchild lists"] = sorted(os.listdir(mnt)), sorted(os.listdir(os.path.join(mnt, "dir")))
    umount(mnt)

    seen["ls"] = table(ctr.ok("ls"))
    seen["tree"] = ctr.ok("tree")
    info = json.loads(ctr.ok("info", "grandchild"))
    seen["info"] = (info["Kind"], info["Name"], info["Parent"], sorted(info["Labels"]))
    header, usage = table(ctr.ok("usage", "-b"))
    seen["usage header"] = header
    seen["usage keys"] = sorted(usage)
    sizes = {k: (int(v[0]), int(v[1])) for k, v in usage.items()}
    seen["usage sizes"] = sizes
    seen["usage one"] = table(ctr.ok("usage", "-b", "layer2"))[1]

    r = ctr("rm", "layer1")
    seen["rm parent"] = (r.returncode, stderr_of(r))
    r = ctr("rm", "no-such-snapshot")
    seen["rm missing"] = (r.returncode, stderr_of(r))
    r = ctr("commit", "layer1", "grandchild")
    seen["commit existing name"] = (r.returncode, stderr_of(r).replace(ctr.ns, "<ns>"))
    ctr.ok("rm", "grandchild", "layer2", "ro-view", "layer1")
    seen["ls after rm"] = table(ctr.ok("ls"))
    return seen


def diff_layer(ctr: Ctr, mnt: str) -> list[tuple[str, str, int, str]]:
    """``ctr snapshots diff``: a child against a view of its parent, through the Diff service.

    Every snapshot is rooted first: the lease ctr takes for the diff ends with a collection.
    """
    ctr.ok("prepare", "d-base")
    ctr.ok("label", "d-base", "containerd.io/gc.root=test")
    run_mount(ctr.ok("mounts", mnt, "d-base"))
    for name, text in (("keep", "kept\n"), ("change", "old\n"), ("gone", "bye\n")):
        with open(os.path.join(mnt, name), "w") as f:
            f.write(text)
    os.mkdir(os.path.join(mnt, "olddir"))
    umount(mnt)
    ctr.ok("commit", "d-layer", "d-base")
    ctr.ok("label", "d-layer", "containerd.io/gc.root=test")
    ctr.ok("prepare", "d-top", "d-layer")
    ctr.ok("label", "d-top", "containerd.io/gc.root=test")
    run_mount(ctr.ok("mounts", mnt, "d-top"))
    with open(os.path.join(mnt, "change"), "w") as f:
        f.write("new\n")
    os.unlink(os.path.join(mnt, "gone"))
    os.rmdir(os.path.join(mnt, "olddir"))
    os.makedirs(os.path.join(mnt, "newdir", "sub"))
    with open(os.path.join(mnt, "newdir", "sub", "file"), "wb") as f:
        f.write(b"y" * 5000)
    os.symlink("../keep", os.path.join(mnt, "newdir", "link"))
    umount(mnt)
    members = layer_members(ctr.raw("diff", "d-top"))
    ctr.ok("rm", "d-top", "d-layer")
    return members


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_snapshot_diff_matches_containerd(
    snapshotter: str, pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str, mountpoint: str
) -> None:
    ns = unique("snapdiff")
    got = {
        name: diff_layer(Ctr(ctr_bin, d, ns, snapshotter), mountpoint)
        for name, d in (("pyctrd", pyd), ("containerd", containerd))
    }
    assert got["pyctrd"] == got["containerd"]
    assert [(name, kind) for name, kind, *_ in got["pyctrd"]] == [
        (".wh.gone", "0"),
        (".wh.olddir", "0"),
        ("change", "0"),
        ("newdir", "5"),
        ("newdir/link", "2"),
        ("newdir/sub", "5"),
        ("newdir/sub/file", "0"),
    ]


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_snapshot_life_cycle_matches_containerd(
    snapshotter: str, pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str, mountpoint: str
) -> None:
    ns = unique("snap")
    got = {}
    for name, d in (("pyctrd", pyd), ("containerd", containerd)):
        got[name] = exercise(Ctr(ctr_bin, d, ns, snapshotter), mountpoint)
    p, c = got["pyctrd"], got["containerd"]

    # Usage numbers depend on the filesystem's block accounting: plausible, not identical.
    py_sizes, cd_sizes = p.pop("usage sizes"), c.pop("usage sizes")
    assert isinstance(py_sizes, dict) and isinstance(cd_sizes, dict)
    assert py_sizes["ro-view"] == cd_sizes["ro-view"] == (0, 0)  # a view owns nothing
    for key, (size, inodes) in py_sizes.items():
        assert key == "ro-view" or (inodes >= 1 and size >= 4096), (key, size, inodes)
    assert py_sizes["layer1"][0] >= 4096 and py_sizes["layer1"][1] >= 3  # root, hello, dir
    assert py_sizes["layer2"][0] >= 10000  # the child's 10000-byte file
    # Same files on the same filesystem: the same inodes, and sizes within a few blocks.
    assert {k: v[1] for k, v in py_sizes.items()} == {k: v[1] for k, v in cd_sizes.items()}
    for key, (size, _) in py_sizes.items():
        assert abs(size - cd_sizes[key][0]) <= 8192, (key, size, cd_sizes[key])
    p_one, c_one = p.pop("usage one"), c.pop("usage one")
    assert isinstance(p_one, dict) and isinstance(c_one, dict)
    assert list(p_one) == list(c_one) == ["layer2"]

    assert p == c
    assert p["child reads"] == "hello from base\n"
    assert p["view lists"] == ["dir", "hello"] and p["view is read-only"] is True
    assert p["grandchild lists"] == (["dir"], ["child-file"])
    assert p["ls"] == (
        ["KEY", "PARENT", "KIND"],
        {
            "grandchild": ["layer2", "Active"],
            "layer1": ["Committed"],
            "layer2": ["layer1", "Committed"],
            "ro-view": ["layer1", "View"],
        },
    )
    assert p["rm parent"][0] == 1  # type: ignore[index]
    assert "cannot remove snapshot with child: failed precondition" in p["rm parent"][1]  # type: ignore[index]
    assert p["ls after rm"] == (["KEY", "PARENT", "KIND"], {})


def test_unknown_snapshotter_fails_like_containerd(
    pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str
) -> None:
    ns = unique("snap")
    for args in (["ls"], ["prepare", "k"], ["usage"]):
        p = Ctr(ctr_bin, pyd, ns, "no-such-snapshotter")(*args)
        c = Ctr(ctr_bin, containerd, ns, "no-such-snapshotter")(*args)
        assert (p.returncode, stderr_of(p)) == (c.returncode, stderr_of(c)), args
        assert p.returncode == 1
        assert "snapshotter not loaded: no-such-snapshotter: invalid argument" in p.stderr


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_prepare_existing_key_and_missing_parent_fail_like_containerd(
    snapshotter: str, pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str
) -> None:
    ns = unique("snap")
    results = []
    for d in (pyd, containerd):
        ctr = Ctr(ctr_bin, d, ns, snapshotter)
        ctr.ok("prepare", "k1")
        dup = ctr("prepare", "k1")
        orphan = ctr("prepare", "k2", "no-such-parent")
        active_parent = ctr("prepare", "k3", "k1")
        ctr.ok("rm", "k1")
        results.append([(r.returncode, stderr_of(r)) for r in (dup, orphan, active_parent)])
    p, c = results
    assert [rc for rc, _ in p] == [rc for rc, _ in c] == [1, 1, 1]
    # The error classes (the text after the last colon) are the same; the wording may differ.
    assert [err.rsplit(":", 1)[-1] for _, err in p] == [err.rsplit(":", 1)[-1] for _, err in c]
    assert p[0] == c[0]
