"""Test images built offline, once per test session.

* ``busybox``: Debian's busybox-static as ``/bin/busybox`` with a symlink per applet the tests
  use, ``/etc/passwd`` and ``/etc/group``; built with umoci (init, new, unpack, repack, config)
  as an OCI layout, then packed as an OCI archive and, with skopeo, as a docker-archive.
* ``multi``: three layers written here with :mod:`tarfile`, the layout assembled by hand (blobs,
  manifest, config with ``rootfs.diff_ids``, index.json). Layer 2 has a whiteout of a file and
  of a directory, an opaque directory, a hard link, relative and absolute symlinks and changed
  owners and modes; layer 3 is gzip-compressed and writes into the opaque directory again.
* ``users`` (built on demand by :func:`build_users`, not by :func:`get`): busybox with more
  users and groups, and optionally a ``User`` in its config, assembled by hand as ``multi`` is.
* :func:`busybox_rootfs_tar` (on demand): busybox's root filesystem as a plain tar, which
  ``docker import`` turns into an image.

Every layout is tagged ``latest`` (``org.opencontainers.image.ref.name``); the archives are
imported with ``ctr images import --base-name <name>``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

BUSYBOX = "/bin/busybox"
TAG = "latest"
APPLETS = "sh echo cat ls sleep true false env id mkdir rm touch wc head".split()
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MTIME = 1_700_000_000  # fixed, so every build of a layer has the same digest


@dataclass(frozen=True)
class Image:
    """One built image: its OCI layout (tag ``latest``) and archives of it."""

    name: str  # the name ``ctr images import --base-name <name>`` gives it, plus ``:latest``
    layout: str
    oci_tar: str
    docker_tar: str = ""  # docker-archive, tagged ``name:latest``

    @property
    def base_name(self) -> str:
        return self.name.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Images:
    busybox: Image
    multi: Image


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _tar_dir(src: str, dest: str) -> None:
    """``src``'s files at the top level of a plain tar: an OCI archive of a layout, or a rootfs."""
    with tarfile.open(dest, "w") as tar:
        for name in sorted(os.listdir(src)):
            tar.add(os.path.join(src, name), arcname=name)


# ------------------------------------------------------------------------------------- busybox


