"""Layers on real overlayfs mounts: what apply puts in an upper dir is what the merged view shows,
and it is the same tree the native strategy builds; the upper-dir diff round-trips.

Needs root and overlayfs. Every mount is undone in a ``finally``.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyctr.api.errdefs import FailedPrecondition
from pyctr.snapshotter.layer import write_overlay_diff
from tests.unit.test_layer_apply import (
    EXPECTED_AFTER_TWO,
    LAYER1,
    LAYER2,
    T0,
    apply,
    layer,
    m,
    tree_view,
)


def _overlay_available() -> bool:
    if os.geteuid() != 0:
        return False
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


pytestmark = pytest.mark.skipif(not _overlay_available(), reason="needs root and overlayfs")


@contextmanager
def overlay(tmp_path: Path, lowers: list[Path], upper: Path, name: str = "merged") -> Iterator[Path]:
    """Mount lowers (top-most first) + upper, with the options containerd's snapshotter uses."""
    work, target = tmp_path / f"{name}.work", tmp_path / name
    work.mkdir()
    target.mkdir()
    lowerdir = ":".join(str(p) for p in lowers)
    options = f"index=off,lowerdir={lowerdir},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def dirs(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (tmp_path / name).mkdir()
        out.append(tmp_path / name)
    return out


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_two_layers_merged_view_equals_the_native_tree(tmp_path: Path) -> None:
    l1, upper, native = dirs(tmp_path, "l1", "upper", "native")
    apply(layer(*LAYER1), l1, overlay=True)
    apply(layer(*LAYER2), upper, overlay=True, parents=(str(l1),))

    # What overlayfs will read: whiteouts as char 0/0, an opaque directory by xattr.
    for name in ("b", "e", "link", "keep/absent"):
        assert is_whiteout(upper / name), name
    assert os.getxattr(upper / "a", "trusted.overlay.opaque") == b"y"
    assert (upper / "g").read_bytes() == b"g"  # a whiteout never hides its own layer's entry

    apply(layer(*LAYER1), native)
    apply(layer(*LAYER2), native)
    with overlay(tmp_path, [l1], upper) as merged:
        view = tree_view(merged, dir_mtimes=False)
        assert set(view) == EXPECTED_AFTER_TWO
        assert view == tree_view(native, dir_mtimes=False)
        assert (merged / "c").read_bytes() == b"c is a file now"  # dir -> file
        assert sorted(os.listdir(merged / "f")) == ["inner"]  # file -> dir
        assert sorted(os.listdir(merged / "a")) == ["new", "sub"]  # opaque, marker after entries
        assert sorted(os.listdir(merged / "a/sub")) == ["n"]


def test_every_member_type_through_the_mount(tmp_path: Path) -> None:
    l1, upper = dirs(tmp_path, "l1", "upper")
    apply(layer(m("base", data=b"base")), l1, overlay=True)
    apply(
        layer(
            m("d/", "dir", mode=0o750, uid=7, gid=8, mtime=T0 + 1),
            m("d/f", data=b"hello", mode=0o4755, uid=1000, gid=1000, xattrs={"user.k": b"v"}),
            m("d/h", "hardlink", link="d/f", mode=0o4755, uid=1000, gid=1000),
            m("d/s", "symlink", link="/etc/passwd"),
            m("d/null", "char", mode=0o666, dev=(1, 3)),
            m("d/fifo", "fifo"),
        ),
        upper,
        overlay=True,
        parents=(str(l1),),
    )
    with overlay(tmp_path, [l1], upper) as merged:
        view = tree_view(merged)
    assert view["d"][:3] == ("drwxr-x---", 7, 8) and view["d"][4] == T0 + 1
    assert view["d/f"][:3] == ("-rwsr-xr-x", 1000, 1000) and view["d/f"][5] == (("user.k", b"v"),)
    assert view["d/h"][6] == "d/f"
    assert view["d/s"][3] == "/etc/passwd"
    assert view["d/null"][:4] == ("crw-rw-rw-", 0, 0, (1, 3))
    assert view["d/fifo"][0] == "prw-r--r--"
    assert "base" in view


def test_missing_parents_inherit_the_lower_directory(tmp_path: Path) -> None:
    l1, upper = dirs(tmp_path, "l1", "upper")
    apply(layer(m("srv/", "dir", mode=0o751, uid=33, gid=33, mtime=T0 - 5), m("srv/old", data=b"o")), l1)
    apply(layer(m("srv/new", data=b"n")), upper, overlay=True, parents=(str(l1),))
    st = os.stat(upper / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)) == (0o751, 33, 33, T0 - 5)
    with overlay(tmp_path, [l1], upper) as merged:
        assert sorted(os.listdir(merged / "srv")) == ["new", "old"]


