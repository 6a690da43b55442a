"""The launcher: a warm, import-complete process that forks serving shims, so they share its memory.

Why: a fresh interpreter with the shim's imports costs ~20 MiB of private memory (USS) per
container; a fork of a process that already imported everything (then ``gc.freeze()``, so
collections do not touch the inherited objects) shares those pages copy-on-write. Measured with 10
containers under containerd 1.6: exec'd shims USS 20.4 / PSS 21.0 MiB each, forked shims USS 6.6 /
PSS 8.2 MiB (4 MiB idle before Create; refcounts and bytecode specialisation dirty the rest), the Go
shim 2.4 MiB. Forked shims show the launcher's command line in ``ps`` (their comm is ``pyrunc-shim``).

How, per daemon (one launcher per shim socket directory, ``<dir>/pyrunc-launcher.sock``):

* ``start`` connects to the launcher socket. When nobody listens, it takes ``pyrunc-launcher.lock``,
  binds the socket itself and spawns ``python -m pyctr.shim.launcher`` with the bound socket as
  fd 3 (so concurrent starts simply queue on the backlog). The launcher writes
  ``pyrunc-launcher.pid`` and removes it (and its socket) when it exits.
* Request (one SOCK_SEQPACKET message): JSON ``{"argv", "cwd", "python"}``, a newline, the environment as
  sorted ``KEY=VALUE`` strings joined by NUL bytes, and the shim's listening socket as SCM_RIGHTS.
  The launcher compares the environment with its own as one byte string; a shim that differs (a
  request from another namespace, say) is handed only the variables to set and to unset.
  Reply: ``{"pid": N}`` or ``{"error": "..."}``; ``"stale"`` means the code on disk changed since
  the launcher started, or ``python`` is not the interpreter it runs on (it exits, and ``start``
  spawns a new one on that interpreter).
* The launcher forks the shim (a bare ``fork(2)``, see :func:`_bare_fork`), which calls ``setsid``.
  The shim is the launcher's child while the launcher lives (SIGCHLD is ignored there, so the
  kernel reaps a shim that exits) and is re-parented to init or the nearest subreaper when the
  launcher exits. The shim chdirs to the bundle, takes the requested environment, puts the listener
  on fd 3 and /dev/null on 0-2, and runs :func:`pyctr.shim.server.serve`.
* The launcher is single-threaded and never runs an event loop, so forking it is safe. It exits after
  ``PYCTR_SHIM_LAUNCHER_IDLE`` seconds (default 600) without a request; shims it forked keep sharing
  pages with each other after it is gone.

Anything going wrong raises :class:`Unavailable`, and ``start`` falls back to a fresh interpreter.
"""

from __future__ import annotations

import _signal
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

SOCKET_NAME = "pyrunc-launcher.sock"
LOCK_NAME = "pyrunc-launcher.lock"
PID_NAME = "pyrunc-launcher.pid"
_REQUEST_MAX = 1 << 20
_UCRED = struct.Struct("3i")


class Unavailable(Exception):
    """No launcher could fork the shim; the caller starts a fresh interpreter instead."""


# -- client side (runs in `start`) ----------------------------------------------------------------


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def spawn_detached(argv: list[str], fd3: int, env: Mapping[str, str] | None = None) -> int:
    """Starts ``argv`` in its own session with ``fd3`` as its fd 3 and /dev/null as stdio.

    posix_spawn remaps fds in the child only: ``start`` keeps its own fds (its fd 3 is usually the
    shim's listener) untouched, and needs no preexec_fn.
    """
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    actions.append((os.POSIX_SPAWN_DUP2, fd3, 3))
    return os.posix_spawn(
        argv[0], argv, os.environ if env is None else env, file_actions=actions, setsid=True
    )


