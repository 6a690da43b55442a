"""How pyctrd starts its own shim: in-process through the launcher, or by exec'ing the binary.

The daemon runs the shim's ``start`` in-process when the shim's console script belongs to its own
interpreter; ``PYCTR_SHIM_INPROCESS_START=0`` makes it exec the binary as for any other shim, and
``PYCTR_SHIM_LAUNCHER=0`` (no launcher) makes the in-process start give way to the binary, which then
serves from a fresh interpreter. All three must run containers the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest

from pyctr.daemon.runtime import shim as runtime_shim
from tests.helpers import images
from tests.integration.test_restart import IMAGE, Env, running_env

SHIM = "containerd-shim-pyrunc-v2"
LAUNCHER_PID = "pyrunc-launcher.pid"


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def _launcher_pid(e: Env) -> int:
    path = os.path.join(e.d.state, "s", LAUNCHER_PID)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(f.read())


MODES = {
    "in-process": {},
    "exec": {"PYCTR_SHIM_INPROCESS_START": "0"},
    "no-launcher": {"PYCTR_SHIM_LAUNCHER": "0"},
}


@pytest.fixture(params=list(MODES))
def env(request: pytest.FixtureRequest, built_images: images.Images, ctr_bin: str) -> Iterator[Env]:
    with running_env(SHIM, built_images, ctr_bin, env=MODES[request.param]) as e:
        e.mode = request.param  # type: ignore[attr-defined]
        yield e


def test_each_start_path_runs_containers(env: Env) -> None:
    mode: str = env.mode  # type: ignore[attr-defined]
    r = env.ctr("run", "--rm", IMAGE, "once", "sh", "-c", "echo hi; exit 3")
    assert (r.returncode, r.stdout) == (3, "hi\n"), r.stderr
    env.ok("run", "-d", IMAGE, "long", "sleep", "60")
    shim_pid = env.shims()["long"]
    launcher = _launcher_pid(env)
    if mode == "in-process":
        # The daemon itself spawned the launcher (a `start` process would have exited, leaving it to init).
        assert launcher and _ppid(launcher) == env.d.proc.pid
    elif mode == "exec":
        assert launcher and _ppid(launcher) != env.d.proc.pid
    else:
        assert not launcher
        assert _cmdline(shim_pid)[1:3] == ["-m", "pyctr.shim"]
    env.ok("tasks", "kill", "-s", "SIGKILL", "long")
    env.ok("tasks", "rm", "-f", "long")
    env.ok("containers", "rm", "long")
    assert "long" not in env.shims()


def test_only_our_own_interpreter_starts_in_process(tmp_path: str) -> None:
    installed = os.path.join(os.path.dirname(sys.executable), SHIM)  # the console script beside us
    assert runtime_shim.same_interpreter(installed)
    other = os.path.join(tmp_path, SHIM)
    with open(other, "w") as f:
        f.write("#!/usr/bin/python3-somewhere-else\n")
    assert not runtime_shim.same_interpreter(other)
    renamed = os.path.join(tmp_path, "containerd-shim-other-v2")
    shutil.copy(installed, renamed)
    assert not runtime_shim.same_interpreter(renamed)
