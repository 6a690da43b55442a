"""The snapshotter conformance suite against overlayfs and native, on real mounts (root)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile

import pytest

from pyctr.snapshotter import native, overlay, testsuite

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

KINDS = {"overlayfs": overlay.OverlaySnapshotter, "native": native.NativeSnapshotter}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(testsuite.CASES))
def test_conformance(kind: str, name: str) -> None:
    base = tempfile.mkdtemp(prefix="snaptest-", dir="/tmp")

    async def run() -> None:
        sn = await KINDS[kind].create(os.path.join(base, "root"))
        try:
            await testsuite.CASES[name](sn, os.path.join(base, "scratch"))
        finally:
            await sn.close()

    try:
        asyncio.run(run())
    finally:
        # A failed case may leave a mount behind; never leave one for the next test.
        with open("/proc/self/mountinfo") as f:
            stale = [line.split()[4] for line in f if base in line.split()[4]]
        for target in reversed(stale):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(base, ignore_errors=True)
