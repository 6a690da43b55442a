"""USER strings resolved as containerd's oci.WithUser / WithAdditionalGIDs do, from file contents,
and paths confined to a root filesystem as continuity's fs.RootPath confines them."""

from __future__ import annotations

import os

import pytest

from pyctr.api.errdefs import InvalidArgument, NotFound
from pyctr.ctr import rootfs, users

PASSWD = """root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000::/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
broken:x:notanumber
"""
GROUP = """# a comment, skipped
root:x:0:
wheel:x:10:root
staff:x:50:alice,bob
alice:x:1000:alice
devs:x:3000:alice
"""


class Files:
    """users.Files over strings; None is a missing file."""

    def __init__(self, passwd: str | None = PASSWD, group: str | None = GROUP) -> None:
        self._passwd, self._group = passwd, group

    def passwd(self) -> list[users.Passwd]:
        if self._passwd is None:
            raise FileNotFoundError("/etc/passwd")
        return users.parse_passwd(self._passwd)

    def group(self) -> list[users.Group]:
        if self._group is None:
            raise FileNotFoundError("/etc/group")
        return users.parse_group(self._group)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("alice", (1000, 1000)),
        ("1000", (1000, 1000)),
        ("4242", (4242, 0)),  # a uid without an entry: gid 0
        ("alice:devs", (1000, 3000)),
        ("alice:7", (1000, 7)),
        ("1001:staff", (1001, 50)),
        ("5:6", (5, 6)),
        ("+5:6", (5, 6)),  # Go's Atoi takes a sign
        ("alice:", (1000, 0)),  # an empty part is 0, as containerd has it
        (":staff", (0, 50)),
        ("broken", (0, 0)),  # an unreadable number counts as 0, as runc's parser has it
        ("2147483648", None),  # beyond runc's limit: a name, and there is none
    ],
)
def test_resolve(user: str, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(NotFound, match="no such user"):
            users.resolve(user, Files())
    else:
        assert users.resolve(user, Files()) == expected


def test_numeric_pair_reads_no_file() -> None:
    assert not users.needs_files("5:6")
    assert users.needs_files("5") and users.needs_files("alice:6") and users.needs_files("5:staff")
    assert users.resolve("5:6", None) == (5, 6)


def test_errors() -> None:
    with pytest.raises(NotFound, match="no such user 'carol' in the image's /etc/passwd"):
        users.resolve("carol", Files())
    with pytest.raises(NotFound, match="no such group 'nope' in the image's /etc/group"):
        users.resolve("alice:nope", Files())
    with pytest.raises(NotFound, match="the image has no /etc/passwd"):
        users.resolve("alice", Files(passwd=None))
    with pytest.raises(InvalidArgument, match="invalid USER value"):
        users.resolve("a:b:c", Files())
    # a uid alone needs no passwd file
    assert users.resolve("7", Files(passwd=None)) == (7, 0)


def test_additional_gids() -> None:
    f = Files()
    assert users.additional_gids("alice", 1000, f) == (1000, 50, 3000)  # own group left out, gid first
    assert users.additional_gids("1000", 3000, f) == (50, 3000)  # gid already among them
    assert users.additional_gids("root", 0, f) == (0, 10)
    assert users.additional_gids("4242", 9, f) == (9,)  # no such uid
    assert users.additional_gids("alice", 1000, Files(group=None)) == (1000,)


def test_from_image_and_with_user() -> None:
    f = Files()
    assert users.from_image("", f) == users.User(0, 0, (0, 10))
    assert users.from_image("1000:50", f) == users.User(1000, 50, (50, 3000))
    assert users.with_user("alice", f) == users.User(1000, 1000, (1000,))
    assert users.User(1, 2, (2,)).spec() == {"uid": 1, "gid": 2, "additionalGids": [2]}


def test_resolve_in_root_stays_inside(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "etc"))
    os.makedirs(os.path.join(root, "lib"))
    with open(os.path.join(root, "lib", "passwd"), "w") as f:
        f.write("x\n")
    os.symlink("/lib/passwd", os.path.join(root, "etc", "passwd"))
    os.symlink("../../../../../lib/passwd", os.path.join(root, "etc", "up"))
    os.symlink("/", os.path.join(root, "etc", "slash"))
    os.symlink("loop", os.path.join(root, "etc", "loop"))
    assert rootfs.resolve_in_root(root, "/etc/passwd") == os.path.join(root, "lib", "passwd")
    assert rootfs.resolve_in_root(root, "/etc/up") == os.path.join(root, "lib", "passwd")
    assert rootfs.resolve_in_root(root, "/etc/slash/etc/passwd") == os.path.join(root, "lib", "passwd")
    assert rootfs.read_text(root, "/etc/passwd") == "x\n"
    with pytest.raises(FileNotFoundError):
        rootfs.read_text(root, "/etc/group")
    with pytest.raises(OSError, match="too many links"):
        rootfs.resolve_in_root(root, "/etc/loop")


def test_readonly_mounts() -> None:
    from pyctr.api.mount import Mount

    overlay = Mount(
        "overlay", "overlay", "", ("index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs")
    )
    bind = Mount("bind", "/s/3/fs", "", ("rbind", "rw"))
    assert rootfs.readonly([overlay, bind]) == [
        Mount("overlay", "overlay", "", ("lowerdir=/s/2/fs:/s/1/fs", "index=off", "ro")),
        Mount("bind", "/s/3/fs", "", ("rbind", "ro")),
    ]
