"""The layer planner: one tar member in, one action out. Pure code, no filesystem.

An OCI layer is a tar changeset (image-spec ``layer.md``). Each member becomes one of:

    Write(path, entry)   create or replace ``path`` (file, dir, symlink, hardlink, device, fifo)
    Whiteout(path)       ``<dir>/.wh.<name>``: delete ``<dir>/<name>`` from the lower layers
    Opaque(path)         ``<dir>/.wh..wh..opq``: hide everything the lower layers have in ``<dir>``
    Skip(name, reason)   nothing to do: the root itself, aufs metadata (``.wh..wh.plnk`` and others)
    Reject(name, reason) the archive is invalid; the applier stops

Every path in an action is *clean*: relative to the layer root, ``/``-separated, without empty,
``.`` or ``..`` components and without NUL (``""`` is the root itself). A leading ``/`` is dropped,
so ``/etc/x`` lands at ``<root>/etc/x`` as containerd does; a ``..`` that climbs above the root is
rejected (containerd clamps it at the root instead; Docker rejects it, and so do we). Symlinks are
not this module's business: the applier resolves every parent inside the root.
"""

from __future__ import annotations

import enum
import tarfile
from dataclasses import dataclass

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."  # aufs bookkeeping: never part of the image's filesystem
WHITEOUT_OPAQUE = ".wh..wh..opq"
PAX_XATTR = "SCHILY.xattr."

# Go's time.Unix(0, 1<<63-1): containerd resets times outside [0, max] to the epoch.
_MAX_TIME_NS = (1 << 63) - 1
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "leave unchanged" to chown, so it is not an id


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


_KINDS = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.GNUTYPE_SPARSE: Kind.FILE,  # tarfile expands the holes when the data is read
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """What to create, with its metadata. ``linkname`` is the raw symlink target (never resolved
    by the applier) or the clean root-relative hardlink target."""

    kind: Kind
    mode: int  # permission bits, 0o7777
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Write:
    path: str
    entry: Entry


@dataclass(frozen=True, slots=True)
class Whiteout:
    path: str  # the lower-layer entry to delete, not the ``.wh.`` name
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class Opaque:
    path: str  # the directory; "" is the root


@dataclass(frozen=True, slots=True)
class Skip:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    name: str
    reason: str


Action = Write | Whiteout | Opaque | Skip | Reject


def clean_path(name: str) -> str | None:
    """``name`` made root-relative and canonical, or None when it contains NUL or its ``..``
    components climb above the root. ``""`` is the root."""
    if "\x00" in name:
        return None
    if name and "//" not in name and name[0] != "/" and name[-1] != "/":
        wrapped = f"/{name}/"
        if "/./" not in wrapped and "/../" not in wrapped:
            return name  # already clean: the usual case
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def split(path: str) -> tuple[str, str]:
    """(parent, base) of a clean path; the parent of a top-level name is ``""``."""
    parent, _, base = path.rpartition("/")
    return parent, base


def join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


def plan_member(info: tarfile.TarInfo) -> Action:
    """Classify one member of a layer tar."""
    name = info.name
    path = clean_path(name)
    if path is None:
        reason = "NUL in name" if "\x00" in name else "path escapes the root"
        return Reject(name, reason)
    if path == "":
        return Skip(name, "resolves to the root")
    parent, base = split(path)
    if WHITEOUT_PREFIX in parent:  # else no component can start with it
        for part in parent.split("/"):
            if part.startswith(WHITEOUT_META_PREFIX):
                return Skip(name, "inside aufs metadata")
            if part.startswith(WHITEOUT_PREFIX):
                return Reject(name, "a whiteout used as a directory")

    if base.startswith(WHITEOUT_PREFIX):
        if base == WHITEOUT_OPAQUE:
            return Opaque(parent)
        if base.startswith(WHITEOUT_META_PREFIX):
            return Skip(name, "aufs metadata")
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            return Reject(name, "whiteout names no entry of its directory")
        if not (0 <= info.uid <= _MAX_ID and 0 <= info.gid <= _MAX_ID):
            return Reject(name, "uid or gid out of range")
        return Whiteout(join(parent, target), info.uid, info.gid)

    kind = _KINDS.get(info.type)
    if kind is None:
        return Reject(name, f"unsupported member type {info.type!r}")
    if not (0 <= info.uid <= _MAX_ID and 0 <= info.gid <= _MAX_ID):
        return Reject(name, "uid or gid out of range")

    linkname = ""
    if kind is Kind.SYMLINK:
        linkname = info.linkname
        if not linkname or "\x00" in linkname:
            return Reject(name, "symlink target empty or with NUL")
    elif kind is Kind.HARDLINK:
        link_target = clean_path(info.linkname)
        if link_target is None:
            return Reject(name, "hardlink target escapes the root")
        if link_target == "" or link_target == path:
            return Reject(name, "hardlink to the root or to itself")
        linkname = link_target

    pax = info.pax_headers
    mtime_ns = _bound(_pax_time_ns(pax.get("mtime") if pax else None, info.mtime))
    atime_ns = mtime_ns  # containerd sets atime to the later of atime and mtime; without one, mtime
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if pax:
        atime_raw = pax.get("atime")
        if atime_raw is not None:
            atime_ns = max(_bound(_pax_time_ns(atime_raw, 0)), mtime_ns)
        xattrs = tuple(
            sorted(
                (key[len(PAX_XATTR) :], value.encode("utf-8", "surrogateescape"))
                for key, value in pax.items()
                if key.startswith(PAX_XATTR) and len(key) > len(PAX_XATTR)
            )
        )
    entry = Entry(
        kind=kind,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=mtime_ns,
        atime_ns=atime_ns,
        size=info.size if kind is Kind.FILE else 0,
        linkname=linkname,
        devmajor=info.devmajor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        devminor=info.devminor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        xattrs=xattrs,
    )
    return Write(path, entry)


def xattr_applied(key: str) -> bool:
    """Whether an xattr from an archive may be set. ``trusted.*`` is refused, as containerd does:
    in an overlay upper dir, ``trusted.overlay.*`` would let a layer steer overlayfs itself."""
    return not key.startswith("trusted.")


def xattr_exported(key: str) -> bool:
    """Whether a diff carries an xattr: not overlayfs' own bookkeeping (``trusted.*``,
    ``user.overlay.*``) and not the host's SELinux label."""
    return not (key.startswith(("trusted.", "user.overlay.")) or key == "security.selinux")


def _pax_time_ns(raw: str | None, fallback: float) -> int:
    """A PAX time (``"1700000000.123456789"``) in exact nanoseconds; tarfile's float loses them."""
    if raw is not None:
        sign = -1 if raw.startswith("-") else 1
        secs, _, frac = raw.lstrip("+-").partition(".")
        if secs.isdigit() and (frac == "" or frac.isdigit()):
            return sign * (int(secs) * 1_000_000_000 + int((frac + "000000000")[:9]))
    try:
        return int(fallback * 1_000_000_000)
    except (OverflowError, ValueError):
        return 0


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_TIME_NS else 0
