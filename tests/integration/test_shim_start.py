"""How pyctrd starts its own shim: in-process through the launcher, or by exec'ing the binary.

The daemon runs the shim's ``start`` in-process when the shim's console script is its own (on its
interpreter, or installed beside it on the shim venv's, where the launcher then runs);
``PYCTR_SHIM_INPROCESS_START=0`` makes it exec the binary as for any other shim, and
``PYCTR_SHIM_LAUNCHER=0`` (no launcher) makes the in-process start give way to the binary, which then
serves from a fresh interpreter. All three must run containers the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator

import pytest

from pyctr.daemon.runtime import shim as runtime_shim
from tests.helpers import images
from tests.helpers.daemons import alive
from tests.helpers.streams import wait_for
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
        # The daemon itself spawned the launcher (a `start` process would have exited, leaving it to init),
        # on the shim script's interpreter, and the shim is its fork.
        assert launcher and _ppid(launcher) == env.d.proc.pid
        script = os.path.join(os.path.dirname(sys.executable), SHIM)
        wanted = os.path.realpath(_shebang(script))
        assert (
            os.path.realpath(f"/proc/{launcher}/exe") == os.path.realpath(f"/proc/{shim_pid}/exe") == wanted
        )
    elif mode == "exec":
        assert launcher and _ppid(launcher) != env.d.proc.pid
    else:
        assert not launcher
        assert _cmdline(shim_pid)[1:3] == ["-m", "pyctr.shim"]
    env.ok("tasks", "kill", "-s", "SIGKILL", "long")
    env.ok("tasks", "rm", "-f", "long")
    env.ok("containers", "rm", "long")
    assert "long" not in env.shims()


def test_only_our_own_shim_script_starts_in_process(tmp_path: str) -> None:
    installed = os.path.join(os.path.dirname(sys.executable), SHIM)  # the console script beside us
    # Its interpreter: ours, or the shim venv's that `make` pointed it at (hack/shim_python.py).
    assert runtime_shim.shim_interpreter(installed) == _shebang(installed)
    other = os.path.join(tmp_path, SHIM)
    with open(other, "w") as f:
        f.write("#!/usr/bin/python3-somewhere-else\n")
    assert runtime_shim.shim_interpreter(other) is None
    ours = os.path.join(tmp_path, "elsewhere", SHIM)  # elsewhere, but on our interpreter
    os.mkdir(os.path.dirname(ours))
    with open(ours, "w") as f:
        f.write(f"#!{sys.executable}\n")
    assert runtime_shim.shim_interpreter(ours) == sys.executable
    renamed = os.path.join(tmp_path, "containerd-shim-other-v2")
    shutil.copy(installed, renamed)
    assert runtime_shim.shim_interpreter(renamed) is None


def _shebang(path: str) -> str:
    with open(path) as f:
        return f.readline()[2:].split()[0]


def test_a_launcher_on_another_interpreter_is_replaced(tmp_path: str) -> None:
    """Each request names the interpreter its launcher must run on: a launcher on another one
    exits, and a new one on the requested interpreter forks the shim."""
    from pyctr.shim import launcher, start

    shim_python = os.path.join(os.path.dirname(os.path.dirname(sys.executable)) + "-shim", "bin", "python")
    if not os.access(shim_python, os.X_OK):
        pytest.skip("no shim venv (make builds one where CPython 3.12 is installed)")
    sockdir = os.path.join(tmp_path, "s")
    seen, shims = [], []
    try:
        for n, interpreter in enumerate((sys.executable, shim_python, sys.executable)):
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.path.join(tmp_path, f"shim-{n}.sock"))
            listener.listen(1)
            argv = start.server_argv("ns", f"c{n}", os.path.join(tmp_path, "nowhere.sock"), False)
            with listener:
                shims.append(
                    launcher.launch(sockdir, argv, str(tmp_path), listener.fileno(), interpreter=interpreter)
                )
            with open(os.path.join(sockdir, LAUNCHER_PID)) as f:
                pid = int(f.read())
            seen.append(
                (pid, os.path.realpath(f"/proc/{pid}/exe"), os.path.realpath(f"/proc/{shims[-1]}/exe"))
            )
    finally:
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError), open(os.path.join(sockdir, LAUNCHER_PID)) as f:
            os.kill(int(f.read()), signal.SIGTERM)
    ours, theirs = os.path.realpath(sys.executable), os.path.realpath(shim_python)
    assert [(exe, shim) for _, exe, shim in seen] == [(ours, ours), (theirs, theirs), (ours, ours)]
    assert len({pid for pid, _, _ in seen}) == 3  # each switch is a new launcher
    wait_for(lambda: not any(alive(pid) for pid, _, _ in seen[:2]), timeout=5)
