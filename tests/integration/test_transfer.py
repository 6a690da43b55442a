"""Push, export, import and mount through pyctrd's Transfer service, checked with other tools.

Push goes to a new repository of the test registry and is read back with skopeo; an export is
imported by the real Go ctr (client-side import) into another namespace and must name the same
digest; the built OCI and docker-archive tars are imported with pyctr and run; mount shows the
root filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers import daemons, images
from tests.helpers.registry import Registry


def pyctr(d: daemons.Daemon, *args: str, ns: str = "default") -> subprocess.CompletedProcess[str]:
    return daemons.run([daemons.PYCTR, "-a", d.address, "-n", ns, *args], timeout=30)


def ok(d: daemons.Daemon, *args: str, ns: str = "default") -> str:
    r = pyctr(d, *args, ns=ns)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def target_digest(d: daemons.Daemon, name: str, ns: str = "default") -> str:
    return str(json.loads(ok(d, "images", "inspect", name, ns=ns))["target"]["digest"])


@pytest.fixture
def work() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pyctr-transfer-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_push_to_new_repo(pyctrd: daemons.Daemon, image_registry: Registry) -> None:
    src = image_registry.ref("library/busybox")
    ok(pyctrd, "images", "pull", "--plain", src)
    dest = image_registry.ref("pushed/busybox", "v1")
    out = ok(pyctrd, "images", "push", "--plain", dest, src)
    assert "complete" in out
    r = daemons.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dest}"])
    assert r.returncode == 0, r.stderr
    raw = r.stdout.encode()
    import hashlib

    assert "sha256:" + hashlib.sha256(raw).hexdigest() == target_digest(pyctrd, src)


def test_export_then_ctr_import(pyctrd: daemons.Daemon, built_images: images.Images, work: str) -> None:
    if shutil.which("ctr") is None:
        pytest.skip("the real Go ctr is not installed")
    bb = built_images.busybox
    ok(pyctrd, "images", "import", "--base-name", bb.base_name, "--no-unpack", bb.oci_tar)
    tar = os.path.join(work, "out.tar")
    ok(pyctrd, "images", "export", tar, bb.name)
    r = daemons.run(["ctr", "-a", pyctrd.address, "-n", "other", "images", "import", "--no-unpack", tar])
    assert r.returncode == 0, r.stderr
    assert target_digest(pyctrd, bb.name, ns="other") == target_digest(pyctrd, bb.name)


def test_import_oci_and_docker_then_run(pyctrd: daemons.Daemon, built_images: images.Images) -> None:
    bb, multi = built_images.busybox, built_images.multi
    ok(pyctrd, "images", "import", "--base-name", multi.base_name, multi.oci_tar)
    assert multi.name in ok(pyctrd, "images", "ls", "-q")
    ok(pyctrd, "images", "import", bb.docker_tar, ns="docker")
    assert "docker.io/library/busybox:latest" in ok(pyctrd, "images", "ls", "-q", ns="docker")
    ok(pyctrd, "images", "import", "--base-name", bb.base_name, bb.oci_tar)
    assert ok(pyctrd, "run", "--rm", bb.name, "x", "echo", "hi").strip() == "hi"
    assert (
        ok(pyctrd, "run", "--rm", "docker.io/library/busybox:latest", "y", "echo", "hi", ns="docker").strip()
        == "hi"
    )


def test_mount_unmount(pyctrd: daemons.Daemon, built_images: images.Images, work: str) -> None:
    bb = built_images.busybox
    ok(pyctrd, "images", "import", "--base-name", bb.base_name, bb.oci_tar)
    target = os.path.join(work, "mnt")
    os.mkdir(target)
    ok(pyctrd, "images", "mount", bb.name, target)
    try:
        assert os.path.exists(os.path.join(target, "bin", "busybox"))
    finally:
        ok(pyctrd, "images", "unmount", "--rm", target)
    assert not os.path.exists(os.path.join(target, "bin", "busybox"))


def test_export_missing_image(pyctrd: daemons.Daemon, work: str) -> None:
    tar = os.path.join(work, "none.tar")
    r = pyctr(pyctrd, "images", "export", tar, "docker.io/library/nosuch:latest")
    assert r.returncode != 0
    assert "nosuch" in r.stderr and "not found" in r.stderr, r.stderr
    assert not os.path.exists(tar)
