"""Layer apply on a real filesystem: members, whiteouts, two-layer stacks, and escape attempts.

Needs root (chown, mknod). The tar builders and ``tree_view`` here are shared with
``test_layer_diff.py`` and ``tests/conformance/test_layer_overlay.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pyctr.api.errdefs import Canceled, InvalidArgument
from pyctr.snapshotter.layer import ApplyResult, Compression, Compressor, apply_layer, open_decompressed, plan

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layer apply tests need root (chown, mknod)")

T0 = 1_600_000_000
Member = tuple[tarfile.TarInfo, bytes]


# -- building layers


def m(
    name: str,
    kind: str = "file",
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    mtime: int = T0,
    link: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, bytes] | None = None,
) -> Member:
    types = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "char": tarfile.CHRTYPE,
        "block": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    info = tarfile.TarInfo(name)
    info.type = types[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.uid, info.gid, info.mtime, info.linkname = uid, gid, mtime, link
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == "file" else 0
    if xattrs:
        info.pax_headers = {
            plan.PAX_XATTR + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return info, data


def layer(*members: Member) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def apply(data: bytes, root: Path, *, overlay: bool = False, parents: tuple[str, ...] = ()) -> ApplyResult:
    return apply_layer(io.BytesIO(data), str(root), overlay=overlay, parents=parents)


# -- looking at trees


def tree_view(root: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything an image user can see of a tree: type, mode, owner, contents, mtime (seconds),
    device numbers, exported xattrs, and which names in the tree share an inode (by the first
    name; st_nlink itself differs between an overlay mount and a plain tree)."""
    view: dict[str, list[object]] = {}
    names: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    body: object = hashlib.sha256(f.read()).hexdigest()[:12]
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                body = None
            is_dir = stat.S_ISDIR(st.st_mode)
            if not is_dir:
                names.setdefault((st.st_dev, st.st_ino), []).append(rel)
            xattrs = tuple(
                (k, os.getxattr(full, k, follow_symlinks=False))
                for k in sorted(os.listxattr(full, follow_symlinks=False))
                if plan.xattr_exported(k)
            )
            mtime = None if is_dir and not dir_mtimes else st.st_mtime_ns // 10**9
            view[rel] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, body, mtime, xattrs, None]
    for group in names.values():
        if len(group) > 1:
            for rel in group:
                view[rel][6] = min(group)
    return {rel: tuple(v) for rel, v in view.items()}


