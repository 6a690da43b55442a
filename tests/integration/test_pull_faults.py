"""A daemon killed in the middle of a pull: nothing half-unpacked is ever committed or visible.

The image has one big layer of many small files, so the kill lands during Diff.Apply. After a
restart the interrupted layer's chain ID is not a committed snapshot, the pull completes when
run again, and the unpacked tree is whole. Both clients: the real ctr (client-side pull) and
pyctr (the daemon pulls through the Transfer service).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.helpers import daemons, images
from tests.helpers.daemons import PYCTR
from tests.helpers.registry import Registry

NS = "pullfaults"
FILES = 10000  # Diff.Apply of them takes ~0.5 s on an idle 2-CPU machine, longer under load


@pytest.fixture(scope="module")
def big_image(image_registry: Registry) -> Iterator[tuple[str, str]]:
    """(reference, chain ID) of an image whose single layer holds FILES small files."""
    work = tempfile.mkdtemp(prefix="bigimg-", dir="/tmp")
    try:
        layout = os.path.join(work, "oci")
        os.makedirs(os.path.join(layout, "blobs", "sha256"))
        with open(os.path.join(layout, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        layer = images._Layer()
        for d in range(60):
            layer.dir(f"d{d}")
        for i in range(FILES):
            layer.file(f"d{i % 60}/f{i}", os.urandom(2048))
        tar = layer.bytes()
        diff_id = f"sha256:{hashlib.sha256(tar).hexdigest()}"
        layer_desc = images._blob(layout, gzip.compress(tar, compresslevel=1, mtime=0), images.MT_LAYER_GZIP)
        config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        config_desc = images._blob(layout, json.dumps(config).encode(), images.MT_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": images.MT_MANIFEST,
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = images._blob(layout, json.dumps(manifest).encode(), images.MT_MANIFEST)
        manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
        with open(os.path.join(layout, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [manifest_desc]}, f)
        yield image_registry.push(layout, "test/bigfiles"), diff_id
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ctr(d: daemons.Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return daemons.run(["ctr", "-a", d.address, "-n", NS, *args], timeout=timeout)


def committed(d: daemons.Daemon) -> list[str]:
    out = ctr(d, "snapshots", "ls").stdout.splitlines()[1:]
    return [line.split()[0] for line in out if line.split() and line.split()[-1] == "Committed"]


def kill_during_unpack(d: daemons.Daemon, cmd: list[str]) -> None:
    """Start a pull, wait until an extraction snapshot exists, then SIGKILL the daemon."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listing = ctr(d, "snapshots", "ls").stdout
            if "extract-" in listing:
                time.sleep(0.05)  # Diff.Apply of FILES files has begun and is far from done
                break
            if proc.poll() is not None:
                pytest.fail("the pull finished before it could be interrupted")
            time.sleep(0.05)
        else:
            pytest.fail("no extraction snapshot appeared")
        d.kill()
    finally:
        proc.kill()
        proc.wait(10)


def check_unpacked(d: daemons.Daemon, ref: str) -> None:
    target = tempfile.mkdtemp(prefix="bigmnt-", dir="/tmp")
    try:
        res = ctr(d, "images", "mount", ref, target)
        assert res.returncode == 0, res.stderr
        try:
            count = sum(len(files) for _, _, files in os.walk(target))
            assert count == FILES
        finally:
            ctr(d, "images", "unmount", "--rm", target)
    finally:
        os.rmdir(target)


@pytest.mark.parametrize("client", ["ctr", "pyctr"])
def test_sigkill_during_unpack_then_pull_again(big_image: tuple[str, str], client: str) -> None:
    ref, chain = big_image
    d = daemons.start_pyctrd()
    try:
        if client == "ctr":
            cmd = ["ctr", "-a", d.address, "-n", NS, "images", "pull", "--plain-http", ref]
        else:
            cmd = [PYCTR, "-a", d.address, "-n", NS, "images", "pull", "--plain", ref]
        kill_during_unpack(d, cmd)
        daemons.restart(d)
        assert chain not in committed(d), "a half-applied layer was committed"
        if client == "pyctr":
            # The daemon records the image only once everything is stored and unpacked.
            assert ref not in ctr(d, "images", "ls", "-q").stdout
        again = daemons.run(cmd, timeout=120)
        assert again.returncode == 0, again.stderr
        assert chain in committed(d)
        check_unpacked(d, ref)
    finally:
        daemons.cleanup(d)
