"""The layer planner: pure classification of tar members, and the no-escape property."""

from __future__ import annotations

import posixpath
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.snapshotter.layer import plan


def member(name: str, type: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b", "a/b"),
        ("./a/./b/", "a/b"),
        ("/etc/x", "etc/x"),
        ("//a//b", "a/b"),
        ("a/../b", "b"),
        (".", ""),
        ("/", ""),
        ("..", None),
        ("../../etc/x", None),
        ("a/../../x", None),
        ("/../x", None),
        ("a\x00b", None),
    ],
)
def test_clean_path(name: str, expected: str | None) -> None:
    assert plan.clean_path(name) == expected


def test_regular_members_become_writes_with_their_metadata() -> None:
    info = member("./usr/bin/x", mode=0o104755, uid=1000, gid=2000, mtime=1_600_000_000, size=5)
    info.pax_headers = {"SCHILY.xattr.user.k": "v\udcff", "mtime": "1600000000.123456789"}
    action = plan.plan_member(info)
    assert isinstance(action, plan.Write)
    assert action.path == "usr/bin/x"
    e = action.entry
    assert (e.kind, e.mode, e.uid, e.gid, e.size) == (plan.Kind.FILE, 0o4755, 1000, 2000, 5)
    assert e.mtime_ns == 1_600_000_000_123_456_789 == e.atime_ns
    assert e.xattrs == (("user.k", b"v\xff"),)  # surrogateescape gives the raw bytes back


@pytest.mark.parametrize(
    ("type", "kind"),
    [
        (tarfile.DIRTYPE, plan.Kind.DIR),
        (tarfile.SYMTYPE, plan.Kind.SYMLINK),
        (tarfile.CHRTYPE, plan.Kind.CHAR),
        (tarfile.BLKTYPE, plan.Kind.BLOCK),
        (tarfile.FIFOTYPE, plan.Kind.FIFO),
        (tarfile.CONTTYPE, plan.Kind.FILE),
    ],
)
def test_member_types(type: bytes, kind: plan.Kind) -> None:
    action = plan.plan_member(member("x", type, linkname="t", devmajor=1, devminor=3))
    assert isinstance(action, plan.Write) and action.entry.kind is kind


def test_atime_is_the_later_of_atime_and_mtime_and_times_out_of_range_become_zero() -> None:
    info = member("x", mtime=100)
    info.pax_headers = {"atime": "50.5"}
    action = plan.plan_member(info)
    assert isinstance(action, plan.Write)
    assert action.entry.atime_ns == action.entry.mtime_ns == 100 * 10**9
    info.pax_headers = {"mtime": "-5.25"}
    action = plan.plan_member(info)
    assert isinstance(action, plan.Write) and action.entry.mtime_ns == 0


def test_whiteouts_and_opaque_markers() -> None:
    assert plan.plan_member(member("a/b/.wh.c", uid=5, gid=6)) == plan.Whiteout("a/b/c", 5, 6)
    assert plan.plan_member(member(".wh.top")) == plan.Whiteout("top")
    assert plan.plan_member(member("a/.wh..wh..opq")) == plan.Opaque("a")
    assert plan.plan_member(member(".wh..wh..opq")) == plan.Opaque("")
    assert plan.plan_member(member("./.wh..wh..opq")) == plan.Opaque("")


@pytest.mark.parametrize("name", [".wh..wh.plnk", ".wh..wh.aufs", "a/.wh..wh.orph", ".wh..wh.plnk/123.456"])
def test_aufs_metadata_is_skipped(name: str) -> None:
    assert isinstance(plan.plan_member(member(name)), plan.Skip)


@pytest.mark.parametrize(
    "name",
    ["../.wh.x", ".wh.", ".wh..", ".wh...", "a/.wh.", "/../.wh.x", ".wh.dir/x", "a\x00/x", "../../etc/x"],
)
def test_bad_names_are_rejected(name: str) -> None:
    assert isinstance(plan.plan_member(member(name)), plan.Reject)


def test_root_is_skipped() -> None:
    assert isinstance(plan.plan_member(member("./", tarfile.DIRTYPE)), plan.Skip)
    assert isinstance(plan.plan_member(member("/", tarfile.DIRTYPE)), plan.Skip)


def test_links() -> None:
    action = plan.plan_member(member("a/h", tarfile.LNKTYPE, linkname="/usr/./bin/x"))
    assert isinstance(action, plan.Write) and action.entry.linkname == "usr/bin/x"
    symlink = plan.plan_member(member("a/s", tarfile.SYMTYPE, linkname="../../../etc/passwd"))
    assert isinstance(symlink, plan.Write) and symlink.entry.linkname == "../../../etc/passwd"
    for target in ("../../outside", "a/../..", "", "/", "a/h", "x\x00y"):
        assert isinstance(plan.plan_member(member("a/h", tarfile.LNKTYPE, linkname=target)), plan.Reject)
    assert isinstance(plan.plan_member(member("s", tarfile.SYMTYPE, linkname="")), plan.Reject)


def test_unknown_types_and_bad_ids_are_rejected() -> None:
    assert isinstance(plan.plan_member(member("x", b"V")), plan.Reject)
    assert isinstance(plan.plan_member(member("x", uid=-1)), plan.Reject)
    assert isinstance(plan.plan_member(member("x", gid=1 << 32)), plan.Reject)


def test_xattr_policies() -> None:
    assert not plan.xattr_applied("trusted.overlay.opaque")
    assert plan.xattr_applied("security.capability") and plan.xattr_applied("user.x")
    assert not plan.xattr_exported("trusted.overlay.origin")
    assert not plan.xattr_exported("user.overlay.opaque")
    assert not plan.xattr_exported("security.selinux")
    assert plan.xattr_exported("security.capability") and plan.xattr_exported("user.mime")


# -- the property: nothing the planner emits can name a place outside the root

_PIECES = ["a", "b", ".", "..", "", ".wh.", ".wh.a", ".wh..", ".wh..wh..opq", ".wh..wh.plnk", "\x00", "é"]
_names = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=8).map("/".join),
    st.lists(st.sampled_from(_PIECES), max_size=8).map(lambda p: "/" + "/".join(p)),
    st.text(alphabet=st.sampled_from("ab./\x00w h"), max_size=24),
    st.text(max_size=24),
)
_types = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.FIFOTYPE,
        b"V",
    ]
)


def _inside(path: str) -> bool:
    if path == "":
        return True
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\x00" in path:
        return False
    return posixpath.normpath(posixpath.join("/root", path)).startswith("/root/")


@settings(max_examples=400, deadline=None)
@given(name=_names, type=_types, linkname=_names)
def test_no_action_escapes_the_root(name: str, type: bytes, linkname: str) -> None:
    action = plan.plan_member(member(name, type, linkname=linkname))
    if isinstance(action, plan.Write):
        assert action.path != "" and _inside(action.path)
        base = action.path.rsplit("/", 1)[-1]
        assert not base.startswith(plan.WHITEOUT_PREFIX)
        if action.entry.kind is plan.Kind.HARDLINK:
            assert action.entry.linkname != "" and _inside(action.entry.linkname)
    elif isinstance(action, plan.Whiteout):
        assert action.path != "" and _inside(action.path)
    elif isinstance(action, plan.Opaque):
        assert _inside(action.path)
    else:
        assert isinstance(action, plan.Skip | plan.Reject)


@given(name=_names)
def test_clean_path_is_idempotent(name: str) -> None:
    cleaned = plan.clean_path(name)
    if cleaned is not None:
        assert plan.clean_path(cleaned) == cleaned and _inside(cleaned)
