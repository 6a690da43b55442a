"""``pyctr images push`` of what the registry already has: reported as "exists", not uploaded.

The daemon asks the registry first (HEAD on the blob, and on the manifest under its tag); the
wire event is containerd's "already exists", which pyctr shows as "exists" in plain lines and
in the bars on a terminal. A tag the registry does not have yet is pushed even when the
manifest's blobs are all there.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import subprocess
import time

from tests.helpers import daemons, images
from tests.helpers.registry import Registry


def pyctr(d: daemons.Daemon, *args: str) -> str:
    r = daemons.run([daemons.PYCTR, "-a", d.address, "-n", "push", *args], timeout=60)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def events(out: str) -> dict[str, str]:
    """digest prefix -> the last event shown for it, from plain progress lines."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([a-z ]+): (sha256:[0-9a-f]{12})", line.strip())
        if m:
            found[m.group(2)] = m.group(1)
    return found


def run_on_terminal(cmd: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``cmd`` with a pty as stdout (so pyctr draws bars); its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: pyctr is gone
                break
            if not chunk:
                break
            seen += chunk
        return proc.wait(30), seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_push_twice_reports_exists(
    pyctrd: daemons.Daemon, image_registry: Registry, built_images: images.Images
) -> None:
    bb = built_images.busybox
    pyctr(pyctrd, "images", "import", "--no-unpack", "--base-name", bb.base_name, bb.oci_tar)
    doc = json.loads(pyctr(pyctrd, "images", "inspect", bb.name))
    manifest = doc["target"]["digest"][:19]
    blobs = [d["digest"][:19] for d in [doc["manifest"]["config"], *doc["manifest"]["layers"]]]
    dest = image_registry.ref("twice/busybox", "v1")

    first = events(pyctr(pyctrd, "images", "push", "--plain", dest, bb.name))
    assert first == dict.fromkeys([*blobs, manifest], "complete"), first

    second = events(pyctr(pyctrd, "images", "push", "--plain", dest, bb.name))
    assert second == dict.fromkeys([*blobs, manifest], "exists"), second

    # A new tag: the blobs are there, the manifest is not under that tag yet.
    other = image_registry.ref("twice/busybox", "v2")
    third = events(pyctr(pyctrd, "images", "push", "--plain", other, bb.name))
    assert third == {**dict.fromkeys(blobs, "exists"), manifest: "complete"}, third
    raw = daemons.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{other}"])
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == doc["target"]["digest"]

    # On a terminal: the bars of existing blobs are full and say so.
    code, shown = run_on_terminal(
        [daemons.PYCTR, "-a", pyctrd.address, "-n", "push", "images", "push", dest, bb.name]
    )
    assert code == 0, shown
    for digest in [*blobs, manifest]:
        short = digest[7:19]
        assert re.search(rf"{short}  exists +\|\++\|", shown), shown