def _populate_busybox(rootfs: str) -> None:
    for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        os.chmod(os.path.join(rootfs, d), mode)
    for d in ("proc", "sys", "dev"):
        os.makedirs(os.path.join(rootfs, d), mode=0o755, exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin", "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        with open(os.path.join(rootfs, "etc", name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(rootfs, "etc", name), 0o644)


def busybox_rootfs_tar(work: str) -> str:
    """The busybox root filesystem as a plain tar (for ``docker import``), built in ``work``."""
    rootfs = os.path.join(work, "busybox-rootfs")
    os.makedirs(rootfs)
    _populate_busybox(rootfs)
    dest = os.path.join(work, "busybox-rootfs.tar")
    _tar_dir(rootfs, dest)
    shutil.rmtree(rootfs)
    return dest


def build_busybox(work: str, name: str = "docker.io/library/busybox:latest") -> Image:
    layout = os.path.join(work, "busybox-oci")
    bundle = os.path.join(work, "busybox-bundle")
    image = f"{layout}:{TAG}"
    _run("umoci", "init", "--layout", layout)
    _run("umoci", "new", "--image", image)
    _run("umoci", "unpack", "--image", image, bundle)
    _populate_busybox(os.path.join(bundle, "rootfs"))
    _run("umoci", "repack", "--image", image, bundle)
    _run(
        "umoci",
        "config",
        "--image",
        image,
        "--architecture",
        "amd64",
        "--os",
        "linux",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.cmd",
        "sh",
        "--config.workingdir",
        "/",
    )
    _run("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)
    oci_tar = os.path.join(work, "busybox-oci.tar")
    _tar_dir(layout, oci_tar)
    docker_tar = os.path.join(work, "busybox-docker.tar")
    _run(
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        f"oci:{image}",
        f"docker-archive:{docker_tar}:{name.removeprefix('docker.io/library/')}",
    )
    return Image(name=name, layout=layout, oci_tar=oci_tar, docker_tar=docker_tar)


# --------------------------------------------------------------------------------- multi-layer


class _Layer:
    """A layer tar written member by member, with fixed times so that digests are stable."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = MTIME
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777, 0, 0)
        info.linkname = target
        self.tar.addfile(info)

    def hardlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = target
        self.tar.addfile(info)

    def whiteout(self, path: str) -> None:
        d, base = os.path.split(path)
        self.file(os.path.join(d, ".wh." + base), b"")

    def opaque(self, dirpath: str) -> None:
        self.file(os.path.join(dirpath, ".wh..wh..opq"), b"")

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def multi_layers() -> list[bytes]:
    """The three uncompressed layer tars of the multi-layer image."""
    one = _Layer()
    for d in ("a", "b", "etc", "opq", "opq/sub", "gonedir", "gonedir/deep", "keepdir"):
        one.dir(d)
    one.file("a/keep", b"keep v1\n")
    one.file("a/gone", b"to be whited out\n")
    one.file("opq/old", b"hidden by the opaque dir\n")
    one.file("opq/sub/old2", b"hidden too\n")
    one.file("gonedir/deep/f", b"the whole dir goes\n")
    one.file("keepdir/setuid", b"#!/bin/sh\n", mode=0o4755)
    one.file("keepdir/owned", b"owned by 1000\n", mode=0o600, uid=1000, gid=1000)
    one.file("etc/passwd", PASSWD.encode())
    one.file("etc/group", GROUP.encode())

    two = _Layer()
    two.dir("a")
    two.whiteout("a/gone")
    two.file("a/keep", b"keep v2, changed\n", mode=0o640, uid=7, gid=8)
    two.dir("opq", mode=0o750)
    two.opaque("opq")
    two.file("opq/new", b"only this is visible in opq\n")
    two.whiteout("gonedir")
    two.dir("b")
    two.file("b/file", b"hard-linked contents\n")
    two.hardlink("b/link", "b/file")
    two.symlink("b/rel", "../a/keep")
    two.symlink("b/abs", "/etc/passwd")
    two.dir("keepdir", mode=0o700, uid=1000, gid=1000)

    three = _Layer()
    three.dir("opq", mode=0o750)
    three.file("opq/three", b"layer three writes into the opaque dir\n")
    three.file("opq/x", b"two names, one inode\n", mode=0o600)
    three.hardlink("opq/x-link", "opq/x")
    three.dir("c")
    three.symlink("c/dangling", "/does/not/exist")
    return [one.bytes(), two.bytes(), three.bytes()]


def _blob(layout: str, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def build_multi(work: str, name: str = "docker.io/library/multi:latest") -> Image:
    layout = os.path.join(work, "multi-oci")
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    tars = multi_layers()
    layers = [
        _blob(layout, tars[0], MT_LAYER),
        _blob(layout, tars[1], MT_LAYER),
        _blob(layout, gzip.compress(tars[2], mtime=0), MT_LAYER_GZIP),
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
    }
    config_desc = _blob(layout, json.dumps(config, sort_keys=True).encode(), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layers}
    manifest_desc = _blob(layout, json.dumps(manifest, sort_keys=True).encode(), MT_MANIFEST)
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [manifest_desc]}, f)
    oci_tar = os.path.join(work, "multi-oci.tar")
    _tar_dir(layout, oci_tar)
    return Image(name=name, layout=layout, oci_tar=oci_tar)


# ---------------------------------------------------------------------------------------- users

# Users and groups for ``--user`` tests: alice is in staff and devs (and in her own group, which
# containerd leaves out of the supplementary groups); bob is in staff; app in audio; root in wheel.
USERS_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
    "bob:x:1001:1001:Bob:/home/bob:/bin/sh\n"
    "app:x:2000:2000:app:/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
USERS_GROUP = (
    "root:x:0:\n"
    "daemon:x:1:\n"
    "wheel:x:10:root\n"
    "audio:x:29:app\n"
    "staff:x:50:alice,bob\n"
    "alice:x:1000:alice\n"
    "bob:x:1001:\n"
    "app:x:2000:\n"
    "devs:x:3000:alice\n"
    "nogroup:x:65534:\n"
)
USERS_APPLETS = [*APPLETS, "grep"]


def users_layer() -> bytes:
    """One layer: busybox with its applets, and the users above. ``/etc/passwd`` is an absolute
    symlink to ``/lib/passwd``, as some images have it, so a reader must resolve it in the image."""
    layer = _Layer()
    for d, mode in (("bin", 0o755), ("etc", 0o755), ("lib", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        layer.dir(d, mode=mode)
    for d in ("proc", "sys", "dev", "home", "home/alice", "home/bob", "app"):
        layer.dir(d)
    with open(BUSYBOX, "rb") as f:
        layer.file("bin/busybox", f.read(), mode=0o755)
    for applet in USERS_APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("lib/passwd", USERS_PASSWD.encode())
    layer.symlink("etc/passwd", "/lib/passwd")
    layer.file("etc/group", USERS_GROUP.encode())
    return layer.bytes()


def build_users(work: str, name: str, user: str = "", layer: bytes | None = None) -> Image:
    """A one-layer image with :func:`users_layer`; ``user`` becomes its config's ``User``."""
    base = name.rsplit("/", 1)[-1].replace(":", "-")
    layout = os.path.join(work, f"{base}-oci")
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    tar = users_layer() if layer is None else layer
    cfg: dict[str, object] = {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}
    if user:
        cfg["User"] = user
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
        "history": [{"created_by": "users layer"}],
    }
    config_desc = _blob(layout, json.dumps(config, sort_keys=True).encode(), MT_CONFIG)
    layers = [_blob(layout, tar, MT_LAYER)]
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layers}
    manifest_desc = _blob(layout, json.dumps(manifest, sort_keys=True).encode(), MT_MANIFEST)
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [manifest_desc]}, f)
    oci_tar = os.path.join(work, f"{base}-oci.tar")
    _tar_dir(layout, oci_tar)
    return Image(name=name, layout=layout, oci_tar=oci_tar)


# --------------------------------------------------------------------------------------- cache

_cache: Images | None = None
_cache_dir: str | None = None


def get() -> Images:
    """Every test image, built on first use in a temp dir shared by the whole session."""
    global _cache, _cache_dir
    if _cache is None:
        _cache_dir = tempfile.mkdtemp(prefix="pyctr-images-", dir="/tmp")
        _cache = Images(busybox=build_busybox(_cache_dir), multi=build_multi(_cache_dir))
    return _cache


def discard() -> None:
    """Remove the built images (the session fixture calls this at the end)."""
    global _cache, _cache_dir
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)
    _cache = _cache_dir = None
