"""Fixture images in a private registry, built offline on first use.

* ``busybox``: one layer with Debian's busybox-static and its applet links; ``CMD /bin/sh``.
* ``big``: about 200 MB compressed over six layers: a busybox base, one layer of 20,000 small
  files (the unpack-bound case) and four layers of incompressible data (the transfer-bound case).

Built with ``umoci`` into OCI layouts, pushed with ``skopeo`` to ``docker-registry`` listening on
127.0.0.1 (plain HTTP, so pulls need ``--plain-http``). Layouts and registry storage live in the
run's temp dir on the root filesystem, away from the loop filesystem the daemons are measured on.
Nothing is built unless a figure asks for it: a run with only quick figures starts no registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench import proc

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
REPO = "bench"
SMALL_FILES = 20_000
SMALL_FILE_BYTES = 1024
BLOB_LAYERS = 4
BLOB_LAYER_BYTES = 44 * 1024 * 1024

_REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


@dataclass(frozen=True)
class FixtureImage:
    name: str
    ref: str  # what `ctr images pull --plain-http` takes
    compressed_bytes: int
    layers: int


class Registry:
    """``docker-registry`` on a free loopback port, config and storage in ``workdir``."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        os.makedirs(os.path.join(self.workdir, "storage"), exist_ok=True)
        self.port = proc.free_tcp_port()
        config = os.path.join(self.workdir, "config.yml")
        with open(config, "w") as f:
            f.write(_REGISTRY_CONFIG.format(storage=os.path.join(self.workdir, "storage"), port=self.port))
        p = proc.spawn(["docker-registry", "serve", config], os.path.join(self.workdir, "registry.log"))
        self._proc = p

        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"docker-registry exited {p.returncode}; see {self.workdir}/registry.log")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        proc.wait_until(up, 20.0, interval=0.05, what="docker-registry")

    def stop(self) -> None:
        if self._proc is not None:
            proc.stop(self._proc)
            self._proc = None


class Fixtures:
    """Lazily built images, keyed by name; ``close`` stops the registry."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.layout = os.path.join(workdir, "fixtures", "oci")
        self.registry: Registry | None = None
        self._images: dict[str, FixtureImage] = {}

    def image(self, name: str) -> FixtureImage:
        if name not in self._images:
            if self.registry is None:
                self.registry = Registry(os.path.join(self.workdir, "registry"))
                self.registry.start()
            builders = {"busybox": self._build_busybox, "big": self._build_big}
            if name not in builders:
                raise KeyError(f"no fixture image {name!r}")
            t0 = time.monotonic()
            builders[name]()
            self._images[name] = self._push(name)
            img = self._images[name]
            mb = img.compressed_bytes / 1e6
            print(
                f"bench: fixture {img.ref}: {img.layers} layers, {mb:.1f} MB ({time.monotonic() - t0:.1f} s)"
            )
        return self._images[name]

    def close(self) -> None:
        if self.registry is not None:
            self.registry.stop()

    # -- building -------------------------------------------------------------------------------

    def _umoci(self, *args: str) -> None:
        proc.run(["umoci", *args], timeout=900)

    def _new(self, tag: str) -> str:
        if not os.path.exists(os.path.join(self.layout, "index.json")):
            os.makedirs(os.path.dirname(self.layout), exist_ok=True)
            self._umoci("init", "--layout", self.layout)
        image = f"{self.layout}:{tag}"
        self._umoci("new", "--image", image)
        return image

    def _busybox_tree(self, root: str) -> None:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        os.chmod(os.path.join(root, "tmp"), 0o1777)
        shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
        for applet in proc.run([BUSYBOX, "--list"]).stdout.split():
            link = os.path.join(root, "bin", applet)
            if not os.path.lexists(link):
                os.symlink("busybox", link)
        with open(os.path.join(root, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        with open(os.path.join(root, "etc", "group"), "w") as f:
            f.write("root:x:0:\n")

    def _unpack(self, image: str) -> tuple[str, str]:
        """An unpacked bundle of ``image``: each ``_repack`` then adds one layer with what changed.

        (unpack/repack rather than ``umoci insert``, whose layers carry an absolute "/" entry.)
        """
        bundle = os.path.join(self.workdir, "fixtures", "bundle-" + image.rsplit(":", 1)[1])
        shutil.rmtree(bundle, ignore_errors=True)
        self._umoci("unpack", "--image", image, bundle)
        return bundle, os.path.join(bundle, "rootfs")

    def _repack(self, image: str, bundle: str) -> None:
        self._umoci("repack", "--refresh-bundle", "--image", image, bundle)

    def _finish(self, image: str, bundle: str) -> None:
        self._umoci(
            "config",
            "--image",
            image,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "--os",
            "linux",
            "--architecture",
            "amd64",
        )
        shutil.rmtree(bundle, ignore_errors=True)

    def _build_busybox(self) -> None:
        image = self._new("busybox")
        bundle, rootfs = self._unpack(image)
        self._busybox_tree(rootfs)
        self._repack(image, bundle)
        self._finish(image, bundle)

    def _build_big(self) -> None:
        image = self._new("big")
        bundle, rootfs = self._unpack(image)
        self._busybox_tree(rootfs)
        self._repack(image, bundle)
        # 20,000 files in 100 directories: the layer that stresses untar and metadata, not bandwidth.
        for i in range(SMALL_FILES):
            d = os.path.join(rootfs, "data", "small", f"d{i // 200:03d}")
            if i % 200 == 0:
                os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
                f.write(os.urandom(SMALL_FILE_BYTES))
        self._repack(image, bundle)
        for k in range(BLOB_LAYERS):
            os.makedirs(os.path.join(rootfs, "data", f"blob{k}"))
            # Random bytes do not compress, so the compressed size is what goes over the wire.
            with open(os.path.join(rootfs, "data", f"blob{k}", "data.bin"), "wb") as f:
                for _ in range(BLOB_LAYER_BYTES // (1 << 20)):
                    f.write(os.urandom(1 << 20))
            self._repack(image, bundle)
        self._finish(image, bundle)

    def _push(self, name: str) -> FixtureImage:
        assert self.registry is not None
        ref = f"{self.registry.host}/{REPO}/{name}:latest"
        proc.run(
            ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{self.layout}:{name}", f"docker://{ref}"],
            timeout=900,
        )
        manifest = self._manifest(name)
        layers = manifest["layers"]
        size = sum(int(layer["size"]) for layer in layers) + int(manifest["config"]["size"])
        return FixtureImage(name, ref, size, len(layers))

    def _manifest(self, tag: str) -> dict[str, Any]:
        with open(os.path.join(self.layout, "index.json")) as f:
            index = json.load(f)
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                algo, hexd = m["digest"].split(":", 1)
                with open(os.path.join(self.layout, "blobs", algo, hexd)) as f:
                    return dict(json.load(f))
        raise KeyError(f"tag {tag} not in {self.layout}")
