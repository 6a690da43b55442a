"""Point the venv's ``containerd-shim-pyrunc-v2`` at the shim venv's interpreter, when there is one.

``make`` builds ``.venv-shim`` on CPython 3.12 where the machine has it: 3.12's immortal objects
(PEP 683) stop the reference-count writes that make ~0.3 MiB of libpython's data private in every
forked shim on 3.11 (docs/benchmarks.md, session 7). The daemon stays on the main venv's
interpreter, which starts faster. pyctrd finds the shim script beside itself and starts shims
through a launcher run on the script's interpreter (``pyctr.daemon.runtime.shim.shim_interpreter``),
so rewriting the script's first line is the whole switch. pip rewrites the script on every install
of the main venv: ``make`` runs this after each. Idempotent; without a working shim venv the script
gets the main venv's interpreter back.

Usage: python hack/shim_python.py <shim venv>   (run with the main venv's python)
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = "containerd-shim-pyrunc-v2"


def usable(python: str) -> bool:
    """The shim venv's interpreter runs and imports the shim package."""
    if not os.access(python, os.X_OK):
        return False
    probe = subprocess.run([python, "-c", "import pyctr.shim.launcher"], capture_output=True)
    return probe.returncode == 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    shim_python = os.path.join(os.path.abspath(argv[1]), "bin", "python")
    script = os.path.join(os.path.dirname(sys.executable), SCRIPT)
    interpreter = shim_python if usable(shim_python) else sys.executable
    with open(script, "rb") as f:
        first, rest = f.readline(), f.read()
    line = f"#!{interpreter}\n".encode()
    if first != line:
        tmp = script + ".tmp"
        with open(tmp, "wb") as f:
            f.write(line + rest)
        os.chmod(tmp, os.stat(script).st_mode)
        os.replace(tmp, script)
    print(f"{SCRIPT} runs on {interpreter}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
