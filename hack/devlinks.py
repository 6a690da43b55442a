"""Point the venv's editable install of pyctr at a tree of directory links.

setuptools maps ``pyctr.api`` → ``api/`` (and the other four folders) for an editable install with
an import hook that every Python process loads from a ``.pth`` file at start-up: it imports
``pathlib``, ``importlib.util`` and more before the first line of pyctr runs, ~20-40 ms per process
(each ``pyctr`` command, each ``pyctrd`` start). A wheel install has no hook. This gives the
development venv the same shape: ``<venv>/pyctr-src/pyctr/<sub>`` are links to the source folders
and the ``.pth`` file names that directory, so imports are plain path lookups and edits (new files
included) are seen at once. Run by ``make`` after ``pip install -e``; idempotent.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

SUBPACKAGES = ("api", "daemon", "snapshotter", "shim", "ctr")


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    site = Path(sysconfig.get_paths()["purelib"])
    pths = sorted(site.glob("__editable__.pyctr-*.pth"))
    if not pths:
        print("devlinks: no editable install of pyctr in", site, file=sys.stderr)
        return 1
    tree = Path(sys.prefix) / "pyctr-src"
    pkg = tree / "pyctr"
    pkg.mkdir(parents=True, exist_ok=True)
    for sub in SUBPACKAGES:
        link = pkg / sub
        target = repo / sub
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    for pth in pths:
        pth.write_text(f"{tree}\n")
    for finder in site.glob("__editable___pyctr_*_finder.py"):
        finder.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
