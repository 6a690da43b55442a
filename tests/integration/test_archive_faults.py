"""Image archives that break half-way: nothing half-imported is visible, nothing half-exported
is left at the destination.

Import: the busybox OCI layout tar and docker-archive (skopeo) are cut short (inside a blob, at
a member boundary) or damaged (a flipped byte in the layer, a garbage tar header, index.json or
manifest.json that is not JSON). ``pyctr images import`` must fail with one clear line, record
no image, and once the collector has run, leave no blob, ingest, snapshot or lease behind (on
disk as well as in the API).

Export: a blob of the image is missing from the content store (deleted through the API, or its
file gone from disk). ``pyctr images export`` must fail naming it, and the destination keeps
what it had: no file when there was none, the old file untouched when there was one, and no
temporary file beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import daemons, images

NS = "archive"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("skopeo", "umoci")),
    reason="skopeo and umoci are needed to build the test archives (make setup installs them as root)",
)


@pytest.fixture
def work() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="archive-faults-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pyctr(d: daemons.Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return daemons.run([daemons.PYCTR, "-a", d.address, "-n", NS, *args], timeout=60)


def ok(d: daemons.Daemon, *args: str) -> str:
    r = pyctr(d, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def collect(d: daemons.Daemon) -> None:
    """A synchronous garbage collection: a lease deleted with sync waits for one."""
    ok(d, "leases", "create", "--id", "gc-trigger")
    ok(d, "leases", "rm", "--sync", "gc-trigger")


def assert_nothing_left(d: daemons.Daemon) -> None:
    """No image, and after a collection no content, ingest, snapshot or lease, in the API and on disk."""
    assert ok(d, "images", "ls", "-q").split() == []
    collect(d)
    assert ok(d, "content", "ls", "-q").split() == []
    assert ok(d, "content", "active").splitlines()[1:] == []
    assert ok(d, "snapshots", "ls").splitlines()[1:] == []
    assert ok(d, "leases", "ls", "-q").split() == []
    content = os.path.join(d.root, "io.containerd.content.v1.content")
    leftovers = [os.path.join(dp, f) for dp, _, files in os.walk(content) for f in files]
    assert leftovers == [], leftovers
    snaps = os.path.join(d.root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
    if os.path.isdir(snaps):
        assert os.listdir(snaps) == []


# ------------------------------------------------------------------------------- damaging tars


def members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def largest(path: str) -> tarfile.TarInfo:
    return max((m for m in members(path) if m.isfile()), key=lambda m: m.size)


def named(path: str, name: str) -> tarfile.TarInfo:
    return next(m for m in members(path) if m.name == name)


def cut_in_blob(src: str) -> bytes:
    """Up to the middle of the largest member (the layer)."""
    m = largest(src)
    with open(src, "rb") as f:
        return f.read(m.offset_data + m.size // 2)


def cut_at_boundary(src: str) -> bytes:
    """Every member up to the layout's JSON, whole, and nothing after: no end-of-archive marker."""
    doc = "index.json" if any(m.name == "index.json" for m in members(src)) else "manifest.json"
    with open(src, "rb") as f:
        return f.read(named(src, doc).offset)


def flip_layer_byte(src: str) -> bytes:
    m = largest(src)
    data = bytearray(open(src, "rb").read())
    data[m.offset_data + m.size // 2] ^= 0xFF
    return bytes(data)


def garbage_header(src: str) -> bytes:
    """The header block of the second member replaced by bytes that are no tar header."""
    m = members(src)[1]
    data = bytearray(open(src, "rb").read())
    data[m.offset : m.offset + tarfile.BLOCKSIZE] = bytes(range(256)) * 2
    return bytes(data)


def json_not_json(src: str) -> bytes:
    """index.json (OCI) or manifest.json (docker) of the same length, but not JSON."""
    doc = "index.json" if any(m.name == "index.json" for m in members(src)) else "manifest.json"
    m = named(src, doc)
    data = bytearray(open(src, "rb").read())
    data[m.offset_data : m.offset_data + m.size] = b"{" + b"x" * (m.size - 1)
    return bytes(data)


FAULTS: dict[str, tuple[Callable[[str], bytes], tuple[str, ...]]] = {
    # fault: (how, words one of which the error must contain)
    "cut-in-blob": (cut_in_blob, ("truncated",)),
    "cut-at-boundary": (cut_at_boundary, ("truncated",)),
    "flipped-layer-byte": (flip_layer_byte, ("digest mismatch", "wrong diff id")),
    "garbage-header": (garbage_header, ("not a tar",)),
    "json-not-json": (json_not_json, ("not JSON",)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", ["oci", "docker"])
def test_damaged_import_leaves_nothing(
    pyctrd: daemons.Daemon, built_images: images.Images, work: str, kind: str, fault: str
) -> None:
    bb = built_images.busybox
    src = bb.oci_tar if kind == "oci" else bb.docker_tar
    damage, words = FAULTS[fault]
    bad = os.path.join(work, f"{kind}-{fault}.tar")
    with open(bad, "wb") as f:
        f.write(damage(src))
    r = pyctr(pyctrd, "images", "import", "--base-name", bb.base_name, bad)
    assert r.returncode != 0, r.stdout
    assert r.stderr.startswith("pyctr: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert any(w in r.stderr for w in words), r.stderr
    assert_nothing_left(pyctrd)
    # The daemon is fine: the whole archive imports afterwards.
    ok(pyctrd, "images", "import", "--base-name", bb.base_name, src)
    assert ok(pyctrd, "images", "ls", "-q").split() == [bb.name]


# ------------------------------------------------------------------------------------- export


def layer_digest(d: daemons.Daemon, name: str) -> str:
    doc = json.loads(ok(d, "images", "inspect", name))
    return str(doc["manifest"]["layers"][0]["digest"])


@pytest.mark.parametrize("how", ["content-rm", "file-gone"])
@pytest.mark.parametrize("existing", [False, True])
def test_export_with_missing_blob(
    pyctrd: daemons.Daemon, built_images: images.Images, work: str, how: str, existing: bool
) -> None:
    bb = built_images.busybox
    ok(pyctrd, "images", "import", "--no-unpack", "--base-name", bb.base_name, bb.oci_tar)
    layer = layer_digest(pyctrd, bb.name)
    if how == "content-rm":
        ok(pyctrd, "content", "rm", layer)
    else:
        blob = os.path.join(pyctrd.root, "io.containerd.content.v1.content", "blobs", *layer.split(":"))
        os.unlink(blob)
    dest = os.path.join(work, "out.tar")
    if existing:
        with open(dest, "wb") as f:
            f.write(b"an older export")
    r = pyctr(pyctrd, "images", "export", dest, bb.name)
    assert r.returncode != 0, r.stdout
    assert r.stderr.startswith("pyctr: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert layer in r.stderr and "not found" in r.stderr, r.stderr
    if existing:
        assert os.listdir(work) == ["out.tar"]
        with open(dest, "rb") as f:
            assert f.read() == b"an older export"
    else:
        assert os.listdir(work) == []
