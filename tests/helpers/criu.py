"""Whether this host can checkpoint: criu installed, and ``criu check`` passing on this kernel."""

from __future__ import annotations

import functools
import subprocess

import pytest

from pyctr.api import binaries


@functools.cache
def unusable() -> str | None:
    """None when criu is installed and ``criu check`` passes, else why not. Debian 12's criu 3.17
    fails on 6.x kernels ("vdso: Unexpected rt vDSO area bounds"); criu 4.1 and later pass."""
    criu = binaries.criu()
    if criu is None:
        return "criu is not installed"
    r = subprocess.run([criu, "check"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`criu check` fails: {(r.stderr.strip().splitlines() or ['?'])[0]}"
    return None


needed = pytest.mark.skipif(unusable() is not None, reason=f"no working criu: {unusable()}")