def fs_state(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every detail of ``top`` outside ``skip``: what an escape would change."""
    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [".", *dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            body = Path(full).read_bytes() if stat.S_ISREG(st.st_mode) else None
            xattrs = sorted(os.listxattr(full, follow_symlinks=False))
            state[os.path.relpath(full, top)] = (
                st.st_mode,
                st.st_uid,
                st.st_nlink,
                st.st_mtime_ns,
                body,
                xattrs,
            )
    return state


# -- one layer


def test_every_member_type_with_its_metadata(tmp_path: Path) -> None:
    data = layer(
        m("d/", "dir", mode=0o750, uid=7, gid=8, mtime=T0 + 1),
        m("d/f", "file", b"hello", mode=0o4755, uid=1000, gid=1000, xattrs={"user.k": b"v\xff\x00"}),
        m("d/h", "hardlink", link="d/f", mode=0o4755, uid=1000, gid=1000),
        m("d/s", "symlink", link="../../outside", uid=5, gid=5, mtime=T0 + 2),
        m("d/dangling", "symlink", link="nowhere"),
        m("dev/", "dir"),
        m("dev/null", "char", mode=0o666, dev=(1, 3)),
        m("dev/loop0", "block", mode=0o660, dev=(7, 0)),
        m("dev/fifo", "fifo", mode=0o600),
        m("x/", "dir", xattrs={"user.dir": b"1"}),
        m("x/big", "file", os.urandom(3 << 20)),
    )
    root = tmp_path / "root"
    root.mkdir()
    result = apply(data, root)
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (result.size, result.entries, result.skipped) == (len(data), 11, ())

    view = tree_view(root)
    assert view["d"][:3] == ("drwxr-x---", 7, 8) and view["d"][4] == T0 + 1  # dir mtime set last
    assert view["d/f"][:3] == ("-rwsr-xr-x", 1000, 1000)  # setuid survives the chown
    assert view["d/f"][5] == (("user.k", b"v\xff\x00"),)
    assert view["d/h"][6] == view["d/f"][6] == "d/f"
    assert view["d/s"][:5] == ("lrwxrwxrwx", 5, 5, "../../outside", T0 + 2)
    assert view["dev/null"][:4] == ("crw-rw-rw-", 0, 0, (1, 3))
    assert view["dev/loop0"][:4] == ("brw-rw----", 0, 0, (7, 0))
    assert view["dev/fifo"][0] == "prw-------"
    assert view["x"][5] == (("user.dir", b"1"),)
    assert (root / "x/big").stat().st_size == 3 << 20


def test_parent_directories_are_created_when_the_layer_lacks_them(tmp_path: Path) -> None:
    apply(layer(m("a/b/c/f", data=b"x")), tmp_path)
    assert stat.S_IMODE((tmp_path / "a/b").stat().st_mode) == 0o755
    assert (tmp_path / "a/b/c/f").read_bytes() == b"x"


def test_nanosecond_mtimes_from_pax(tmp_path: Path) -> None:
    info, _ = m("f")
    info.pax_headers = {"mtime": "1600000000.123456789"}
    apply(layer((info, b"")), tmp_path)
    assert (tmp_path / "f").stat().st_mtime_ns == 1_600_000_000_123_456_789


def test_trusted_xattrs_are_refused_and_reported(tmp_path: Path) -> None:
    result = apply(layer(m("d/", "dir", xattrs={"trusted.overlay.opaque": b"y", "user.ok": b"1"})), tmp_path)
    assert os.listxattr(tmp_path / "d") == ["user.ok"]
    assert result.skipped == ("d: xattr trusted.overlay.opaque refused",)


def test_aufs_metadata_and_the_root_entry_are_skipped(tmp_path: Path) -> None:
    data = layer(
        m("./", "dir", mode=0o700), m(".wh..wh.plnk/", "dir"), m(".wh..wh.plnk/1.2", data=b"x"), m("f")
    )
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    result = apply(data, root)
    assert sorted(os.listdir(root)) == ["f"] and len(result.skipped) == 3
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


# -- streams


def test_empty_layers(tmp_path: Path) -> None:
    for data in (b"", b"\0" * 1024, layer()):
        result = apply(data, tmp_path)
        assert (result.entries, result.size) == (0, len(data))
        assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert os.listdir(tmp_path) == []


def test_trailing_bytes_count_in_the_digest(tmp_path: Path) -> None:
    data = layer(m("f", data=b"x")) + b"\0" * 4096
    result = apply(data, tmp_path)
    assert result.size == len(data) and result.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_bad_header_after_the_first_is_an_error(tmp_path: Path) -> None:
    good = layer(m("a", data=b"x"))
    corrupt = good[:1024] + b"garbage!" * 64 + good[1024:]
    with pytest.raises(InvalidArgument):
        apply(corrupt, tmp_path)


def test_a_stream_cut_inside_a_member_is_an_error(tmp_path: Path) -> None:
    data = layer(m("big", data=os.urandom(100_000)))
    with pytest.raises(InvalidArgument):
        apply(data[:50_000], tmp_path)


@pytest.mark.parametrize("c", [Compression.GZIP, Compression.ZSTD])
def test_compressed_layers_give_the_uncompressed_digest(tmp_path: Path, c: Compression) -> None:
    data = layer(m("d/", "dir"), m("d/f", data=os.urandom(200_000)))
    blob = io.BytesIO()
    with Compressor(blob, c) as w:
        w.write(data)
    blob.seek(0)
    result = apply_layer(open_decompressed(blob), str(tmp_path), overlay=False)
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_cancel(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Canceled):
        apply_layer(io.BytesIO(layer(m("f"))), str(tmp_path), overlay=False, cancel=cancel)


# -- two layers on the native snapshotter

LAYER1 = (
    m("a/", "dir"),
    m("a/old", data=b"old"),
    m("a/sub/", "dir"),
    m("a/sub/deep", data=b"deep"),
    m("b", data=b"b"),
    m("c/", "dir"),
    m("c/x", data=b"x"),
    m("e/", "dir", mode=0o700),
    m("e/f", data=b"f"),
    m("f", data=b"file"),
    m("keep/", "dir"),
    m("keep/k", data=b"k"),
    m("link", "symlink", link="keep/k"),
    m("h1", data=b"shared", mode=0o600),
    m("h2", "hardlink", link="h1", mode=0o600),
)
LAYER2 = (
    m(".wh.b"),  # whiteout of a file
    m(".wh.e"),  # whiteout of a directory
    m("a/", "dir", mode=0o711),
    m("a/new", data=b"new"),
    m("a/sub/n", data=b"n"),  # a/sub itself is not in the layer
    m("a/.wh..wh..opq"),  # after the entries it must keep
    m("c", data=b"c is a file now"),  # dir -> file
    m("f/", "dir"),  # file -> dir
    m("f/inner", data=b"inner"),
    m("g", data=b"g"),
    m(".wh.g"),  # a whiteout never removes what its own layer wrote
    m(".wh.link"),
    m("keep/.wh.absent"),  # nothing to delete: fine
    m("h1", data=b"changed", mode=0o600),  # replaces h1's inode; h2 keeps the old one
)
EXPECTED_AFTER_TWO = {
    "a",
    "a/new",
    "a/sub",
    "a/sub/n",
    "c",
    "f",
    "f/inner",
    "g",
    "h1",
    "h2",
    "keep",
    "keep/k",
}


def test_two_layers_native(tmp_path: Path) -> None:
    apply(layer(*LAYER1), tmp_path)
    apply(layer(*LAYER2), tmp_path)
    view = tree_view(tmp_path)
    assert set(view) == EXPECTED_AFTER_TWO
    assert view["a"][0] == "drwx--x--x"
    assert (tmp_path / "c").read_bytes() == b"c is a file now"
    assert (tmp_path / "f/inner").read_bytes() == b"inner"
    assert (tmp_path / "h1").read_bytes() == b"changed" and (tmp_path / "h2").read_bytes() == b"shared"


def test_opaque_root(tmp_path: Path) -> None:
    apply(layer(*LAYER1), tmp_path)
    apply(layer(m("new", data=b"n"), m(".wh..wh..opq")), tmp_path)
    assert os.listdir(tmp_path) == ["new"]


# -- escape attempts: each fails or stays inside the root, and nothing outside changes


@pytest.fixture
def jail(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "r1" / "r2" / "root"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.chmod(outside, 0o700)
    return root, outside


def _rel(p: Path) -> str:
    return str(p).lstrip("/")


Case = Callable[[Path, Path], tuple[list[Member], str | None]]  # (root, outside) -> (members, landing)


def _plant(root: Path, name: str, target: str) -> None:
    os.symlink(target, root / name)


CASES: dict[str, Case] = {
    "dotdot": lambda r, o: ([m("../../../outside/pwned", data=b"x")], None),
    "dotdot-inside-name": lambda r, o: ([m("a/../../../../outside/pwned", data=b"x")], None),
    "absolute-etc": lambda r, o: ([m("/etc/x", data=b"x")], "etc/x"),
    "absolute-outside": lambda r, o: ([m(f"{o}/pwned", data=b"x")], f"{_rel(o)}/pwned"),
    "symlink-parent": lambda r, o: (
        [m("evil", "symlink", link=str(o)), m("evil/pwned", data=b"x")],
        f"{_rel(o)}/pwned",
    ),
    "symlink-chain": lambda r, o: (
        [
            m("l1", "symlink", link="l2/."),
            m("l2", "symlink", link="../../../../../../.." + str(o)),
            m("l1/pwned", data=b"x"),
        ],
        f"{_rel(o)}/pwned",
    ),
    "relative-climb": lambda r, o: (
        [m("up", "symlink", link="../../.."), m("up/outside/pwned", data=b"x")],
        "outside/pwned",
    ),
    "planted-lower-symlink": lambda r, o: (
        _plant(r, "planted", "../../../outside") or [m("planted/pwned", data=b"x")],
        "outside/pwned",
    ),
    "write-over-symlink": lambda r, o: (
        _plant(r, "victim", f"{o}/secret") or [m("victim", data=b"overwritten")],
        "victim",
    ),
    "dir-over-symlink": lambda r, o: (_plant(r, "d", str(o)) or [m("d/", "dir", mode=0o777)], "d"),
    "hardlink-dotdot": lambda r, o: ([m("h", "hardlink", link="../../../outside/secret")], None),
    "hardlink-absolute": lambda r, o: ([m("h", "hardlink", link=f"{o}/secret")], None),
    "hardlink-through-symlink": lambda r, o: (
        [m("evil", "symlink", link=str(o)), m("h", "hardlink", link="evil/secret")],
        None,
    ),
    "hardlink-through-planted": lambda r, o: (
        _plant(r, "up", "../../..") or [m("h", "hardlink", link="up/outside/secret")],
        None,
    ),
    "hardlink-to-symlink-then-chmod": lambda r, o: (
        [m("s", "symlink", link=f"{o}/secret"), m("h", "hardlink", link="s", mode=0o777)],
        "h",
    ),
    "whiteout-dotdot": lambda r, o: ([m("../.wh.outside")], None),
    "whiteout-dots": lambda r, o: ([m(".wh...")], None),
    "whiteout-through-symlink": lambda r, o: (
        [m("evil", "symlink", link=str(o)), m("evil/.wh.secret")],
        "",
    ),
    "whiteout-through-planted": lambda r, o: (
        _plant(r, "up", "../../..") or [m("up/outside/.wh.secret")],
        "",
    ),
    "opaque-through-planted": lambda r, o: (
        _plant(r, "up", "../../..") or [m("up/outside/.wh..wh..opq")],
        "",
    ),
    "symlink-loop": lambda r, o: ([m("loop", "symlink", link="loop"), m("loop/x")], None),
}


@pytest.mark.parametrize("overlay", [False, True], ids=["native", "overlay"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_escape_attempts(jail: tuple[Path, Path], tmp_path: Path, case: str, overlay: bool) -> None:
    root, outside = jail
    members, landing = CASES[case](root, outside)
    before = fs_state(tmp_path, skip=root)
    if landing is None:
        with pytest.raises(InvalidArgument):
            apply(layer(*members), root, overlay=overlay)
    else:
        apply(layer(*members), root, overlay=overlay)
        if landing:
            assert os.path.lexists(root / landing)
    assert fs_state(tmp_path, skip=root) == before
    # Whatever happened inside the root, nothing in it leads outside except the symlinks.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath, name)
            if not full.is_symlink():
                assert os.stat(full).st_ino != os.stat(outside / "secret").st_ino