def _spawn_launcher(sockdir: str, path: str, env: Mapping[str, str], interpreter: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        pid = spawn_detached([interpreter, "-m", "pyctr.shim.launcher", sockdir], listener.fileno(), env)
    finally:
        listener.close()
    # The launcher is our child until we exit: reap it if it leaves first (a `start` process is gone
    # long before; the daemon, starting its shims in-process, lives on).
    threading.Thread(target=_reap, args=(pid,), name="launcher-reaper", daemon=True).start()
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/oom_score_adj", "w") as f, open("/proc/self/oom_score_adj") as own:
            f.write(str(min(int(own.read().strip()) + 1, 1000)))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _connect_or_spawn(
    sockdir: str, timeout: float, env: Mapping[str, str], interpreter: str
) -> socket.socket:
    path = os.path.join(sockdir, SOCKET_NAME)
    try:
        return _connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    os.makedirs(sockdir, mode=0o700, exist_ok=True)
    with open(os.path.join(sockdir, LOCK_NAME), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _connect(path, timeout)  # another start spawned it while we waited for the lock
        except (FileNotFoundError, ConnectionRefusedError):
            _spawn_launcher(sockdir, path, env, interpreter)
        return _connect(path, timeout)


def launch(
    sockdir: str,
    argv: list[str],
    cwd: str,
    listener_fd: int,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    interpreter: str = "",
) -> int:
    """Has the launcher of ``sockdir`` fork a shim serving ``listener_fd`` with ``env`` (default: ours)
    in ``cwd``; returns the shim's pid. The launcher runs on ``interpreter`` (default: ours): one on
    another is replaced."""
    env = os.environ if env is None else env
    interpreter = interpreter or sys.executable
    head = {"argv": argv, "cwd": cwd, "python": interpreter}
    request = json.dumps(head).encode() + b"\n" + environment_block(env)
    try:
        for _ in range(2):
            with _connect_or_spawn(sockdir, timeout, env, interpreter) as conn:
                socket.send_fds(conn, [request], [listener_fd])
                reply = json.loads(conn.recv(65536) or b"{}")
            if reply.get("pid"):
                return int(reply["pid"])
            if reply.get("error") != "stale":
                raise Unavailable(f"launcher: {reply.get('error', 'no reply')}")
            # The old launcher removed its socket before answering: the retry spawns a new one.
    except (OSError, ValueError) as exc:
        raise Unavailable(f"launcher: {exc}") from exc
    raise Unavailable("launcher: keeps answering stale")


# -- server side (python -m pyctr.shim.launcher <sockdir>) ------------------------------------------


def _source_dirs() -> tuple[str, ...]:
    """The shim's and the api's source trees: what a forked shim runs."""
    import pyctr.api
    import pyctr.shim

    return tuple(os.path.dirname(package.__file__ or "") for package in (pyctr.shim, pyctr.api))


def _fingerprint(tops: Sequence[str]) -> str:
    """Changes when any module under ``tops`` changes on disk: a launcher must not fork old code."""
    digest = hashlib.sha256()
    for top in tops:
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in ("_pb", "__pycache__"))
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(dirpath, name))
                    digest.update(f"{dirpath}/{name}:{st.st_mtime_ns}:{st.st_size};".encode())
    return digest.hexdigest()


