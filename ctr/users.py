"""A container's user from a USER string, as containerd's ``oci.WithUser`` resolves it.

The forms are the OCI image spec's: ``uid``, ``uid:gid``, ``name``, ``name:group``,
``uid:group``, ``name:gid``. Names come from the image's ``/etc/passwd`` and ``/etc/group``
(read through :class:`Files`, so the rules here never touch a file system):

* ``uid`` alone: the gid of that uid's passwd entry; uid with gid 0 when there is none, or no
  passwd file (``WithUserID``).
* ``name`` alone: uid and gid of the passwd entry; an error when there is none (``WithUsername``).
* two parts: each numeric part is taken as it is, each name looked up; a numeric ``uid:gid``
  reads no file at all.

A part is numeric when it parses as a number in 0..2**31-1 (runc's limit), as Go's Atoi reads it;
anything else is a name. :func:`additional_gids` is ``WithAdditionalGIDs``: the groups whose member
list names the user, apart from the group named after the user, and the user's own gid first
unless it is among them (``ensureAdditionalGids``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from pyctr.api.errdefs import InvalidArgument, NotFound

MAX_ID = 2**31 - 1
_NUMBER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Passwd:
    """One /etc/passwd line: ``name:password:uid:gid:gecos:home:shell``."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Group:
    """One /etc/group line: ``name:password:gid:member,member``."""

    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class User:
    """What goes into the OCI spec's ``process.user``."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...]

    def spec(self) -> dict[str, object]:
        return {"uid": self.uid, "gid": self.gid, "additionalGids": list(self.additional_gids)}


class Files(Protocol):
    """The passwd and group files of one root filesystem; FileNotFoundError when one is absent."""

    def passwd(self) -> list[Passwd]: ...

    def group(self) -> list[Group]: ...


def _int(text: str) -> int:
    # runc's parser ignores a number it cannot read in these files; so does containerd.
    try:
        return int(text)
    except ValueError:
        return 0


def _lines(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def parse_passwd(text: str) -> list[Passwd]:
    out = []
    for f in _lines(text):
        f += [""] * (4 - len(f))
        out.append(Passwd(name=f[0], uid=_int(f[2]), gid=_int(f[3])))
    return out


def parse_group(text: str) -> list[Group]:
    out = []
    for f in _lines(text):
        f += [""] * (4 - len(f))
        members = tuple(f[3].split(",")) if f[3] else ()
        out.append(Group(name=f[0], gid=_int(f[2]), members=members))
    return out


def numeric_id(part: str) -> int | None:
    """The id a USER part names by number, or None when the part is a name."""
    if not _NUMBER.fullmatch(part):
        return None
    value = int(part)
    return value if 0 <= value <= MAX_ID else None


def split(user: str) -> list[str]:
    parts = user.split(":")
    if len(parts) > 2:
        raise InvalidArgument(f"invalid USER value {user!r}: use uid, name, uid:gid or name:group")
    return parts


def _pair_ids(parts: list[str]) -> list[int | None]:
    # In ``uid:gid`` an empty part is 0, as containerd reads it (``alice:`` is alice with gid 0).
    return [0 if p == "" else numeric_id(p) for p in parts]


def needs_files(user: str) -> bool:
    """False when the user resolves without the image's files (a numeric ``uid:gid``)."""
    parts = split(user)
    return not (len(parts) == 2 and None not in _pair_ids(parts))


def _user_by_name(files: Files, name: str) -> Passwd:
    try:
        entries = files.passwd()
    except FileNotFoundError:
        raise NotFound(f"no such user {name!r}: the image has no /etc/passwd") from None
    for entry in entries:
        if entry.name == name:
            return entry
    raise NotFound(f"no such user {name!r} in the image's /etc/passwd")


def _gid_by_name(files: Files, name: str) -> int:
    try:
        entries = files.group()
    except FileNotFoundError:
        raise NotFound(f"no such group {name!r}: the image has no /etc/group") from None
    for entry in entries:
        if entry.name == name:
            return entry.gid
    raise NotFound(f"no such group {name!r} in the image's /etc/group")


def resolve(user: str, files: Files | None) -> tuple[int, int]:
    """uid and gid for a USER string; ``files`` may be None only when :func:`needs_files` is False."""
    parts = split(user)
    ids = _pair_ids(parts) if len(parts) == 2 else [numeric_id(parts[0])]
    if len(parts) == 2 and ids[0] is not None and ids[1] is not None:
        return ids[0], ids[1]
    assert files is not None, "this USER form reads the image's files"
    if len(parts) == 1:
        uid = ids[0]
        if uid is None:
            entry = _user_by_name(files, parts[0])
            return entry.uid, entry.gid
        try:
            match = [e for e in files.passwd() if e.uid == uid]
        except FileNotFoundError:
            match = []
        return (uid, match[0].gid) if match else (uid, 0)
    uid = ids[0] if ids[0] is not None else _user_by_name(files, parts[0]).uid
    gid = ids[1] if ids[1] is not None else _gid_by_name(files, parts[1])
    return uid, gid


def additional_gids(user: str, gid: int, files: Files) -> tuple[int, ...]:
    """The supplementary groups of ``user`` (a uid or a name), with ``gid`` first unless listed."""
    name = user
    gids: list[int] = []
    try:
        if _NUMBER.fullmatch(user):
            match = [e for e in files.passwd() if e.uid == int(user)]
            name = match[0].name if match else ""
        if name:
            gids = [g.gid for g in files.group() if g.name != name and name in g.members]
    except FileNotFoundError:
        gids = []
    return tuple(gids) if gid in gids else (gid, *gids)


def with_user(user: str, files: Files | None) -> User:
    """``WithUser``: the uid and gid, and the gid as the only additional group."""
    uid, gid = resolve(user, files)
    return User(uid, gid, (gid,))


def from_image(user: str, files: Files) -> User:
    """The user of a new container, as ``WithImageConfig`` sets it: ``WithUser`` and then the
    supplementary groups of the resolved uid, or root's when no USER is given."""
    if not user:
        return User(0, 0, additional_gids("root", 0, files))
    uid, gid = resolve(user, files)
    return User(uid, gid, additional_gids(str(uid), gid, files))
