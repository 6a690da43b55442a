"""``pyctr run --user`` and ``pyctr exec --user`` against a real pyctrd, runc and busybox.

Every USER form containerd's ``oci.WithUser`` takes, resolved from the image's own /etc/passwd
(an absolute symlink to /lib/passwd in the image) and /etc/group, with the supplementary groups
``WithAdditionalGIDs`` adds; the image config's ``User``; and the errors, after which nothing is
left: no container, no snapshot, no lease, no temp mount. One daemon for the module; each test
removes its containers, also when it fails.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.helpers import daemons, images

USERS = "docker.io/library/users:latest"
USERS_APP = "docker.io/library/users-app:latest"  # the same layer, config User "app"
# What every container prints: `id`, then the kernel's view (ids and the supplementary groups).
PROBE = 'id; grep -E "^(Uid|Gid|Groups):" /proc/self/status'


@dataclass
class Env:
    d: daemons.Daemon
    ids: list[str] = field(default_factory=list)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return daemons.run([daemons.PYCTR, "-a", self.d.address, *args], timeout=60)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    def new_id(self, prefix: str) -> str:
        cid = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.ids.append(cid)
        return cid

    def cleanup(self) -> None:
        if self.ids:
            self("tasks", "rm", "-f", *self.ids)
            self("containers", "rm", *self.ids)
            self.ids.clear()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if not shutil.which("runc"):
        pytest.skip("runc is not installed")
    work = tempfile.mkdtemp(prefix="pyctr-users-", dir="/tmp")
    d = daemons.start_pyctrd()
    try:
        layer = images.users_layer()
        e = Env(d)
        users = images.build_users(work, USERS, layer=layer)
        app = images.build_users(work, USERS_APP, user="app", layer=layer)
        for img in (users, app):
            e.ok("images", "import", "--base-name", img.base_name, img.oci_tar)
        e.ok("images", "import", "--snapshotter", "native", "--base-name", users.base_name, users.oci_tar)
        yield e
    finally:
        daemons.cleanup(d)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def pyctr(env: Env) -> Iterator[Env]:
    try:
        yield env
    finally:
        env.cleanup()


def parse(out: str) -> tuple[str, int, int, list[int]]:
    """(the `id` line, uid, gid, supplementary groups) from PROBE's output."""
    lines = out.splitlines()
    fields = {k: v.split() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], int(fields["Uid"][0]), int(fields["Gid"][0]), [int(g) for g in fields["Groups"]]


def run_probe(pyctr: Env, *flags: str, image: str = USERS) -> tuple[str, int, int, list[int]]:
    r = pyctr("run", "--rm", *flags, image, pyctr.new_id("user"), "sh", "-c", PROBE)
    assert r.returncode == 0, (flags, r.stdout, r.stderr)
    return parse(r.stdout)


# USER -> (`id` output, uid, gid, supplementary groups as the kernel lists them: sorted)
RUN_CASES = {
    "alice": ("uid=1000(alice) gid=1000(alice) groups=50(staff),1000(alice),3000(devs)", 1000, 1000, [50, 1000, 3000]),
    "1000": ("uid=1000(alice) gid=1000(alice) groups=50(staff),1000(alice),3000(devs)", 1000, 1000, [50, 1000, 3000]),
    "alice:devs": ("uid=1000(alice) gid=3000(devs) groups=50(staff),3000(devs)", 1000, 3000, [50, 3000]),
    "1000:50": ("uid=1000(alice) gid=50(staff) groups=50(staff),3000(devs)", 1000, 50, [50, 3000]),
    "1001:staff": ("uid=1001(bob) gid=50(staff) groups=50(staff)", 1001, 50, [50]),
    "bob:1234": ("uid=1001(bob) gid=1234 groups=50(staff),1234", 1001, 1234, [50, 1234]),
    "4242": ("uid=4242 gid=0(root) groups=0(root)", 4242, 0, [0]),
    "4242:4343": ("uid=4242 gid=4343 groups=4343", 4242, 4343, [4343]),
}  # fmt: skip


@pytest.mark.parametrize("user", list(RUN_CASES))
def test_run_user_forms(pyctr: Env, user: str) -> None:
    assert run_probe(pyctr, "--user", user) == RUN_CASES[user]


def test_run_without_user_gets_roots_groups(pyctr: Env) -> None:
    # as containerd's WithImageConfig: WithAdditionalGIDs("root") even without a USER
    assert run_probe(pyctr) == ("uid=0(root) gid=0(root) groups=0(root),10(wheel)", 0, 0, [0, 10])


