"""What the daemon imports before it can serve: the code for work that has not arrived stays out.

Start-up time is imports (docs/benchmarks.md, profiling note). Registry clients, layer (un)packing
and compression are loaded by the first pull, Apply or Diff, not by every daemon start; this test
keeps it so (aiohttp alone once cost ~165 ms of start-up).
"""

from __future__ import annotations

import subprocess
import sys

DEFERRED = ("aiohttp", "tarfile", "isal", "zstandard", "pyctr.snapshotter.layer", "pkgutil")


def test_start_up_leaves_out_what_the_first_request_needs() -> None:
    code = (
        "import sys\n"
        "import pyctr.daemon.main, pyctr.daemon.builtins, pyctr.daemon.daemon\n"
        f"print(' '.join(m for m in {DEFERRED!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
