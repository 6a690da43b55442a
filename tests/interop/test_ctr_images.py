"""``ctr images`` against pyctrd and containerd: pull from a local registry, import, export, mount.

Both daemons pull the same images from a docker-registry on 127.0.0.1 (or import the same
archives), each into a namespace of its own; the unpacked root filesystems must be identical,
file by file: names, types, modes, owners, times, symlink targets, contents, hard-link sharing,
and the whiteouts and opaque directories of the multi-layer image having taken effect.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import daemons, images, registry

pytestmark = pytest.mark.interop

MISMATCH_WARNINGS = {"WARNING: version mismatch", "WARNING: revision mismatch"}
OVERLAY_SNAPSHOTS = os.path.join("io.containerd.snapshotter.v1.overlayfs", "snapshots")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def stderr_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without version warnings and ctr's logrus lines (they carry times)."""
    return [
        line
        for line in r.stderr.splitlines()
        if line.strip() not in MISMATCH_WARNINGS and not line.startswith("time=")
    ]


class Ctr:
    def __init__(self, exe: str, d: daemons.Daemon, ns: str) -> None:
        self.exe, self.d, self.ns = exe, d, ns

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return daemons.run([self.exe, "-a", self.d.address, "-n", self.ns, *args], timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, (self.d.address, args, r.stderr)
        return r.stdout

    def pull(self, ref: str, snapshotter: str = "overlayfs") -> None:
        self.ok("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref)


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


@pytest.fixture
def pair(pyd: daemons.Daemon, containerd: daemons.Daemon, ctr_bin: str) -> tuple[Ctr, Ctr]:
    """ctr for pyctrd and for containerd, each in a fresh namespace of its own."""
    return Ctr(ctr_bin, pyd, unique("img-py")), Ctr(ctr_bin, containerd, unique("img-cd"))


# ---------------------------------------------------------------------------------------- trees

Entry = tuple[object, ...]


def walk_tree(root: str) -> tuple[dict[str, Entry], list[list[str]]]:
    """Every entry under ``root`` (relative path → its properties) and the hard-link groups."""
    entries: dict[str, Entry] = {}
    by_inode: dict[int, list[str]] = collections.defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            fmt = stat.S_IFMT(st.st_mode)
            props: list[object] = [fmt, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, int(st.st_mtime)]
            if stat.S_ISLNK(st.st_mode):
                props.append(os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    props += [st.st_size, hashlib.sha256(f.read()).hexdigest()]
                if st.st_nlink > 1:
                    by_inode[st.st_ino].append(rel)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                props.append(st.st_rdev)
            props.append(tuple(sorted(os.listxattr(path, follow_symlinks=False))))
            entries[rel] = tuple(props)
    links = sorted(sorted(group) for group in by_inode.values() if len(group) > 1)
    return entries, links


def mounted_tree(
    ctr: Ctr, ref: str, snapshotter: str = "overlayfs"
) -> tuple[dict[str, Entry], list[list[str]]]:
    """``ctr images mount`` the image, walk it, ``ctr images unmount --rm``; nothing left behind."""
    target = tempfile.mkdtemp(prefix="imgmnt-", dir="/tmp")
    sn = ("--snapshotter", snapshotter)
    try:
        ctr.ok("images", "mount", *sn, ref, target)
        try:
            return walk_tree(target)
        finally:
            ctr.ok("images", "unmount", *sn, "--rm", target)
            assert target not in mounted_targets()
            keys = table(ctr.ok("snapshots", *sn, "ls"))[1]
            assert target not in keys  # the mount's snapshot went with --rm
    finally:
        os.rmdir(target)


def mounted_targets() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = out.splitlines()
    return lines[0].split(), {c[0]: c[1:] for c in (line.split() for line in lines[1:]) if c}


def snapshot_dirs(d: daemons.Daemon) -> set[str]:
    path = os.path.join(d.root, OVERLAY_SNAPSHOTS)
    return set(os.listdir(path)) if os.path.isdir(path) else set()


def listing_empty(ctr: Ctr, *args: str) -> Callable[[], bool]:
    """A check: the table ``ctr <args>`` prints has no rows."""
    return lambda: table(ctr.ok(*args))[1] == {}


def dirs_gone(d: daemons.Daemon, dirs: set[str]) -> Callable[[], bool]:
    """A check: none of ``dirs`` is left among the daemon's overlay snapshot directories."""
    return lambda: not snapshot_dirs(d) & dirs


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ----------------------------------------------------------------------------------------- pull


@pytest.mark.parametrize(
    ("repo", "snapshotter"),
    [("library/busybox", "overlayfs"), ("library/multi", "overlayfs"), ("library/multi", "native")],
)
def test_pulled_trees_are_identical(
    repo: str, snapshotter: str, pair: tuple[Ctr, Ctr], image_registry: registry.Registry
) -> None:
    ref = image_registry.ref(repo)
    trees = []
    for ctr in pair:
        ctr.pull(ref, snapshotter)
        trees.append(mounted_tree(ctr, ref, snapshotter))
    (py_entries, py_links), (cd_entries, cd_links) = trees
    assert sorted(py_entries) == sorted(cd_entries)
    diffs = {k: (py_entries[k], cd_entries[k]) for k in py_entries if py_entries[k] != cd_entries[k]}
    assert not diffs
    assert py_links == cd_links
    assert not [p for p in py_entries if os.path.basename(p).startswith(".wh.")]
    if repo == "library/busybox":
        assert stat.S_ISREG(py_entries["bin/busybox"][0])  # type: ignore[arg-type]
        assert py_entries["bin/sh"][-2] == "busybox"
        assert {"etc/passwd", "etc/group"} <= set(py_entries)
    else:
        # Whiteouts and the opaque directory took effect; the later layers' files are there.
        for gone in ("a/gone", "gonedir", "opq/old", "opq/sub"):
            assert gone not in py_entries
        assert {"a/keep", "opq/new", "opq/three", "b/file", "b/link", "c/dangling"} <= set(py_entries)
        assert py_entries["a/keep"][1:4] == ("0o640", 7, 8)
        assert py_entries["keepdir"][1:4] == ("0o700", 1000, 1000)
        assert py_entries["keepdir/setuid"][1] == "0o4755"
        assert py_entries["b/rel"][5] == "../a/keep" and py_entries["b/abs"][5] == "/etc/passwd"
        assert py_entries["opq"][1] == "0o750"
        assert py_links == [["b/file", "b/link"], ["opq/x", "opq/x-link"]]


def test_ls_check_tag_rm_and_gc(pair: tuple[Ctr, Ctr], image_registry: registry.Registry) -> None:
    ref = image_registry.ref("library/multi")
    tagged = "docker.io/test/multi:tagged"
    seen = []
    for ctr in pair:
        before = snapshot_dirs(ctr.d)
        ctr.pull(ref)
        new_dirs = snapshot_dirs(ctr.d) - before
        assert len(new_dirs) == 3, new_dirs  # one per layer
        ctr.ok("images", "tag", ref, tagged)
        ls = table(ctr.ok("images", "ls"))
        check = table(ctr.ok("images", "check"))
        q = ctr.ok("images", "ls", "-q").split()
        assert sorted(q) == sorted([ref, tagged])
        r = ctr("images", "tag", ref, tagged)
        tag_again = (r.returncode, stderr_lines(r))
        assert table(ctr.ok("content", "ls"))[1]

        ctr.ok("images", "rm", ref, tagged)
        assert ctr.ok("images", "ls", "-q") == ""
        # GC after the delete: content and snapshots go, in metadata and on disk.
        assert wait_until(listing_empty(ctr, "content", "ls")), ctr.ok("content", "ls")
        assert wait_until(listing_empty(ctr, "snapshots", "ls")), ctr.ok("snapshots", "ls")
        assert wait_until(dirs_gone(ctr.d, new_dirs)), snapshot_dirs(ctr.d) & new_dirs
        seen.append((ls, check, tag_again))
    (p_ls, p_check, p_tag), (c_ls, c_check, c_tag) = seen
    assert p_ls == c_ls
    assert p_ls[0] == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    assert p_check == c_check
    assert "complete" in p_check[1][ref] and p_check[1][ref][-1] == "true"  # unpacked
    assert p_tag == c_tag


def test_pull_twice_is_fine(pair: tuple[Ctr, Ctr], image_registry: registry.Registry) -> None:
    ref = image_registry.ref("library/busybox")
    for ctr in pair:
        ctr.pull(ref)
        first = (ctr.ok("images", "ls"), ctr.ok("snapshots", "ls"), ctr.ok("content", "ls", "-q"))
        ctr.pull(ref)
        again = (ctr.ok("images", "ls"), ctr.ok("snapshots", "ls"), ctr.ok("content", "ls", "-q"))
        assert table(first[0]) == table(again[0]) and first[1:] == again[1:]
        ctr.ok("images", "rm", "--sync", ref)


def test_pull_of_a_missing_tag_fails_like_containerd(
    pair: tuple[Ctr, Ctr], image_registry: registry.Registry
) -> None:
    results = []
    for ctr in pair:
        for ref in (image_registry.ref("library/busybox", "no-such-tag"), image_registry.ref("nope/none")):
            r = ctr("images", "pull", "--plain-http", ref)
            results.append((r.returncode, stderr_lines(r)))
    assert results[:2] == results[2:]
    assert results[0][0] == 1
    assert results[0][1][-1].endswith(": not found")


# ----------------------------------------------------------------------------- import and export


def test_import_oci_and_docker_archives(pair: tuple[Ctr, Ctr], built_images: images.Images) -> None:
    bb = built_images.busybox
    outputs = []
    for ctr in pair:
        r = ctr("images", "import", "--base-name", "docker.io/pyctr/oci-busybox", bb.oci_tar)
        assert r.returncode == 0, r.stderr
        oci_out = r.stdout
        r = ctr("images", "import", bb.docker_tar)
        assert r.returncode == 0, r.stderr
        docker_out = r.stdout
        r = ctr("images", "import", "--base-name", "docker.io/pyctr/multi", built_images.multi.oci_tar)
        assert r.returncode == 0, r.stderr
        outputs.append(
            (
                oci_out,
                docker_out,
                r.stdout,
                table(ctr.ok("images", "ls")),
                table(ctr.ok("images", "check")),
                table(ctr.ok("snapshots", "ls")),
                mounted_tree(ctr, "docker.io/library/busybox:latest"),
                mounted_tree(ctr, "docker.io/pyctr/multi:latest"),
            )
        )
    p, c = outputs
    assert p[:3] == c[:3]
    assert "unpacking docker.io/pyctr/oci-busybox:latest" in p[0]
    assert p[3] == c[3]
    assert set(p[3][1]) == {
        "docker.io/pyctr/oci-busybox:latest",
        "docker.io/library/busybox:latest",
        "docker.io/pyctr/multi:latest",
    }
    assert p[4] == c[4]
    assert p[5] == c[5]
    assert p[6] == c[6]
    assert p[7] == c[7]


def test_export_from_pyctrd_imports_into_containerd(
    pair: tuple[Ctr, Ctr], image_registry: registry.Registry, tmp_path: str
) -> None:
    py, cd = pair
    ref = image_registry.ref("library/multi")
    py.pull(ref)
    cd.pull(ref)
    exported = []
    for ctr, name in ((py, "py.tar"), (cd, "cd.tar")):
        path = os.path.join(str(tmp_path), name)
        ctr.ok("images", "export", path, ref)
        with open(path, "rb") as f:
            exported.append(hashlib.sha256(f.read()).hexdigest())
    assert exported[0] == exported[1]  # the same bytes: ctr writes the archive from the content

    other = Ctr(cd.exe, cd.d, unique("img-from-py"))
    r = other("images", "import", os.path.join(str(tmp_path), "py.tar"))
    assert r.returncode == 0, r.stderr
    assert table(other.ok("images", "ls"))[1] == table(py.ok("images", "ls"))[1]
    assert mounted_tree(other, ref) == mounted_tree(py, ref)
    other.ok("images", "rm", "--sync", ref)


def test_removing_an_image_keeps_what_another_namespace_uses(
    pair: tuple[Ctr, Ctr], image_registry: registry.Registry
) -> None:
    ref = image_registry.ref("library/multi")
    results = []
    for ctr in pair:
        other = Ctr(ctr.exe, ctr.d, ctr.ns + "-b")
        ctr.pull(ref)
        other.pull(ref)
        ctr.ok("images", "rm", "--sync", ref)
        assert wait_until(listing_empty(ctr, "content", "ls"))
        # The other namespace's image is whole: blobs readable, snapshots unpacked and mountable.
        results.append((table(other.ok("images", "check")), mounted_tree(other, ref)))
        other.ok("images", "rm", "--sync", ref)
    assert results[0] == results[1]
    assert "complete" in results[0][0][1][ref]