def test_image_config_user_is_resolved(pyctr: Env) -> None:
    app = ("uid=2000(app) gid=2000(app) groups=29(audio),2000(app)", 2000, 2000, [29, 2000])
    assert run_probe(pyctr, image=USERS_APP) == app
    cid = pyctr.new_id("spec")
    pyctr.ok("run", "-d", USERS_APP, cid, "sleep", "100")
    spec = json.loads(pyctr.ok("containers", "info", "--spec", cid))
    assert spec["process"]["user"] == {"uid": 2000, "gid": 2000, "additionalGids": [2000, 29]}
    # --user wins over the image's
    bob = ("uid=1001(bob) gid=1001(bob) groups=50(staff),1001(bob)", 1001, 1001, [50, 1001])
    assert run_probe(pyctr, "--user", "bob", image=USERS_APP) == bob


def test_run_user_on_the_native_snapshotter(pyctr: Env) -> None:
    # native's mounts are a bind, remounted read-only for the look-up
    assert run_probe(pyctr, "--snapshotter", "native", "--user", "alice:devs") == RUN_CASES["alice:devs"]


def leftovers(pyctr: Env, cid: str) -> list[str]:
    out = []
    if cid in pyctr.ok("containers", "ls", "-q").split():
        out.append("container")
    if any(line.split()[:1] == [cid] for line in pyctr.ok("snapshots", "ls").splitlines()):
        out.append("snapshot")
    if "pyctr-run-" in pyctr.ok("leases", "ls"):
        out.append("lease")
    if glob.glob(os.path.join(tempfile.gettempdir(), f"pyctr-rootfs-{cid}-*")):
        out.append("temp dir")
    with open("/proc/self/mountinfo") as f:
        if f"pyctr-rootfs-{cid}-" in f.read():
            out.append("mount")
    return out


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("nosuch", "no such user 'nosuch' in the image's /etc/passwd"),
        ("nosuch:staff", "no such user 'nosuch' in the image's /etc/passwd"),
        ("alice:nosuch", "no such group 'nosuch' in the image's /etc/group"),
        ("1000:nosuch", "no such group 'nosuch' in the image's /etc/group"),
        ("a:b:c", "invalid USER value 'a:b:c'"),
    ],
)
def test_run_unknown_user_fails_and_leaves_nothing(pyctr: Env, user: str, message: str) -> None:
    cid = pyctr.new_id("bad")
    r = pyctr("run", "--rm", "--user", user, USERS, cid, "id")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert message in r.stderr and r.stdout == ""
    assert leftovers(pyctr, cid) == []
    # the id is free again
    assert run_probe(pyctr, "--user", "alice") == RUN_CASES["alice"]


def test_exec_user_forms(pyctr: Env) -> None:
    cid = pyctr.new_id("exec")
    # The container adds a user after it started: exec reads the container's snapshot, live.
    add = "echo carol:x:1500:1500::/:/bin/sh >> /etc/passwd; echo carols:x:1500:alice >> /etc/group"
    pyctr.ok("run", "-d", USERS, cid, "sh", "-c", f"{add}; exec sleep 100")
    deadline = time.monotonic() + 10
    while "carols" not in pyctr.ok("exec", cid, "cat", "/etc/group"):
        assert time.monotonic() < deadline, "the container never added its user"
        time.sleep(0.1)
    # exec as ctr's: WithUser alone, so the user's gid is the only supplementary group
    cases = {
        "alice": ("uid=1000(alice) gid=1000(alice) groups=1000(alice)", 1000, 1000, [1000]),
        "1001": ("uid=1001(bob) gid=1001(bob) groups=1001(bob)", 1001, 1001, [1001]),
        "1001:staff": ("uid=1001(bob) gid=50(staff) groups=50(staff)", 1001, 50, [50]),
        "bob:devs": ("uid=1001(bob) gid=3000(devs) groups=3000(devs)", 1001, 3000, [3000]),
        "77:88": ("uid=77 gid=88 groups=88", 77, 88, [88]),
        "carol": ("uid=1500(carol) gid=1500(carols) groups=1500(carols)", 1500, 1500, [1500]),
    }
    for user, expected in cases.items():
        r = pyctr("exec", "--user", user, cid, "sh", "-c", PROBE)
        assert r.returncode == 0, (user, r.stdout, r.stderr)
        assert parse(r.stdout) == expected, user
    r = pyctr("exec", "--user", "nosuch", cid, "id")
    assert r.returncode == 1 and "no such user 'nosuch'" in r.stderr, r.stderr
    r = pyctr("tasks", "exec", "--user", "alice:nosuch", cid, "id")
    assert r.returncode == 1 and "no such group 'nosuch'" in r.stderr, r.stderr
    assert leftovers(pyctr, cid) == ["container", "snapshot"]  # its own, nothing more
    assert len(pyctr.ok("ps", cid).splitlines()) == 2  # the header and the init process, no exec
    assert pyctr.ok("tasks", "ls", "-q").split().count(cid) == 1
