"""A busybox OCI image built offline from Debian's busybox-static, as an importable OCI archive.

Layout of the archive (the OCI image-layout spec, written by hand: no registry, no network)::

    oci-layout                  {"imageLayoutVersion": "1.0.0"}
    index.json                  one manifest, named by the ref annotations below
    blobs/sha256/<layer>        uncompressed tar: bin/busybox + one symlink per applet, tmp/, etc/passwd
    blobs/sha256/<config>       image config (rootfs.diff_ids = [layer digest], Cmd = ["sh"])
    blobs/sha256/<manifest>     image manifest pointing at both
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

BUSYBOX = "/bin/busybox"
IMAGE_NAME = "docker.io/pyctr/busybox:test"


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = int(time.time())
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def layer_tar() -> bytes:
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            _add(tar, d, type=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        with open(BUSYBOX, "rb") as f:
            _add(tar, "bin/busybox", f.read(), size=os.path.getsize(BUSYBOX), mode=0o755)
        for applet in applets:
            if applet != "busybox":
                _add(tar, f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        _add(tar, "etc/passwd", passwd, size=len(passwd), mode=0o644)
    return buf.getvalue()


def _blob(files: dict[str, bytes], data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    files[f"blobs/sha256/{digest}"] = data
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_archive(path: str, name: str = IMAGE_NAME) -> str:
    """Writes the OCI archive to ``path`` and returns the image name it carries."""
    files: dict[str, bytes] = {}
    layer = layer_tar()
    layer_desc = _blob(files, layer, "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = _blob(files, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = _blob(files, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
    }
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    with tarfile.open(path, "w") as tar:
        for name_, data in files.items():
            info = tarfile.TarInfo(name_)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return name