def test_a_directory_written_over_its_own_whiteout_hides_the_lower_one(tmp_path: Path) -> None:
    l1, upper, native = dirs(tmp_path, "l1", "upper", "native")
    base = layer(m("x/", "dir"), m("x/old", data=b"o"), m("y/", "dir"), m("y/old", data=b"o"))
    apply(base, l1)
    apply(base, native)
    second = layer(m(".wh.x"), m("x/", "dir"), m("x/new", data=b"n"), m(".wh.y"), m("y/new", data=b"n"))
    apply(second, upper, overlay=True, parents=(str(l1),))
    apply(second, native)
    with overlay(tmp_path, [l1], upper) as merged:
        assert tree_view(merged, dir_mtimes=False) == tree_view(native, dir_mtimes=False)
        assert os.listdir(merged / "x") == ["new"] and os.listdir(merged / "y") == ["new"]


def test_an_opaque_root_hides_the_lower_layers(tmp_path: Path) -> None:
    # overlayfs ignores the opaque xattr on the upper root; apply whites out the lower names instead.
    l1, l2, upper, native = dirs(tmp_path, "l1", "l2", "upper", "native")
    first = layer(m("etc/", "dir"), m("etc/old", data=b"o"), m("bin", data=b"b"))
    second = layer(m("usr/", "dir"), m("usr/lib", data=b"l"))
    apply(first, l1)
    apply(second, l2)
    apply(first, native)
    apply(second, native)
    top = layer(m("etc/", "dir"), m("etc/new", data=b"n"), m(".wh..wh..opq"), m("opt", data=b"o"))
    apply(top, upper, overlay=True, parents=(str(l2), str(l1)))
    apply(top, native)
    with overlay(tmp_path, [l2, l1], upper) as merged:
        assert sorted(os.listdir(merged)) == ["etc", "opt"]
        assert os.listdir(merged / "etc") == ["new"]
        assert tree_view(merged, dir_mtimes=False) == tree_view(native, dir_mtimes=False)


def test_upper_dir_diff_round_trips(tmp_path: Path) -> None:
    l1, upper = dirs(tmp_path, "l1", "upper")
    apply(
        layer(
            m("a/", "dir"),
            m("a/old", data=b"old"),
            m("a/stay", data=b"stay"),
            m("c/", "dir"),
            m("c/x", data=b"x"),
            m("r/", "dir"),
            m("r/gone", data=b"gone"),
            m("b", data=b"b"),
            m("u", data=b"unchanged"),
            m("x/", "dir", xattrs={"user.dir": b"1"}),
            m("x/y", data=b"y"),
        ),
        l1,
    )
    with overlay(tmp_path, [l1], upper) as merged:
        (merged / "a/old").unlink()
        subprocess.run(["rm", "-rf", str(merged / "c")], check=True)
        subprocess.run(["rm", "-rf", str(merged / "r")], check=True)
        (merged / "r").mkdir()  # overlayfs makes this directory opaque
        (merged / "r/fresh").write_bytes(b"fresh")
        (merged / "b").write_bytes(b"changed b")
        os.chmod(merged / "a/stay", 0o600)
        os.chown(merged / "x/y", 1000, 1000)
        os.link(merged / "u", merged / "u2")
        os.symlink("../u", merged / "a/s")
        os.setxattr(merged / "x", "user.dir", b"2")
        os.mknod(merged / "null", 0o20666, os.makedev(1, 3))
        os.makedirs(merged / "n/m")
        (merged / "n/m/f").write_bytes(os.urandom(1 << 20))
        expected = tree_view(merged, dir_mtimes=False)

    assert os.getxattr(upper / "r", "trusted.overlay.opaque") == b"y"
    out = io.BytesIO()
    result = write_overlay_diff(out, str(upper))
    data = out.getvalue()
    assert result.size == len(data)
    assert b".wh..wh..opq" in data and b"a/.wh.old" in data and b".wh.c" in data

    # Native: the layer on a copy of the lower tree.
    native = tmp_path / "native"
    subprocess.run(["cp", "-a", str(l1), str(native)], check=True)
    apply(data, native)
    assert tree_view(native, dir_mtimes=False) == expected

    # Overlay: the layer into a fresh upper dir over the same lower.
    upper2 = dirs(tmp_path, "upper2")[0]
    apply(data, upper2, overlay=True, parents=(str(l1),))
    with overlay(tmp_path, [l1], upper2, name="merged2") as merged2:
        assert tree_view(merged2, dir_mtimes=False) == expected

    again = io.BytesIO()
    write_overlay_diff(again, str(upper))
    assert again.getvalue() == data


def test_upper_dirs_that_need_their_lowers_are_refused(tmp_path: Path) -> None:
    upper = dirs(tmp_path, "upper")[0]
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(FailedPrecondition):
        write_overlay_diff(io.BytesIO(), str(upper))


def test_an_opaque_upper_root_becomes_the_first_member(tmp_path: Path) -> None:
    upper = dirs(tmp_path, "upper")[0]
    os.setxattr(upper, "trusted.overlay.opaque", b"y")
    (upper / "-first").write_bytes(b"x")
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))
    out = io.BytesIO()
    write_overlay_diff(out, str(upper))
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert tf.getnames() == [".wh..wh..opq", "-first", ".wh.gone"]