def _peer_uid(conn: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def environment_block(env: Mapping[str, str]) -> bytes:
    """``env`` as one byte string in a fixed order, so that equal environments are equal bytes."""
    return b"\0".join(
        f"{key}={value}".encode("utf-8", "surrogateescape") for key, value in sorted(env.items())
    )


class _Environment:
    """The launcher's own environment, which nearly every request repeats byte for byte.

    Why compare whole blocks: decoding a request's environment into a few dozen strings, and having
    the shim compare each with ``os.environ``, wrote pages all over the launcher's heap (new objects
    land in whatever free blocks its pools have; a page the launcher writes while a shim shares it
    becomes that shim's private copy): ~0.15 MiB of private memory per shim.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.block = environment_block(env)
        self.values = dict(env)

    def changes(self, block: bytes) -> tuple[dict[str, str], list[str]] | None:
        """The variables a shim must set and unset to have ``block`` as its environment, or None."""
        if block == self.block:
            return None
        wanted = {}
        for item in filter(None, block.split(b"\0")):
            key, sep, value = item.decode("utf-8", "surrogateescape").partition("=")
            if not key or not sep:
                raise ValueError(f"bad environment entry {item[:40]!r}")
            wanted[key] = value
        return {k: v for k, v in wanted.items() if self.values.get(k) != v}, [
            k for k in self.values if k not in wanted
        ]


def _take_environment(changes: tuple[dict[str, str], list[str]] | None) -> None:
    """Applies what :meth:`_Environment.changes` found: only the variables that differ. Rewriting
    all of them (clear + update) cost every shim ~0.9 MiB of private memory (libc's environ and
    the os.environ mapping are copied page by page)."""
    if changes is None:
        return
    values, unset = changes
    for key in unset:
        os.environ.pop(key, None)
    for key, value in values.items():
        os.environ[key] = value


def _become_shim(request: dict[str, Any], listen_fd: int, close: list[socket.socket]) -> None:
    """In the forked shim: drop the launcher's sockets, take the request's cwd/env/fds, serve."""
    for sock in close:
        sock.close()
    os.chdir(request["cwd"])
    _take_environment(request["env"])
    if listen_fd != 3:
        os.dup2(listen_fd, 3)
        os.close(listen_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    from pyctr.shim.__main__ import main

    sys.argv = [sys.argv[0], *request["argv"]]
    main(list(request["argv"]))


def _bare_fork() -> int:
    """fork(2) without CPython's at-fork work (PyOS_AfterFork_Child and the registered hooks).

    Why: that work (threading's and logging's fresh locks, random's reseed, the runtime's re-init)
    writes pages the shim would otherwise share with the launcher: ~650 KiB in a child that does
    nothing else, ~300 KiB less private memory per serving shim (docs/benchmarks.md). It exists
    for processes with other threads; the launcher has none, so its child is already consistent:
    same thread ident, no lock held, the GIL held by the only thread. Called through
    ``ctypes.PyDLL``, which keeps the GIL held across the call. Workers, forked by the keeper (which
    runs no thread either, but whose workers start one) keep ``os.fork``.
    """
    pid = int(_bare_fork_function()())
    if pid < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


_libc_fork: Any = None
_SIGCHLD = int(signal.SIGCHLD)


def _bare_fork_function() -> Any:
    """libc's fork through ctypes, looked up once (at launcher start, before the heap is frozen)."""
    global _libc_fork
    if _libc_fork is None:
        import ctypes

        _libc_fork = ctypes.PyDLL(None, use_errno=True).fork
        _libc_fork.restype = ctypes.c_int
        _libc_fork.argtypes = ()
    return _libc_fork


def _fork_shim(request: dict[str, Any], listen_fd: int, close: list[socket.socket]) -> int:
    """Forks the shim (in a session of its own) and returns its pid at once.

    One fork, not the classic two: the shim stays our child while we live, and the kernel reaps it
    when it exits (SIGCHLD is ignored here, see :func:`serve_launcher`). A second fork would copy
    the launcher's page tables again and make us wait for the middle process (~1.5 ms per shim).
    """
    if threading.active_count() > 1:  # never expected: then only the full fork is safe
        fork = os.fork
    else:
        fork = _bare_fork
    pid = fork()
    if pid == 0:
        try:
            _signal.signal(_SIGCHLD, _signal.SIG_DFL)  # ours is SIG_IGN; the keeper reaps its own
            os.setsid()
            _become_shim(request, listen_fd, close)
        finally:
            os._exit(1)
    return pid


class _Socket:
    """The launcher's listening socket and the file naming it, removed only while still ours."""

    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        self.inode = os.stat(path).st_ino if os.path.exists(path) else -1

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:  # a newer launcher may have replaced it
                os.unlink(self.path)
        self.listener.close()


class _Freshness:
    """Whether the code on disk is still the code this launcher imported.

    Walking the sources costs over a millisecond, on the path of every container create: it is done
    at most once per ``interval`` seconds, so a launcher notices new code within that time.
    """

    def __init__(self, tops: Sequence[str], interval: float = 1.0) -> None:
        self.tops = tuple(tops)
        self.fingerprint = _fingerprint(self.tops)
        self.interval = interval
        self._checked = time.monotonic()

    def stale(self) -> bool:
        now = time.monotonic()
        if now - self._checked < self.interval:
            return False
        self._checked = now
        return _fingerprint(self.tops) != self.fingerprint


def _parse_request(msg: bytes, own: _Environment) -> dict[str, Any]:
    """argv and cwd, and the environment as changes to ours (``"env"``; None when it is ours)."""
    head, sep, block = msg.partition(b"\n")
    request = json.loads(head)
    if not sep or not isinstance(request, dict) or not isinstance(request.get("argv"), list):
        raise ValueError("a request is JSON {argv, cwd}, a newline and the environment")
    if not isinstance(request.get("cwd"), str):
        raise ValueError("a request needs a cwd")
    request["env"] = own.changes(block)
    return request


def _handle(conn: socket.socket, sock: _Socket, freshness: _Freshness, own: _Environment) -> bool:
    """Serves one request; returns False when the launcher must exit (stale code, or a request for
    a launcher on another interpreter)."""
    conn.settimeout(10)
    fds: list[int] = []
    try:
        if _peer_uid(conn) != os.geteuid():
            return True
        msg, fds, _, _ = socket.recv_fds(conn, _REQUEST_MAX, 4)
        request = _parse_request(msg, own)
        del msg  # freed before the fork, not in the shim's lifetime
        wanted = request.get("python")
        if freshness.stale() or (wanted and os.path.abspath(wanted) != os.path.abspath(sys.executable)):
            # Gone before the answer: the client's retry must find no socket and spawn a new launcher.
            sock.release()
            conn.send(b'{"error": "stale"}')
            return False
        if len(fds) != 1:
            conn.send(b'{"error": "expected one listening socket"}')
            return True
        pid = _fork_shim(request, fds[0], [sock.listener, conn])
        conn.send(b'{"pid": %d}' % pid)
    except (OSError, ValueError, KeyError) as exc:
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"error": str(exc)}).encode())
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    return True


