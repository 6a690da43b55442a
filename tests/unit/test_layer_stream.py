"""The fast paths of layer apply give what the slow ones gave: headers decoded as tarfile decodes
them, every tar dialect applied alike, owners and modes exact whatever the umask, a setgid parent
or a default ACL would give a new file, and the read-ahead thread gone however apply ends.

Needs root (chown, mknod), like ``test_layer_apply.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api.errdefs import DataLoss, InvalidArgument
from pyctr.snapshotter.layer import Compression, Compressor, apply_layer, open_decompressed, plan
from pyctr.snapshotter.layer.apply import _byte_sum, _StrictTarInfo
from tests.unit.test_layer_apply import T0, apply, layer, m, tree_view

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layer apply tests need root (chown, mknod)")

_FIELDS = (
    "name",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "chksum",
    "type",
    "linkname",
    "uname",
    "gname",
    "devmajor",
    "devminor",
    "offset",
    "offset_data",
    "pax_headers",
    "sparse",
)
_NUMBER_FIELDS = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12)}


def _decode(cls: type[tarfile.TarInfo], block: bytes) -> tuple[str, Any]:
    try:
        info = cls.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return "error", type(e).__name__
    return "ok", {f: getattr(info, f) for f in _FIELDS} | {
        "sparse_structs": getattr(info, "_sparse_structs", None)
    }


def _with_checksum(block: bytearray, signed: bool = False) -> bytes:
    block[148:156] = b"        "
    total = sum(struct.unpack("512b", block)) if signed else sum(block)
    block[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(block)


def _assert_same_decoding(block: bytes) -> None:
    assert _decode(_StrictTarInfo, block) == _decode(tarfile.TarInfo, block)


_TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]
_TYPES += [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"V", b"x"]
_names = st.text(st.characters(blacklist_characters="\x00"), max_size=120)
_numbers = st.one_of(st.integers(0, 0o7777777), st.integers(0, 2**40), st.integers(-(2**20), -1))


@settings(max_examples=300, deadline=None)
@given(
    name=_names,
    linkname=_names,
    uname=st.text(max_size=40),
    mode=st.integers(0, 0o7777),
    uid=_numbers,
    gid=_numbers,
    size=st.integers(0, 2**36),
    mtime=st.one_of(st.integers(-(2**33), 2**40), st.floats(0, 2**33, allow_nan=False)),
    type=st.sampled_from(_TYPES),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_every_header_block_decodes_as_tarfile_decodes_it(
    name: str, linkname: str, uname: str, mode: int, uid: int, gid: int, size: int, mtime: float,
    type: bytes, fmt: int,
) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.linkname, info.uname, info.mode, info.uid, info.gid = linkname, uname, mode, uid, gid
    info.size, info.mtime, info.type = size, mtime, type
    try:
        buf = info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:
        return  # not representable in this format
    for i in range(0, len(buf), tarfile.BLOCKSIZE):  # the member's header and any extended ones
        _assert_same_decoding(buf[i : i + tarfile.BLOCKSIZE])


@pytest.mark.parametrize(
    "value",
    [
        b"0000644\0",
        b"0000644 ",
        b" 644    ",
        b"   644\0\0",
        b"\0\0\0\0\0\0\0\0",
        b"        ",
        b"644\0abc\0",
        b"644 \0xyz",
        b"+644\0\0\0\0",
        b"-17\0\0\0\0\0",
        b"6_44\0\0\0\0",
        b"\x1c644\0\0\0\0",
        b"644\x1c\0\0\0\0",
        b"\t644\n\0\0\0",
        b"0008\0\0\0\0",
        b"x\0\0\0\0\0\0\0",
        b"\x80\0\0\0\0\0\x01\x02",
        b"\xff\xff\xff\xff\xff\xff\xff\xfe",
        b"\x81\0\0\0\0\0\0\0",
        "٣".encode() + b"\0\0\0\0\0\0",
    ],
)
@pytest.mark.parametrize("field", sorted(_NUMBER_FIELDS))
@pytest.mark.parametrize("signed", [False, True])
def test_odd_number_fields_decode_as_tarfile_decodes_them(value: bytes, field: str, signed: bool) -> None:
    info = tarfile.TarInfo("f")
    info.uname = "é"  # a byte with the high bit set: the signed and unsigned sums differ
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    offset, width = _NUMBER_FIELDS[field]
    block[offset : offset + width] = value.ljust(width, b"\0")[:width]
    _assert_same_decoding(_with_checksum(block, signed))


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=512, max_size=512), signed=st.booleans())
def test_arbitrary_blocks_decode_as_tarfile_decodes_them(body: bytes, signed: bool) -> None:
    _assert_same_decoding(body)
    _assert_same_decoding(_with_checksum(bytearray(body), signed))


@given(block=st.binary(min_size=512, max_size=512))
def test_the_byte_sum_of_a_block(block: bytes) -> None:
    assert _byte_sum(block) == sum(block)
    assert _byte_sum(b"\xff" * 512) == 255 * 512


def test_a_prefix_field_and_the_end_block() -> None:
    info = tarfile.TarInfo("p" * 120 + "/" + "n" * 90)  # too long for name alone: ustar prefix
    block = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    _assert_same_decoding(block)
    assert _StrictTarInfo.frombuf(block, "utf-8", "surrogateescape").name == info.name
    _assert_same_decoding(b"\0" * 512)
    _assert_same_decoding(block[:300])


# -- whole layers in every dialect


def _sparse_tars(tmp_path: Path) -> dict[str, bytes]:
    """GNU tar's sparse encodings of one file with holes: old GNU and PAX 0.0, 0.1 and 1.0."""
    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        for i in range(4):
            f.seek(i * 300_000)
            f.write(bytes([65 + i]) * 5000)
        f.truncate(1_500_000)
    os.utime(src / "holes", (T0, T0))
    out = {}
    for label, args in {
        "gnu": ["--format=gnu"],
        "pax-0.0": ["--format=posix", "--sparse-version=0.0"],
        "pax-0.1": ["--format=posix", "--sparse-version=0.1"],
        "pax-1.0": ["--format=posix", "--sparse-version=1.0"],
    }.items():
        res = subprocess.run(
            ["tar", "--sparse", *args, "-C", str(src), "-cf", "-", "holes"], capture_output=True, check=True
        )
        out[label] = res.stdout
    return out


