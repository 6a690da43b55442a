"""pyctr content fetch-blob: one blob from a real registry on 127.0.0.1 into the content store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from tests.helpers import daemons, images
from tests.helpers.daemons import PYCTR
from tests.helpers.registry import Registry


def test_fetch_blob_stores_the_exact_bytes(
    pyctrd: daemons.Daemon, image_registry: Registry, built_images: images.Images
) -> None:
    layout = built_images.busybox.layout
    with open(os.path.join(layout, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(layout, "blobs", "sha256", manifest_digest.split(":")[1]), "rb") as f:
        config_digest = json.load(f)["config"]["digest"]
    # skopeo may re-encode the manifest on push, but never the config blob.
    with open(os.path.join(layout, "blobs", "sha256", config_digest.split(":")[1]), "rb") as f:
        config = f.read()
    repo = image_registry.ref("library/busybox").rsplit(":", 1)[0]
    base = [PYCTR, "-a", pyctrd.address, "-n", "fetch"]
    res = daemons.run(
        [*base, "content", "fetch-blob", repo, config_digest, "--label", "containerd.io/gc.root=t"]
    )
    assert res.returncode == 0, res.stderr
    got = subprocess.run([*base, "content", "get", config_digest], capture_output=True, timeout=30)
    assert got.returncode == 0 and got.stdout == config
    assert hashlib.sha256(got.stdout).hexdigest() == config_digest.split(":")[1]
    out = daemons.run([*base, "content", "ls", "-q"]).stdout.split()
    assert config_digest in out

    missing = "sha256:" + "0" * 64
    res = daemons.run([*base, "content", "fetch-blob", repo, missing])
    assert res.returncode == 1 and res.stderr.startswith("pyctr: ")
