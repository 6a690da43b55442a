"""Talking to one shim: starting it, its ttrpc task API, and cleaning up after it.

Start (as containerd 1.6 does it): run ``<shim> -namespace <ns> -address <grpc address>
-publish-binary <pyctrd> -id <id> start`` in the bundle, with ``TTRPC_ADDRESS`` in the
environment and the runtime options (a binary ``google.protobuf.Any``) on stdin. Its combined
output is the address to dial: ``unix:///path`` (or, as 1.7 shims print it, a JSON object with
``address``). A path without ``unix://`` is an abstract socket.

Our own shim, installed for the interpreter the daemon runs on, is started in-process instead: the
daemon runs :func:`pyctr.shim.start.start` in a thread, which has the shim launcher fork the serving
process exactly as the ``start`` action would. That saves a fresh interpreter (~60-90 ms of CPU) per
container; any other shim, or ours when no launcher is available, is exec'd as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import betterproto2

from pyctr.api import errdefs, namespaces, pbencode, ttrpc
from pyctr.api._pb.containerd.task import v2 as task
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.log import get_logger
from pyctr.daemon.runtime.bundle import Bundle

log = get_logger("pyctrd.runtime")

SERVICE = "containerd.task.v2.Task"
START_TIMEOUT = 30.0
DELETE_TIMEOUT = 5.0
M = TypeVar("M", bound=betterproto2.Message)


def parse_address(output: str) -> str:
    text = output.strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["address"])
        except (ValueError, KeyError) as exc:
            raise errdefs.Unknown(f"shim printed an unreadable address: {output!r}") from exc
    if not text:
        raise errdefs.Unknown("shim printed no address")
    return text


def dial_path(address: str) -> str:
    if address.startswith("unix://"):
        return address.removeprefix("unix://")
    return "\0" + address


OWN_SHIM = "containerd-shim-pyrunc-v2"


@functools.cache
def shim_interpreter(path: str) -> str | None:
    """The interpreter of our shim's console script at ``path`` when the daemon may start that shim
    in-process (through the launcher, run on that interpreter): the script names this daemon's
    interpreter, or it is installed beside it (``make`` may point it at a newer Python, whose shims
    cost less memory; see docs/architecture.md). None: exec the script, as any other shim."""
    if os.path.basename(path) != OWN_SHIM or os.environ.get("PYCTR_SHIM_INPROCESS_START", "1") == "0":
        return None
    try:
        with open(path, "rb") as f:
            head = f.readline(4096)
    except OSError:
        return None
    words = head[2:].split() if head.startswith(b"#!") else []
    if not words:
        return None
    interpreter = words[0].decode(errors="replace")
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        return interpreter
    if os.path.dirname(os.path.realpath(path)) == os.path.dirname(os.path.abspath(sys.executable)):
        return interpreter if os.access(interpreter, os.X_OK) else None
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class ShimBinary:
    def __init__(self, path: str, grpc_address: str, ttrpc_address: str, debug: bool = False) -> None:
        self.path = path
        self.grpc_address = grpc_address
        self.ttrpc_address = ttrpc_address
        self.debug = debug

    def _env(self, ns: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TTRPC_ADDRESS": self.ttrpc_address,
                "GRPC_ADDRESS": self.grpc_address,
                "NAMESPACE": ns,
                "MAX_SHIM_VERSION": "2",
                "GOMAXPROCS": "2",
            }
        )
        return env

    def _args(self, bundle: Bundle, action: str) -> list[str]:
        args = [
            self.path,
            "-namespace",
            bundle.namespace,
            "-address",
            self.grpc_address,
            "-publish-binary",
            sys.argv[0] if sys.argv and sys.argv[0] else "pyctrd",
            "-id",
            bundle.id,
        ]
        if action == "delete":
            args += ["-bundle", bundle.path]
        if self.debug:
            args.append("-debug")
        return [*args, action]

    async def start(self, bundle: Bundle, options: PbAny | None) -> str:
        stdin = bytes(options) if options is not None else b""
        interpreter = shim_interpreter(self.path)
        if interpreter is not None:
            address = await self._start_in_process(bundle, stdin, interpreter)
            if address:
                _write(os.path.join(bundle.path, "shim-binary-path"), self.path)
                return address
        args, env = self._args(bundle, "start"), self._env(bundle.namespace)

        def run() -> subprocess.CompletedProcess[bytes]:
            # A thread and close_fds, not the loop's subprocess support: the shim's server child
            # inherits every fd its parent did not mark close-on-exec, and one stray copy of the
            # output pipe would keep us waiting for EOF forever.
            return subprocess.run(
                args,
                cwd=bundle.path,
                env=env,
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,
                timeout=START_TIMEOUT,
            )

        try:
            proc = await asyncio.to_thread(run)
        except subprocess.TimeoutExpired:
            raise errdefs.DeadlineExceeded(f"shim {self.path} start timed out") from None
        text = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise errdefs.Unknown(f"failed to start shim: {text.strip()}: exit status {proc.returncode}")
        address = parse_address(text)
        _write(os.path.join(bundle.path, "shim-binary-path"), self.path)
        return address

    async def _start_in_process(self, bundle: Bundle, options: bytes, interpreter: str) -> str:
        """The ``start`` action without its process; "" when no launcher could fork the shim."""
        # Loaded by the first start: a restarted daemon reconnecting to its shims does not need it.
        from pyctr.shim import start as shim_start

        def run() -> str:
            return shim_start.start(
                namespace=bundle.namespace,
                id=bundle.id,
                address=self.grpc_address,
                bundle=bundle.path,
                env=self._env(bundle.namespace),
                options=options,
                debug=self.debug,
                exec_fallback=False,
                interpreter=interpreter,
            )

        try:
            return await asyncio.to_thread(run)
        except shim_start.NoLauncher as exc:
            log.info("shim launcher unavailable, exec'ing the shim", id=bundle.id, reason=str(exc))
            return ""
        except Exception as exc:
            raise errdefs.Unknown(f"failed to start shim: {OWN_SHIM} start: {exc}") from None

    async def delete(self, bundle: Bundle) -> task.DeleteResponse:
        """``shim delete``: clean up after a shim that is gone; returns the exit it reports."""
        args, env = self._args(bundle, "delete"), self._env(bundle.namespace)
        cwd = bundle.path if os.path.isdir(bundle.path) else "/"

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                close_fds=True,
                timeout=DELETE_TIMEOUT,
            )

        try:
            proc = await asyncio.to_thread(run)
        except subprocess.TimeoutExpired:
            raise errdefs.DeadlineExceeded("shim delete timed out") from None
        if proc.stderr.strip():
            log.warning("shim delete", id=bundle.id, stderr=proc.stderr.decode(errors="replace").strip())
        if proc.returncode != 0:
            raise errdefs.Unknown(f"shim delete failed: exit status {proc.returncode}")
        return task.DeleteResponse.parse(proc.stdout)


class ShimConnection:
    """The ttrpc task client of one shim; errors come back categorised."""

    def __init__(self, client: ttrpc.Client, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    @classmethod
    async def connect(
        cls, address: str, namespace: str, on_close: Callable[[], None] | None = None
    ) -> ShimConnection:
        client = await ttrpc.Client.connect(dial_path(address), on_close=on_close)
        return cls(client, namespace)

    # The timeout is not a local one: it travels to the shim as ttrpc's timeout_nano.
    async def call(
        self, method: str, request: betterproto2.Message, reply: type[M], timeout: float | None = None
    ) -> M:
        try:
            data = await self.client.call(
                SERVICE,
                method,
                pbencode.encode(request),
                metadata={namespaces.TTRPC_HEADER: self.namespace},
                timeout=timeout,
            )
        except ttrpc.TtrpcError as exc:
            raise errdefs.from_status(exc.code, exc.message) from None
        except (ttrpc.ConnectionClosed, ConnectionError) as exc:
            raise errdefs.Unavailable(f"ttrpc: closed: {exc}") from None
        return reply.parse(data)

    async def empty(self, method: str, request: betterproto2.Message, timeout: float | None = None) -> None:
        from pyctr.api._pb.google.protobuf import Empty

        await self.call(method, request, Empty, timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