def _limit_malloc_arenas() -> None:
    """One glibc malloc arena for all threads: a shim's reaper and helper threads would otherwise each
    get an arena of their own, and every arena's first pages are private memory in every shim."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def _trim_malloc() -> None:
    """Gives the free pages inside glibc's heap back to the kernel (``malloc_trim(0)``).

    Large objects freed during imports and warm-up leave free chunks whose pages stay resident:
    every shim maps them, and a share of them counts in each shim's PSS (~0.7 MiB here). A shim
    that later allocates there faults in a fresh page instead of copying one: the same cost.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _warm_up() -> None:
    """Runs what every shim runs once, so the lazily built state is shared instead of rebuilt per shim.

    Measured per forked shim (private memory): importing ``pyctr.shim.__main__`` after the fork cost
    3 MiB, the first log line 0.8 MiB; betterproto2 builds per-class metadata on first use.
    """
    import logging

    import betterproto2

    import pyctr.shim.__main__  # noqa: F401
    from pyctr.api import mount
    from pyctr.api._pb.containerd import events
    from pyctr.api._pb.containerd.runc import v1 as runc_v1
    from pyctr.api._pb.containerd.task import v2 as task_v2
    from pyctr.shim import keeper, server

    # The messages the workers decode and encode (the keeper itself hand-encodes with pblite).
    for module in (task_v2, events, runc_v1):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, betterproto2.Message)
                and value.__module__ == module.__name__
            ):
                with contextlib.suppress(Exception):
                    value.parse(bytes(value()))
    mount.libc()  # typed once here: a lookup after the fork would cost every shim private pages
    server.setup_logging(False)
    logging.getLogger("pyctr.shim").info("launcher warm-up")  # fd 2 is /dev/null here
    for failure in keeper.warm_up():
        logging.getLogger("pyctr.shim").warning("launcher warm-up: %s", failure)


