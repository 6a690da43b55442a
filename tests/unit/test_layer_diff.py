"""Layer diff of two full trees (the native snapshotter): apply(diff(lower, upper)) == upper."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from pyctr.api.errdefs import Canceled
from pyctr.snapshotter.layer import write_diff
from tests.unit.test_layer_apply import T0, apply, layer, m, tree_view

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layer diff tests need root (chown, mknod)")

BASE = layer(
    m("a/", "dir"),
    m("a/old", data=b"old"),
    m("a/stay", data=b"stay"),
    m("b", data=b"b", mode=0o644),
    m("c/", "dir"),
    m("c/x", data=b"x"),
    m("dev/", "dir"),
    m("dev/null", "char", mode=0o666, dev=(1, 3)),
    m("e/", "dir"),
    m("e/f", data=b"f"),
    m("f", data=b"file"),
    m("keep/", "dir"),
    m("keep/k", data=b"kkkk"),
    m("link", "symlink", link="keep/k"),
    m("u", data=b"unchanged"),
    m("x/", "dir", xattrs={"user.dir": b"1"}),
    m("x/y", data=b"y", uid=1000, gid=1000),
)


def cp(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


def diff(lower: Path | None, upper: Path) -> bytes:
    out = io.BytesIO()
    result = write_diff(out, str(lower) if lower else None, str(upper))
    data = out.getvalue()
    assert result.size == len(data) and result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    return data


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    apply(BASE, lower)
    cp(lower, upper)
    (upper / "a/old").unlink()
    subprocess.run(["rm", "-rf", str(upper / "c"), str(upper / "e")], check=True)
    (upper / "e").write_bytes(b"e is a file")  # dir -> file
    (upper / "f").unlink()
    (upper / "f").mkdir()  # file -> dir
    (upper / "f/inner").write_bytes(b"inner")
    (upper / "keep/k").write_bytes(b"KKKK")  # same size, same whole-second mtime: contents decide
    os.utime(upper / "keep/k", ns=(T0 * 10**9, T0 * 10**9))
    os.chmod(upper / "b", 0o600)
    os.chown(upper / "x/y", 2000, 2000)
    os.link(upper / "u", upper / "u2")  # a new name for an unchanged file
    (upper / "link").unlink()
    os.symlink("/abs/target", upper / "s2")
    os.setxattr(upper / "x", "user.dir", b"2")
    os.setxattr(upper / "a/stay", "user.new", b"\x00\xff")
    os.mknod(upper / "dev/zero", 0o20666, os.makedev(1, 5))
    os.makedirs(upper / "n/m/o")
    (upper / "n/m/o/file").write_bytes(os.urandom(2 << 20))
    return lower, upper


def test_round_trip(trees: tuple[Path, Path], tmp_path: Path) -> None:
    lower, upper = trees
    data = diff(lower, upper)
    target = tmp_path / "target"
    cp(lower, target)
    apply(data, target)
    assert tree_view(target) == tree_view(upper)


def test_the_tar_holds_only_changes_and_their_parents(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    with tarfile.open(fileobj=io.BytesIO(diff(lower, upper))) as tf:
        members = {i.name: i for i in tf}
    # Sorted by tar name, so whiteouts sit among their siblings by their ".wh." names.
    assert list(members) == [
        ".wh.c",
        ".wh.link",
        "a",
        "a/.wh.old",
        "a/stay",
        "b",
        "dev",
        "dev/zero",
        "e",
        "f",
        "f/inner",
        "keep",
        "keep/k",
        "n",
        "n/m",
        "n/m/o",
        "n/m/o/file",
        "s2",
        "u",
        "u2",
        "x",
        "x/y",
    ]
    assert members["u2"].islnk() and members["u2"].linkname == "u"
    assert members["a/.wh.old"].size == 0 and members["a/.wh.old"].mtime == 0
    assert members["x"].pax_headers["SCHILY.xattr.user.dir"] == "2"
    assert members["dev/zero"].ischr() and (members["dev/zero"].devmajor, members["dev/zero"].devminor) == (
        1,
        5,
    )
    assert all(i.uname == "" and isinstance(i.mtime, int) for i in members.values())


def test_output_is_deterministic(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    assert diff(lower, upper) == diff(lower, upper)


def test_no_changes_gives_an_empty_layer(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    apply(BASE, lower)
    cp(lower, tmp_path / "same")
    with tarfile.open(fileobj=io.BytesIO(diff(lower, tmp_path / "same"))) as tf:
        assert tf.getnames() == []


def test_without_a_lower_everything_is_added(trees: tuple[Path, Path], tmp_path: Path) -> None:
    _, upper = trees
    target = tmp_path / "fresh"
    target.mkdir()
    apply(diff(None, upper), target)
    assert tree_view(target) == tree_view(upper)


def test_cancel(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Canceled):
        write_diff(io.BytesIO(), str(lower), str(upper), cancel=cancel)
