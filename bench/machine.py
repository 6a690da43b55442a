"""What the figures were measured on: the header of every report."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

from bench.harness import CTR, PYCTRD


def _first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc})"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0] if lines else ""


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _commit() -> str:
    """HEAD, marked when tracked files differ from it (read-only git calls: no index refresh)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = _first_line(["git", "-C", repo, "rev-parse", "HEAD"])
    try:
        dirty = (
            subprocess.run(["git", "-C", repo, "diff", "--quiet", "HEAD", "--"], timeout=30).returncode == 1
        )
    except OSError:
        dirty = False
    return f"{head} + local changes" if dirty else head


def describe() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        # nproc's answer: the CPUs this process may run on, which is what both daemons share.
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "memory": f"{_meminfo_total() / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyctrd": _first_line([PYCTRD, "--version"]),
        "containerd": _first_line(["containerd", "--version"]),
        "ctr": _first_line([CTR, "--version"]),
        "runc": _first_line(["runc", "--version"]),
        "commit": _commit(),
    }