def _dialect_layer(fmt: int) -> bytes:
    long = "deep/" + "/".join(["segment-of-a-long-path"] * 8)
    members = [
        m("deep/", "dir"),
        m(long + "/", "dir", mode=0o750),
        m(long + "/file", data=b"long name", uid=1000, gid=1000),
        m("deep/link", "symlink", link=long + "/file"),
        m("deep/hard", "hardlink", link=long + "/file", uid=1000, gid=1000),
        m("deep/dev", "char", dev=(1, 3), mode=0o666),
        m("big-ids", data=b"x", uid=2**22, gid=2**22 + 1),
        m("old", data=b"y", mtime=0),
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def test_every_tar_dialect_gives_the_same_tree(tmp_path: Path) -> None:
    views = {}
    for label, fmt in {"ustar-gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}.items():
        root = tmp_path / label
        root.mkdir()
        apply(_dialect_layer(fmt), root)
        views[label] = tree_view(root)
    assert views["ustar-gnu"] == views["pax"]
    view = views["pax"]
    long = "deep/" + "/".join(["segment-of-a-long-path"] * 8)
    assert view[long + "/file"][:3] == ("-rw-r--r--", 1000, 1000)
    assert view["deep/hard"][6] == view[long + "/file"][6]
    assert view["big-ids"][1:3] == (2**22, 2**22 + 1)
    assert view["old"][4] == 0


def test_sparse_files_in_every_encoding(tmp_path: Path) -> None:
    tars = _sparse_tars(tmp_path)
    original = (tmp_path / "sparse-src" / "holes").read_bytes()
    for label, data in tars.items():
        root = tmp_path / label
        root.mkdir()
        result = apply(data, root)
        assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest(), label
        assert (root / "holes").read_bytes() == original, label
        assert (root / "holes").stat().st_mtime == T0, label


# -- owners and modes, whatever a new inode would get by default


def test_modes_are_exact_under_any_umask(tmp_path: Path) -> None:
    data = layer(
        m("d/", "dir", mode=0o777),
        m("d/f", data=b"f", mode=0o666),
        m("d/x", data=b"x", mode=0o4711),
        m("d/s", "symlink", link="f"),
        m("d/p", "fifo", mode=0o622),
        m("d/sticky/", "dir", mode=0o1777),
    )
    for mask in (0o022, 0o077, 0o777, 0):
        root = tmp_path / f"umask-{mask:o}"
        root.mkdir()
        old = os.umask(mask)
        try:
            apply(data, root)
        finally:
            os.umask(old)
        view = tree_view(root)
        assert view["d"][0] == "drwxrwxrwx"
        assert view["d/f"][0] == "-rw-rw-rw-"
        assert view["d/x"][0] == "-rws--x--x"
        assert view["d/p"][0] == "prw--w--w-"
        assert view["d/sticky"][0] == "drwxrwxrwt"


def test_a_setgid_parent_does_not_lend_its_group(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "shared").mkdir(parents=True)
    os.chown(root / "shared", 0, 4242)
    os.chmod(root / "shared", 0o2775)
    apply(
        layer(
            m("shared/f", data=b"f", uid=0, gid=0),
            m("shared/d/", "dir", mode=0o755),
            m("shared/s", "symlink", link="f"),
            m("shared/n", "char", dev=(1, 3)),
        ),
        root,
    )
    for name in ("f", "d", "s", "n"):
        st_ = os.lstat(root / "shared" / name)
        assert (st_.st_uid, st_.st_gid) == (0, 0), name
    assert stat.S_IMODE(os.lstat(root / "shared" / "d").st_mode) == 0o755  # no inherited setgid


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries
    )


def test_a_default_acl_does_not_change_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "acl").mkdir(parents=True)
    user_obj, group_obj, other, undefined = 0x01, 0x04, 0x20, 0xFFFFFFFF
    try:
        os.setxattr(
            root / "acl",
            "system.posix_acl_default",
            _acl([(user_obj, 6, undefined), (group_obj, 0, undefined), (other, 0, undefined)]),
        )
    except OSError as e:
        pytest.skip(f"no POSIX ACLs here: {e}")
    apply(layer(m("acl/f", data=b"f", mode=0o755), m("acl/d/", "dir", mode=0o775)), root)
    assert stat.S_IMODE(os.lstat(root / "acl" / "f").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(root / "acl" / "d").st_mode) == 0o775