# Objects that fill the free blocks of the launcher's pymalloc pools; never freed (see below).
_BALLAST: list[object] = []


def _free_blocks() -> dict[int, int]:
    """pymalloc's free blocks per size class, from ``sys._debugmallocstats`` (it prints to fd 2)."""
    fd = os.memfd_create("pyrunc-mallocstats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 20).decode(errors="replace")
    finally:
        os.close(saved)
        os.close(fd)
    free: dict[int, int] = {}
    # The table's rows: class, size, pools, blocks in use, free blocks.
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and all(field.isdigit() for field in fields) and int(fields[4]):
            free[int(fields[1])] = int(fields[4])
    return free


def _fill_free_blocks(rounds: int = 3) -> int:
    """Puts a ballast object in every free block of pymalloc's pools; returns the bytes used.

    Why: after imports, warm-up and a collection, the launcher's pools are full of holes, and a
    forked shim's new objects land in them: one in this page, the next in another. Each page a
    shim writes becomes its private copy, so scattered allocations cost a page each. Filled, the
    shim allocates from fresh pools, densely: ~0.25 MiB less private memory per shim. The ballast
    is never touched again, so its pages stay shared. Each size class gets objects of exactly its
    size: ``object()`` (16 bytes), floats (24, in the 32 class), bytes objects of the rest.
    """
    used = 0
    for _ in range(rounds):  # reading the statistics frees a few blocks of its own
        free = _free_blocks()
        if not free:
            break
        for size, count in free.items():
            if size == 16:
                _BALLAST.extend(object() for _ in range(count))
            elif size == 32:
                _BALLAST.extend(float(i) for i in range(count))
            else:
                _BALLAST.extend(bytes(size - 33) for _ in range(count))  # 33: a bytes object's header
            used += size * count
    return used


def _write_pid(sockdir: str) -> str:
    path = os.path.join(sockdir, PID_NAME)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, path)
    return path


def _remove_pid(path: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if int(f.read()) == os.getpid():
                os.unlink(path)


def serve_launcher(sockdir: str) -> None:
    import gc

    pid_file = _write_pid(sockdir)
    # Everything a shim imports, now, so the forked shims share it (the keeper's modules, and the
    # worker's: asyncio, the generated messages, betterproto2).
    import pyctr.shim.keeper
    import pyctr.shim.server
    import pyctr.shim.worker  # noqa: F401

    # Keep fd 3 free: the forked shim's listener goes there. And no cwd in some container's bundle.
    listener = socket.socket(fileno=os.dup(3))
    os.close(3)
    os.chdir("/")
    listener.set_inheritable(False)
    sock = _Socket(listener, os.path.join(sockdir, SOCKET_NAME))
    freshness = _Freshness(_source_dirs())
    own = _Environment(os.environ)
    _warm_up()
    _limit_malloc_arenas()
    _bare_fork_function()
    # The shims are our children until we exit: the kernel reaps them, no zombie waits for us.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.collect()
    try:
        _fill_free_blocks()
    except (OSError, AttributeError, ValueError):
        pass  # an interpreter without pymalloc statistics: shims just share a little less
    _trim_malloc()
    gc.freeze()
    idle_limit = float(os.environ.get("PYCTR_SHIM_LAUNCHER_IDLE", "600"))
    # Wake now and then while idle: a launcher whose daemon's state directory is gone (the daemon
    # was removed, a test cleaned up) has nobody left to serve and exits at once.
    listener.settimeout(min(idle_limit, 2.0))
    idle = 0.0
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                idle += listener.gettimeout() or 0.0
                if idle >= idle_limit or not os.path.isdir(sockdir):
                    break
                continue
            idle = 0.0
            with conn:
                if not _handle(conn, sock, freshness, own):
                    break
    finally:
        sock.release()
        _remove_pid(pid_file)


if __name__ == "__main__":
    serve_launcher(sys.argv[1])
    # Skip interpreter teardown of a frozen heap.
    os._exit(0)
