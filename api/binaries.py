"""Finding the helper programs the daemon and the shim run (runc, criu), as the Go shim does."""

from __future__ import annotations

import os
import shutil

# Debian installs runc and criu in sbin directories, which a daemon's PATH may lack.
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_binary(name: str) -> str:
    """``name`` looked up on PATH and then the sbin directories; returned as is when not found."""
    if os.sep in name:
        return name
    path = os.environ.get("PATH", "")
    found = shutil.which(name, path=f"{path}:{_SBIN_PATH}" if path else _SBIN_PATH)
    return found or name


def criu(configured: str = "") -> str | None:
    """The criu to use: ``configured`` (runc Options' ``criu_path``), else criu on PATH or in the
    sbin directories; None when that is not an executable file."""
    path = configured or find_binary("criu")
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None