def test_a_hardlink_header_still_clears_capabilities_it_does_not_carry(tmp_path: Path) -> None:
    cap = b"\x01\x00\x00\x02" + b"\x00" * 16  # VFS_CAP_REVISION_2, no capabilities
    data = layer(
        m("f", data=b"x", mode=0o755, xattrs={"security.capability": cap}),
        m("h", "hardlink", link="f", mode=0o755),
    )
    apply(data, tmp_path)
    assert "security.capability" not in os.listxattr(tmp_path / "f")  # as a chown by the link does


# -- the read-ahead thread


def _layer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layer-read"]


def test_a_cut_compressed_stream_is_data_loss_and_leaves_no_thread(tmp_path: Path) -> None:
    data = layer(m("d/", "dir"), *(m(f"d/f{i}", data=os.urandom(50_000)) for i in range(40)))
    blob = io.BytesIO()
    with Compressor(blob, Compression.GZIP) as w:
        w.write(data)
    cut = blob.getvalue()[: len(blob.getvalue()) // 2]
    with pytest.raises(DataLoss):
        apply_layer(open_decompressed(io.BytesIO(cut)), str(tmp_path), overlay=False)
    assert _layer_threads() == []


def test_an_invalid_layer_stops_the_reader_wherever_it_is(tmp_path: Path) -> None:
    big = os.urandom(8 << 20)  # several read-ahead chunks behind the bad member
    data = layer(m("../escape", data=b"x"), m("big", data=big))
    with pytest.raises(InvalidArgument):
        apply(data, tmp_path)
    assert _layer_threads() == []
    assert os.listdir(tmp_path) == []


def test_a_failing_source_fails_the_apply(tmp_path: Path) -> None:
    class Broken:
        def __init__(self) -> None:
            self.data = io.BytesIO(layer(m("f", data=os.urandom(3 << 20))))

        def read(self, size: int = -1, /) -> bytes:
            if self.data.tell() > 1 << 20:
                raise OSError(5, "Input/output error")
            return self.data.read(size)

    with pytest.raises(OSError, match="Input/output error"):
        apply_layer(Broken(), str(tmp_path), overlay=False)
    assert _layer_threads() == []


def test_large_files_cross_many_chunks_intact(tmp_path: Path) -> None:
    body = os.urandom((5 << 20) + 12345)
    data = layer(m("a", data=b"1"), m("big", data=body), m("z", data=b"2"))
    result = apply(data, tmp_path)
    assert (tmp_path / "big").read_bytes() == body
    assert ((tmp_path / "a").read_bytes(), (tmp_path / "z").read_bytes()) == (b"1", b"2")
    assert result.size == len(data) and result.entries == 3


def _clean_path_by_components(name: str) -> str | None:
    if "\x00" in name:
        return None
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


@given(name=st.text(st.sampled_from("ab./\x00"), max_size=12) | _names)
def test_clean_path_agrees_with_the_component_walk(name: str) -> None:
    assert plan.clean_path(name) == _clean_path_by_components(name)


def test_clean_names_take_the_fast_path_unchanged() -> None:
    for name in ("a", "a/b", "a.b/c..d", "...", "a/.../b", ".a/b.", "a/.b/c"):
        assert plan.clean_path(name) == name
    for name in ("a/./b", "./a", "a/.", "a/..", "a//b", "a/", "/a", ".", ".."):
        assert plan.clean_path(name) != name
