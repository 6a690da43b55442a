"""The runc driver: one method per runc command, run through the reaper.

Every call is ``runc --root <root> --log <bundle>/log.json --log-format json [--systemd-cgroup] <cmd>``
(what go-runc builds for the Go shim). ``NOTIFY_SOCKET`` is dropped from the environment so runc
does not talk to systemd on the container's behalf. runc logs its errors as JSON lines
``{"level": "error", "msg": ..., "time": ...}`` to ``log.json``; a failed command is reported with
the last error runc logged *during that command* (we remember the file size before it ran), else
with its output.

``create`` and ``exec`` get the container's stdio as their fds 0-2 (runc hands them to the process),
every other command gets a pipe that collects stdout and stderr together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence

from pyctr.api.binaries import find_binary
from pyctr.shim.reaper import Exit, Reaper


class RuncError(Exception):
    """runc exited non-zero; ``str()`` is runc's own last error message when it logged one."""

    def __init__(self, command: str, status: int, output: str, logged: str) -> None:
        self.command = command
        self.status = status
        self.output = output.strip()
        self.logged = logged
        super().__init__(self.text)

    @property
    def text(self) -> str:
        return self.logged or self.output or f"runc {self.command} exited with status {self.status}"


def runc_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


def command_line(
    command: str, root: str, log: str, systemd_cgroup: bool, criu: str, args: Sequence[str]
) -> list[str]:
    """``runc`` with the global flags go-runc passes, then ``args``; ``command`` is the resolved binary."""
    argv = [command, "--root", root, "--log", log, "--log-format", "json"]
    if criu:
        argv += ["--criu", criu]
    if systemd_cgroup:
        argv.append("--systemd-cgroup")
    return argv + list(args)


def log_size(log: str) -> int:
    try:
        return os.stat(log).st_size
    except OSError:
        return 0


def logged_error(log: str, since: int = 0) -> str:
    """The last ``level == "error"`` message runc wrote to ``log`` (log.json) after offset ``since``."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            data = f.read()
    except OSError:
        return ""
    message = ""
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "error":
            message = str(entry.get("msg", "")).strip()
    return message


class Runc:
    def __init__(
        self,
        reaper: Reaper,
        *,
        command: str = "runc",
        root: str,
        log: str,
        systemd_cgroup: bool = False,
        criu: str = "",
    ) -> None:
        self._reaper = reaper
        self.command = find_binary(command or "runc")
        self.root = root
        self.log = log
        self.systemd_cgroup = systemd_cgroup
        self.criu = criu

    def _argv(self, args: Sequence[str]) -> list[str]:
        return command_line(self.command, self.root, self.log, self.systemd_cgroup, self.criu, args)

    def _log_size(self) -> int:
        return log_size(self.log)

    def logged_error(self, since: int = 0) -> str:
        return logged_error(self.log, since)

    async def _run(
        self,
        args: Sequence[str],
        *,
        stdio: tuple[int, int, int] | None = None,
        stdin: bytes | None = None,
    ) -> bytes:
        loop = asyncio.get_running_loop()
        argv = self._argv(args)
        since = self._log_size()
        output = bytearray()
        if stdio is not None:
            exit = await self._spawn(args[0], argv, stdio)
        else:
            exit = await self._run_captured(loop, args[0], argv, stdin, output)
        if exit.status != 0:
            raise RuncError(args[0], exit.status, output.decode(errors="replace"), self.logged_error(since))
        return bytes(output)

    def _spawn(self, command: str, argv: list[str], stdio: tuple[int, int, int]) -> asyncio.Future[Exit]:
        try:
            _, fut = self._reaper.spawn(argv, env=runc_env(), stdio=stdio)
        except OSError as exc:
            # runc never ran (missing, not executable): a runc failure to callers, so Create reports
            # "OCI runtime create failed" and a failed exec still answers Wait; worded as Go's.
            raise RuncError(command, 127, f"fork/exec {argv[0]}: {exc.strerror}", "") from exc
        return fut

    async def _run_captured(
        self,
        loop: asyncio.AbstractEventLoop,
        command: str,
        argv: list[str],
        stdin: bytes | None,
        output: bytearray,
    ) -> Exit:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        if stdin is not None:
            # A memfd holds any amount of input without a writer task (update's resources JSON).
            in_fd = os.memfd_create("runc-stdin", os.MFD_CLOEXEC)
            os.write(in_fd, stdin)
            os.lseek(in_fd, 0, os.SEEK_SET)
        else:
            in_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fut = self._spawn(command, argv, (in_fd, w, w))
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
            os.close(in_fd)

        def drain() -> None:
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(r, 65536):
                    output.extend(chunk)
                # EOF: the pipe stays readable for good, and a level-triggered reader would run on
                # every loop round until the exit arrives, keeping the reaper thread from the GIL.
                loop.remove_reader(r)

        loop.add_reader(r, drain)
        try:
            return await fut
        finally:
            # No wait for EOF: a process runc left behind may still hold the write end.
            loop.remove_reader(r)
            drain()
            os.close(r)

    # -- commands ---------------------------------------------------------------------------------

    async def create(
        self,
        id: str,
        bundle: str,
        *,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str = "",
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._run([*args, id], stdio=stdio)

    async def exec(
        self,
        id: str,
        process_spec: dict[str, object],
        *,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        console_socket: str = "",
    ) -> None:
        # runc reads the process spec from a file; a memfd needs no cleanup and never touches disk.
        fd = os.memfd_create("runc-process", os.MFD_CLOEXEC)
        try:
            os.write(fd, json.dumps(process_spec).encode())
            args = ["exec", "--process", f"/proc/{os.getpid()}/fd/{fd}", "--detach", "--pid-file", pid_file]
            if console_socket:
                args += ["--console-socket", console_socket]
            await self._run([*args, id], stdio=stdio)
        finally:
            os.close(fd)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._run(["delete", *(["--force"] if force else []), id])

    async def ps(self, id: str) -> list[int]:
        out = await self._run(["ps", "--format", "json", id])
        pids = json.loads(out or b"null")
        return [int(p) for p in pids or ()]

    async def update(self, id: str, resources: bytes) -> None:
        await self._run(["update", "--resources", "-", id], stdin=resources)

    async def checkpoint(
        self,
        id: str,
        *,
        image_path: str,
        work_path: str,
        leave_running: bool,
        tcp: bool = False,
        unix_sockets: bool = False,
        terminal: bool = False,
        file_locks: bool = False,
        empty_namespaces: Sequence[str] = (),
    ) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        if leave_running:
            args.append("--leave-running")
        for flag, on in (
            ("--tcp-established", tcp),
            ("--ext-unix-sk", unix_sockets),
            ("--shell-job", terminal),
            ("--file-locks", file_locks),
        ):
            if on:
                args.append(flag)
        for ns in empty_namespaces:
            args += ["--empty-ns", ns]
        await self._run([*args, id])

    async def restore(
        self,
        id: str,
        bundle: str,
        *,
        image_path: str,
        work_path: str,
        pid_file: str,
        stdio: tuple[int, int, int] | None,
        parent_path: str = "",
        console_socket: str = "",
        no_pivot: bool = False,
    ) -> None:
        """``runc restore --detach``: the restored init is re-parented to the nearest subreaper (the
        keeper), as a created one is; ``-no-subreaper`` keeps runc from becoming one itself."""
        args = ["restore", "--image-path", image_path, "--work-path", work_path]
        if parent_path:
            args += ["--parent-path", parent_path]
        args += ["--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        args += ["-no-subreaper", "--bundle", bundle]
        await self._run([*args, id], stdio=stdio)
