"""The keeper: the long-lived shim process, a plain epoll loop that runs as little Python as it can.

Why: every page a forked shim writes is private to it (reference counts, 3.11's bytecode warm-up,
dicts), so a long-lived process running asyncio, betterproto and the whole task service cost ~6 MiB
per container (the shim's first design; docs/benchmarks.md, "per-shim private memory"). The keeper
does only what must outlive a request and what needs only one runc command (direct.py: an init's
Start, Kill, Delete, Pause, Resume), and forks a short-lived **worker** (worker.py) for the rest; a
worker's dirty pages die with it.

The keeper owns:
* the ttrpc server on fd 3; it answers State, Wait, Connect, Shutdown, CloseIO and ResizePty itself
  (hand-encoded replies) and queues every other call as a job, one job at a time, served by
  direct.py or a worker;
* the process table (table.py) and reaping: it is the child subreaper and the only caller of
  ``waitpid`` for its children (container processes re-parented from runc, its workers and the runc
  commands direct.py runs);
* the stdio copies (pipes or pty master <-> the client's FIFOs) and the OOM notification fds, which
  workers open and pass over SCM_RIGHTS;
* the event publisher to the daemon (``Events/Forward`` on $TTRPC_ADDRESS, in order, with retries).

Worker protocol: the keeper forks with one end of a SOCK_SEQPACKET socketpair; the worker answers
with one message, ``marshal`` of ``{"reply": bytes} | {"error": (code, message)}`` plus ``"events"``
[(topic, type_url, value)] and ``"updates"`` (table changes), with the fds those updates name as
SCM_RIGHTS. A worker that dies without answering fails its call (Unknown).

Ordering, which the daemon and its clients rely on: while a Create or Start job runs, finished exits
wait, so /tasks/create and /tasks/start (or exec-started) precede the exit (the Go shim's
``eventSendMu``); an exit is reported only after the process's output copies reached EOF (bounded)
and the client read it (bounded), so a client sees all output before Wait answers, and Wait answers
only after /tasks/exit is queued; Delete of a process whose exit is half-reported waits for it
(≤ 5 s), so /tasks/exit precedes /tasks/delete.
"""

from __future__ import annotations

import _signal
import collections
import contextlib
import errno
import fcntl
import heapq
import logging
import marshal
import os
import select
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any, NoReturn

from pyctr.api import pblite as pw
from pyctr.api import ttrpc
from pyctr.api.errdefs import Code, to_status
from pyctr.shim import address as shim_address
from pyctr.shim import direct
from pyctr.shim.process.state import Op, State
from pyctr.shim.reaper import DEFAULT_SIGNALS
from pyctr.shim.runc import runc_env
from pyctr.shim.table import Container, Exit, Proc, ProcessTable, exit_status

log = logging.getLogger("pyctr.shim")

TASK_SERVICE = "containerd.task.v2.Task"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_CHUNK = 64 * 1024
_UCRED = struct.Struct("3i")
_STATUS = {
    State.CREATED: 1,
    State.RUNNING: 2,
    State.STOPPED: 3,
    State.PAUSED: 4,
    State.DELETED: 3,
}
_PAUSING = 5
# Plain ints and the C-level signal(): signal.signal wraps its result in an enum, code every keeper
# would otherwise run (and carry as copied pages) for nothing.
_SIGCHLD, _SIGTERM, _SIGINT = int(signal.SIGCHLD), int(signal.SIGTERM), int(signal.SIGINT)
_HANDLED = (_SIGCHLD, _SIGTERM, _SIGINT)
_RETRYABLE = {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED}
# Output copies get this long to reach EOF once their process exited (a left-behind child may hold
# the pipe), and the client this long to read what is still in its FIFO.
EOF_GRACE = 2.0
DRAIN_TIMEOUT = 1.5
SETTLE_TIMEOUT = 5.0
# Calls served one at a time as jobs, by direct.py in the keeper or by a worker. "killall" is internal:
# init exited in a shared PID namespace.
JOB_METHODS = frozenset(
    ("Create", "Start", "Delete", "Kill", "Exec", "Pause", "Resume", "Update", "Pids", "Stats", "Checkpoint")
)
_HOLDING = frozenset(("Create", "Start"))


class CallError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ids(payload: bytes) -> tuple[str, str]:
    """(id, exec_id): fields 1 and 2 of every containerd.task.v2 request."""
    id = exec_id = ""
    for number, value in pw.fields(payload):
        if number == 1 and isinstance(value, bytes):
            id = value.decode()
        elif number == 2 and isinstance(value, bytes):
            exec_id = value.decode()
    return id, exec_id


def _time(ts: float | None) -> bytes | None:
    return None if ts is None else pw.timestamp(ts)


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class Conn:
    """One client connection: frames in, replies out (buffered while the socket is full)."""

    __slots__ = ("closed", "decoder", "fd", "last_sid", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = ttrpc.FrameDecoder()
        self.last_sid = 0
        self.out = bytearray()
        self.closed = False


class Job:
    __slots__ = ("conn", "deadline", "method", "payload", "pid", "sid", "sock")

    def __init__(self, method: str, payload: bytes, conn: Conn | None, sid: int) -> None:
        self.method = method
        self.payload = payload
        self.conn = conn
        self.sid = sid
        self.pid = 0
        self.sock: socket.socket | None = None
        self.deadline = 0.0


class _Pump:
    """Copies ``src`` to ``dst`` without blocking: what a short write leaves waits in ``pending``,
    with ``dst`` watched instead of ``src`` until it takes the rest."""

    k: Keeper
    src: int
    dst: int
    pending: bytes

    def on_src(self, _events: int) -> None:
        raise NotImplementedError

    def write_failed(self, exc: OSError) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        try:
            n = os.write(self.dst, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.write_failed(exc)
            return
        if n < len(data):
            self.pending = data[n:]
            self.k.unwatch(self.src)
            self.k.watch(self.dst, _OUT, self.on_dst)

    def on_dst(self, _events: int) -> None:
        data, self.pending = self.pending, b""
        self.k.unwatch(self.dst)
        self.k.watch(self.src, _IN, self.on_src)
        self.write(data)


class OutCopy(_Pump):
    """Process output (pipe read end or pty master) -> the client's FIFO or file."""

    def __init__(self, keeper: Keeper, io: ProcIO, src: int, dst: int, reader: int, own_src: bool) -> None:
        self.k, self.io = keeper, io
        self.src, self.dst, self.reader, self.own_src = src, dst, reader, own_src
        self.pending = b""
        self.done = False
        self.deadline = 0.0
        self.pause = 0.0005
        os.set_blocking(src, False)
        keeper.watch(src, _IN, self.on_src)

    def on_src(self, _events: int) -> None:
        try:
            data = os.read(self.src, _CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last user is gone, i.e. EOF
                log.warning("stdio: reading process output failed: %s", exc)
            data = b""
        if not data:
            self.eof()
        elif self.dst >= 0:
            self.write(data)

    def write_failed(self, exc: OSError) -> None:
        log.warning("stdio: writing output failed, discarding the rest: %s", exc)
        self.close_dst()

    def eof(self) -> None:
        self.k.unwatch(self.src)
        if self.own_src:
            _close(self.src)
        self.src = -1
        self.deadline = time.monotonic() + DRAIN_TIMEOUT
        self.drain()

    def drain(self) -> None:
        """Our own reader keeps the FIFO open: wait (bounded) until the client read what is in it."""
        if self.done:
            return
        if self.reader >= 0 and time.monotonic() < self.deadline:
            try:
                unread = struct.unpack("i", fcntl.ioctl(self.reader, termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                unread = 0
            if unread:
                self.k.later(self.pause, self.drain)
                self.pause = min(self.pause * 2, 0.01)
                return
        self.close_dst()
        self.done = True
        self.io.copy_done()

    def close_dst(self) -> None:
        if self.dst >= 0:
            self.k.unwatch(self.dst)
        _close(self.dst)
        _close(self.reader)
        self.dst = self.reader = -1
        self.pending = b""

    def force(self) -> None:
        """The process is gone but something still holds its output open: stop copying."""
        if self.src >= 0:
            self.k.unwatch(self.src)
            if self.own_src:
                _close(self.src)
            self.src = -1
        if not self.done:
            self.close_dst()
            self.done = True
            self.io.copy_done()


class InCopy(_Pump):
    """The client's stdin FIFO -> the process's stdin (pipe write end, or a dup of the pty master)."""

    def __init__(self, keeper: Keeper, src: int, dst: int) -> None:
        self.k, self.src, self.dst = keeper, src, dst
        self.pending = b""
        os.set_blocking(dst, False)
        keeper.watch(src, _IN, self.on_src)

    def on_src(self, _events: int) -> None:
        try:
            data = os.read(self.src, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.write(data)

    def write_failed(self, exc: OSError) -> None:
        self.close()  # the process closed its stdin or exited

    def close(self) -> None:
        for fd in (self.src, self.dst):
            if fd >= 0:
                self.k.unwatch(fd)
                _close(fd)
        self.src = self.dst = -1


class ProcIO:
    """The fds of one process's stdio, handed over by the worker that started it."""

    def __init__(self, keeper: Keeper, proc: Proc, desc: dict[str, Any], fds: list[int]) -> None:
        self.k, self.proc = keeper, proc
        self.console = fds[desc["console"]] if desc.get("console", -1) >= 0 else -1
        self.holder = fds[desc["holder"]] if desc.get("holder", -1) >= 0 else -1
        self.outs: list[OutCopy] = []
        self.input: InCopy | None = None
        self.on_done: Callable[[], None] | None = None
        for src, sink, reader in desc.get("out", ()):
            src_fd = self.console if src < 0 else fds[src]
            self.outs.append(
                OutCopy(
                    keeper,
                    self,
                    src_fd,
                    fds[sink] if sink >= 0 else -1,
                    fds[reader] if reader >= 0 else -1,
                    src >= 0,
                )
            )
        if desc.get("in"):
            src, dst = desc["in"]
            self.input = InCopy(keeper, fds[src], os.dup(self.console) if dst < 0 else fds[dst])
        if proc.stdin_closed:
            self.close_stdin()

    def copy_done(self) -> None:
        if self.on_done is not None and all(c.done for c in self.outs):
            done, self.on_done = self.on_done, None
            done()

    def finish(self, then: Callable[[], None]) -> None:
        """At exit: ``then`` once the output copies are done (forced after EOF_GRACE)."""
        self.on_done = then
        self.k.later(EOF_GRACE, self._force)
        self.copy_done()

    def _force(self) -> None:
        if self.on_done is None:
            return
        for c in self.outs:
            c.force()

    def close_stdin(self) -> None:
        _close(self.holder)
        self.holder = -1

    def fds(self) -> list[int]:
        fds = [self.holder, self.console]
        for c in self.outs:
            fds += [c.src, c.dst, c.reader]
        if self.input is not None:
            fds += [self.input.src, self.input.dst]
        return [fd for fd in fds if fd >= 0]

    def resize(self, width: int, height: int) -> None:
        if self.console >= 0:
            fcntl.ioctl(self.console, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        self.on_done = None
        for c in self.outs:
            c.force()
        if self.input is not None:
            self.input.close()
        self.close_stdin()
        if self.console >= 0:
            self.k.unwatch(self.console)
            _close(self.console)
            self.console = -1


class OomWatch:
    """A container's OOM notification fd (v1 eventfd, v2 inotify on memory.events)."""

    def __init__(self, keeper: Keeper, container_id: str, desc: dict[str, Any], fds: list[int]) -> None:
        self.k, self.container_id = keeper, container_id
        self.v2, self.path, self.last = desc["v2"], desc["path"], desc.get("last", 0)
        self.fds = fds
        keeper.watch(fds[0], _IN, self.ready)

    def ready(self, _events: int) -> None:
        try:
            os.read(self.fds[0], 4096)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if self.v2:
            count = 0
            with contextlib.suppress(OSError, ValueError):
                with open(self.path) as f:
                    for line in f:
                        if line.startswith("oom_kill "):
                            count = int(line.split()[1])
            if count > self.last:
                self.last = count
                self.k.publish_oom(self.container_id)
        elif os.path.exists(self.path):
            self.k.publish_oom(self.container_id)
        if not os.path.exists(self.path):  # the cgroup is gone: that is the end, not an OOM
            self.close()

    def close(self) -> None:
        if self.fds:
            self.k.unwatch(self.fds[0])
            for fd in self.fds:
                _close(fd)
            self.fds = []


class Publisher:
    """Events/Forward to the daemon, one call at a time, in order; retried for up to ``budget`` s.

    Topics, in the order the shim emits them for one task (the daemon relies on it)::

        /tasks/create -> /tasks/start -> [/tasks/exec-added -> /tasks/exec-started -> /tasks/exit (exec)]
                      -> /tasks/exit -> /tasks/delete
        /tasks/paused, /tasks/resumed, /tasks/oom whenever they happen

    A failed send is retried on a fresh connection with a growing pause, for up to ``budget`` seconds
    after the event was queued, then dropped (the Go shim gives up after about 20 s as well): the shim
    keeps running while the daemon is down, and a restarted daemon re-reads task state instead of
    replaying events. Each call carries the namespace in the ``containerd-namespace-ttrpc`` metadata
    key and in the envelope.
    """

    def __init__(self, keeper: Keeper, address: str, namespace: str, budget: float = 20.0) -> None:
        self.k = keeper
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self.budget = budget
        self.queue: collections.deque[tuple[str, bytes, float]] = collections.deque()
        self.sock: socket.socket | None = None
        self.decoder = ttrpc.FrameDecoder()
        self.sid = 1
        self.in_flight = 0  # stream id awaiting its response
        self.waiting = False  # a retry pause is running
        self.pause = 0.1
        self.metadata = (ttrpc.KeyValue(ttrpc.NAMESPACE_KEY, namespace),)

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        if not self.address:
            return
        envelope = (
            pw.message(1, pw.timestamp(time.time()))
            + pw.string(2, self.namespace)
            + pw.string(3, topic)
            + pw.message(4, pw.any_(type_url, value))
        )
        request = ttrpc.Request(
            EVENTS_SERVICE, "Forward", pw.message(1, envelope), 5_000_000_000, self.metadata
        )
        self.queue.append((topic, request.encode(), time.monotonic()))
        self.pump()

    def pump(self) -> None:
        if self.in_flight or self.waiting or not self.queue:
            return
        try:
            if self.sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self.sock = sock
                sock.connect(self.address)
                self.k.watch(sock.fileno(), _IN, self.on_readable)
                self.sid = 1
            frame = ttrpc.encode_frame(self.sid, ttrpc.REQUEST, 0, self.queue[0][1])
            if self.sock.send(frame) != len(frame):
                raise OSError(errno.EAGAIN, "short write")
        except OSError as exc:
            self.retry(exc)
            return
        self.in_flight = self.sid
        self.sid += 2
        self.k.later(5.0, self.timeout, self.in_flight)

    def timeout(self, sid: int) -> None:
        if self.in_flight == sid:
            self.retry(TimeoutError("no answer within 5 s"))

    def on_readable(self, _events: int) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.retry(exc)
            return
        if not data:
            self.retry(ConnectionResetError("connection closed"))
            return
        for frame in self.decoder.feed(data):
            if isinstance(frame, ttrpc.Frame) and frame.stream_id == self.in_flight:
                status = ttrpc.Response.decode(frame.data).status
                code = status.code if status is not None else 0
                if code in _RETRYABLE:
                    self.retry(CallError(code, status.message if status else ""))
                    return
                if code:
                    log.warning("event %s refused by the daemon: %s", self.queue[0][0], status)
                self.queue.popleft()
                self.in_flight = 0
                self.pause = 0.1
        self.pump()

    def drop_conn(self) -> None:
        if self.sock is not None:
            self.k.unwatch(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.decoder = ttrpc.FrameDecoder()
        self.in_flight = 0

    def retry(self, error: Exception) -> None:
        self.drop_conn()
        if not self.queue:
            return
        topic, _, queued = self.queue[0]
        if time.monotonic() - queued + self.pause > self.budget:
            log.warning("dropping event %s after retries: %s", topic, error)
            self.queue.popleft()
            self.pause = 0.1
            self.pump()
            return
        self.waiting = True
        self.k.later(self.pause, self.resume)
        self.pause = min(self.pause * 2, 2.0)

    def resume(self) -> None:
        self.waiting = False
        self.pump()

    @property
    def idle(self) -> bool:
        return not self.queue


class Keeper:
    def __init__(
        self, namespace: str, address: str, listener: socket.socket, bundle: str, socket_flag: str = ""
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.bundle = bundle
        self.socket_flag = socket_flag
        self.table = ProcessTable()
        self.listener = listener
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.timers: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.conns: dict[int, Conn] = {}
        self.jobs: collections.deque[Job] = collections.deque()
        self.job: Job | None = None
        self.deferred: list[Job] = []  # Deletes waiting for an exit to be reported
        self.held: list[Proc] = []  # exits waiting for a Create/Start job to finish
        self.workers: set[int] = set()
        # A worker forked at start-up, ready (loop, reaper thread) before the daemon's Create arrives:
        # the fork and set-up (~4 ms) overlap the daemon's round trip instead of adding to Create.
        self.spare: tuple[int, socket.socket] | None = None
        # Children the keeper runs itself (direct.py's runc calls): pid -> called with the exit status.
        self.children: dict[int, Callable[[int], None]] = {}
        self.env = runc_env()
        self.stopping = False
        self.creds = (os.geteuid(), os.getegid())
        self.publisher = Publisher(self, os.environ.get("TTRPC_ADDRESS", ""), namespace)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- loop ----------------------------------------------------------------------------------------

    def watch(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        if fd in self.handlers:
            self.ep.modify(fd, mask)
        else:
            self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def spawn(self, argv: list[str], out: int, exited: Callable[[int], None]) -> None:
        """Starts ``argv`` with stdin /dev/null and stdout+stderr ``out``; ``exited(status)`` once reaped.
        No race with the reaper: both run on this loop, and the pid is known before the next reap."""
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                self.env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out, 1),
                    (os.POSIX_SPAWN_DUP2, out, 2),
                ],
                setsigdef=DEFAULT_SIGNALS,
                setsigmask=(),
            )
        finally:
            os.close(devnull)
        self.children[pid] = exited

    def later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self._seq, fn, args))

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in _HANDLED:
            _signal.signal(sig, _ignore)
        self.watch(self.wake_r, _IN, self.on_signal)
        self.listener.setblocking(False)
        self.watch(self.listener.fileno(), _IN, self.on_accept)
        self.reap()
        if not self.table.containers:
            try:
                self.spare = self.fork_worker(None)
            except OSError:
                pass
        deadline = 0.0
        while True:
            if self.stopping:
                if not deadline:
                    deadline = self.stop_serving()
                if self.publisher.idle or time.monotonic() > deadline:
                    return
            timeout = -1.0
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            if self.stopping:
                timeout = min(timeout if timeout >= 0 else 0.1, 0.1)
            self.turn(timeout)

    def turn(self, timeout: float) -> None:
        """One pass of the loop: the ready fds' handlers, then the timers that are due."""
        for fd, events in self.ep.poll(timeout):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(events)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self.timers)
            fn(*args)

    def stop_serving(self) -> float:
        """SIGTERM or Shutdown: stop serving (containers keep running); events get 5 s to leave."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None
        self.unwatch(self.listener.fileno())
        self.listener.close()
        for conn in list(self.conns.values()):
            self.flush(conn)
            self.drop(conn)
        with contextlib.suppress(OSError):
            shim_address.remove_socket(shim_address.read_address(os.path.join(self.bundle, "address")))
        if self.socket_flag:
            shim_address.remove_socket(self.socket_flag)
        return time.monotonic() + 5.0

    def on_signal(self, _events: int) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        if _SIGTERM in data or _SIGINT in data:
            self.stopping = True
        if _SIGCHLD in data:
            self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                self.workers.discard(pid)
                continue
            child = self.children.pop(pid, None)
            if child is not None:
                child(exit_status(status))
                continue
            proc = self.table.on_exit(Exit(pid, exit_status(status), time.time()))
            if proc is not None:
                self.on_proc_exit(proc)

    # -- exits ---------------------------------------------------------------------------------------

    def on_proc_exit(self, proc: Proc) -> None:
        """A claimed exit: kill leftovers (shared PID namespace), finish the output, then report."""
        proc.exiting = True
        container = self.table.containers.get(proc.container_id)
        if proc.init and container is not None and container.kill_all_on_exit:
            self.enqueue(Job("killall", proc.container_id.encode(), None, 0))
        if proc.io is not None:
            proc.io.finish(lambda: self.exit_ready(proc))
        else:
            self.exit_ready(proc)

    def exit_ready(self, proc: Proc) -> None:
        if self.job is not None and self.job.method in _HOLDING:
            self.held.append(proc)
            return
        self.publish(
            "/tasks/exit",
            "containerd.events.TaskExit",
            pw.string(1, proc.container_id)
            + pw.string(2, proc.id)
            + pw.uint(3, proc.pid)
            + pw.uint(4, proc.exit_status)
            + pw.message(5, _time(proc.exited_at)),
        )
        proc.exiting = False
        self.release(proc)
        self.check_deferred()

    def release(self, proc: Proc) -> None:
        """Wait answers from now on."""
        proc.released = True
        waiters, proc.waiters = proc.waiters, []
        for conn, sid in waiters:
            self.reply(conn, sid, self.wait_response(proc))

    def wait_response(self, proc: Proc) -> bytes:
        return pw.uint(1, proc.exit_status) + pw.message(2, _time(proc.exited_at))

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        self.publisher.publish(topic, type_url, value)

    def publish_oom(self, container_id: str) -> None:
        self.publish("/tasks/oom", "containerd.events.TaskOOM", pw.string(1, container_id))

    # -- ttrpc server --------------------------------------------------------------------------------

    def on_accept(self, _events: int) -> None:
        try:
            # _accept, not accept: the latter builds the socket's family and type enums on the way.
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("ttrpc: accept: %s", exc)
            return
        _, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if (uid, gid) != self.creds:
            log.warning("ttrpc: refusing connection from uid/gid %d/%d", uid, gid)
            sock.close()
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self.conns[conn.fd] = conn
        self.watch(conn.fd, _IN, lambda events: self.on_conn(conn, events))

    def drop(self, conn: Conn) -> None:
        if not conn.closed:
            conn.closed = True
            self.unwatch(conn.fd)
            self.conns.pop(conn.fd, None)
            conn.sock.close()

    def on_conn(self, conn: Conn, events: int) -> None:
        if events & _OUT:
            self.flush(conn)
        if not events & (_IN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = conn.sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        try:
            for frame in conn.decoder.feed(data):
                self.on_frame(conn, frame)
        except Exception:
            log.exception("ttrpc: closing connection after internal error")
            self.drop(conn)

    def on_frame(self, conn: Conn, frame: ttrpc.Frame | ttrpc.OversizeFrame) -> None:
        sid = frame.stream_id
        if isinstance(frame, ttrpc.OversizeFrame):
            if frame.length >= 1 << 24:
                self.drop(conn)
            else:
                self.fail(
                    conn, sid, Code.RESOURCE_EXHAUSTED, f"message length {frame.length} exceeds the limit"
                )
            return
        if sid % 2 != 1:
            self.fail(conn, sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return
        if frame.type != ttrpc.REQUEST:
            return
        if sid <= conn.last_sid:
            self.fail(conn, sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return
        conn.last_sid = sid
        try:
            req = ttrpc.Request.decode(frame.data)
        except ttrpc.ProtocolError as exc:
            self.fail(conn, sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        method = req.method
        if req.service != TASK_SERVICE or (method not in JOB_METHODS and method not in _CHEAP):
            self.fail(
                conn, sid, Code.UNIMPLEMENTED, f"service {req.service}: method {method}: not implemented"
            )
            return
        if method in JOB_METHODS:
            self.enqueue(Job(method, req.payload, conn, sid))
            return
        try:
            reply = _CHEAP[method](self, req.payload, conn, sid)
        except CallError as exc:
            self.fail(conn, sid, exc.code, exc.message)
            return
        except (ValueError, OSError) as exc:
            code, message = to_status(exc)
            self.fail(conn, sid, code, message)
            return
        except Exception as exc:  # categorised errors from the state table
            code = getattr(exc, "grpc_status", Code.UNKNOWN)
            self.fail(conn, sid, int(code), str(exc))
            return
        if reply is not None:
            self.reply(conn, sid, reply)

    def reply(self, conn: Conn | None, sid: int, payload: bytes) -> None:
        self.send(conn, sid, ttrpc.Response(ttrpc.Status(), payload).encode())

    def fail(self, conn: Conn | None, sid: int, code: int, message: str) -> None:
        self.send(conn, sid, ttrpc.Response(ttrpc.Status(code, message)).encode())

    def send(self, conn: Conn | None, sid: int, response: bytes) -> None:
        if conn is None or conn.closed:
            return
        conn.out += ttrpc.encode_frame(sid, ttrpc.RESPONSE, 0, response)
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.out) if conn.out else 0
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(conn)
            return
        del conn.out[:n]
        if not conn.closed:
            self.ep.modify(conn.fd, _IN | _OUT if conn.out else _IN)

    # -- cheap calls ---------------------------------------------------------------------------------

    def process(self, id: str, exec_id: str) -> tuple[Container, Proc]:
        container = self.table.containers.get(id)
        if container is None:
            raise CallError(Code.NOT_FOUND, "container not created: not found")
        proc = container.process(exec_id)
        if proc is None:
            raise CallError(Code.NOT_FOUND, f"process does not exist {exec_id}: not found")
        return container, proc

    def status(self, proc: Proc) -> int:
        if not proc.init:
            parent = self.table.containers[proc.container_id].init
            if parent.pausing or parent.state is State.PAUSED:
                return _PAUSING if parent.pausing else _STATUS[State.PAUSED]
        return _PAUSING if proc.pausing else _STATUS[proc.state]

    def state(self, payload: bytes, conn: Conn, sid: int) -> bytes:
        id, exec_id = ids(payload)
        container, proc = self.process(id, exec_id)
        return (
            pw.string(1, proc.id)
            + pw.string(2, container.bundle)
            + pw.uint(3, proc.pid)
            + pw.uint(4, self.status(proc))
            + pw.string(5, proc.stdin)
            + pw.string(6, proc.stdout)
            + pw.string(7, proc.stderr)
            + pw.uint(8, proc.terminal)
            + pw.uint(9, proc.exit_status)
            + pw.message(10, _time(proc.exited_at))
            + pw.string(11, exec_id)
        )

    def wait(self, payload: bytes, conn: Conn, sid: int) -> bytes | None:
        _, proc = self.process(*ids(payload))
        if proc.released:
            return self.wait_response(proc)
        proc.waiters.append((conn, sid))
        return None

    def connect(self, payload: bytes, conn: Conn, sid: int) -> bytes:
        container = self.table.containers.get(ids(payload)[0])
        return pw.uint(1, os.getpid()) + pw.uint(2, container.init.pid if container else 0)

    def shutdown(self, payload: bytes, conn: Conn, sid: int) -> bytes:
        # `now` is ignored, as in the runc shim: a shim with containers keeps serving them.
        if not self.table.containers:
            self.stopping = True
        return b""

    def close_io(self, payload: bytes, conn: Conn, sid: int) -> bytes:
        id, exec_id = ids(payload)
        _, proc = self.process(id, exec_id)
        if any(n == 3 and v for n, v in pw.fields(payload)):
            proc.stdin_closed = True
            if proc.io is not None:
                proc.io.close_stdin()
        return b""

    def resize_pty(self, payload: bytes, conn: Conn, sid: int) -> bytes:
        id, exec_id = ids(payload)
        _, proc = self.process(id, exec_id)
        size = {n: v for n, v in pw.fields(payload) if isinstance(v, int)}
        proc.check(Op.RESIZE)
        if proc.io is not None:
            proc.io.resize(size.get(3, 0), size.get(4, 0))
        return b""

    # -- workers -------------------------------------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        if job.method == "Delete":
            container = self.table.containers.get(ids(job.payload)[0])
            proc = container.process(ids(job.payload)[1]) if container is not None else None
            if proc is not None and not proc.settled:
                job.deadline = time.monotonic() + SETTLE_TIMEOUT
                self.deferred.append(job)
                self.later(SETTLE_TIMEOUT, self.check_deferred)
                return
        self.jobs.append(job)
        self.next_job()

    def check_deferred(self) -> None:
        now = time.monotonic()
        for job in list(self.deferred):
            container = self.table.containers.get(ids(job.payload)[0])
            proc = container.process(ids(job.payload)[1]) if container is not None else None
            if proc is None or proc.settled or now >= job.deadline:
                self.deferred.remove(job)
                self.jobs.append(job)
        self.next_job()

    def next_job(self) -> None:
        if self.job is not None or not self.jobs or self.stopping:
            return
        job = self.job = self.jobs.popleft()
        if job.method in _HOLDING:
            self.table.open_window()
        if job.method == "Pause":
            container = self.table.containers.get(ids(job.payload)[0])
            if container is not None and container.init.state is State.RUNNING:
                container.init.pausing = True
        if self.run_direct(job):
            return
        spare, self.spare = self.spare, None
        if spare is not None:
            # Its copy of the table is the one at its fork: good for a first Create only.
            if job.method == "Create" and not self.table.containers:
                try:
                    spare[1].send(marshal.dumps((job.method, job.payload)))
                except OSError:
                    pass
                else:
                    job.pid, job.sock = spare
                    self.watch(job.sock.fileno(), _IN, self.on_result)
                    return
            spare[1].close()  # it exits on EOF
        job.pid, job.sock = self.fork_worker(job)
        self.watch(job.sock.fileno(), _IN, self.on_result)

    def fork_worker(self, job: Job | None) -> tuple[int, socket.socket]:
        """A worker for ``job``, or (None) the spare that waits for the first Create's payload."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            from pyctr.shim import worker

            ours.close()
            worker.run(self, job, theirs)
        theirs.close()
        self.workers.add(pid)
        return pid, ours

    def fds_for_worker(self) -> list[int]:
        """Everything the worker must not keep open (it would delay EOFs and hold sockets)."""
        fds = [self.ep.fileno(), self.wake_r, self.wake_w, self.listener.fileno(), *self.handlers]
        if self.publisher.sock is not None:
            fds.append(self.publisher.sock.fileno())
        for container in self.table.containers.values():
            for proc in container.all():
                if proc.io is not None:
                    fds.extend(proc.io.fds())
            if container.oom is not None:
                fds.extend(container.oom.fds)
        return fds

    def run_direct(self, job: Job) -> bool:
        """Serves ``job`` in the keeper when direct.py can (it ends it with :meth:`finish`)."""
        handler = direct.HANDLERS.get(job.method)
        try:
            if job.method == "killall":
                direct.killall(self, job)
                return True
            if handler is None:
                return False
            return handler(self, job, *self.process(*ids(job.payload)))
        except Exception as exc:
            self.finish_error(job, exc)
            return True

    def on_result(self, _events: int) -> None:
        job = self.job
        assert job is not None and job.sock is not None
        try:
            msg, fds, _, _ = socket.recv_fds(job.sock, 1 << 20, 64)
        except BlockingIOError:
            return
        except OSError as exc:
            msg, fds = b"", []
            log.warning("shim worker %s: %s", job.method, exc)
        self.unwatch(job.sock.fileno())
        job.sock.close()
        try:
            result = (
                marshal.loads(msg) if msg else {"error": (Code.UNKNOWN, f"shim worker for {job.method} died")}
            )
        except Exception as exc:
            result = {"error": (Code.UNKNOWN, f"shim worker: {exc}")}
        self.finish(job, result, fds)

    def finish_error(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, CallError):
            error = (exc.code, exc.message)
        else:
            error = to_status(exc)
        self.finish(job, {"error": error})

    def finish(self, job: Job, result: dict[str, Any], fds: list[int] | None = None) -> None:
        """Ends the current job with a worker's (or direct.py's) result: events, updates, the answer."""
        self.job = None
        try:
            for topic, url, value in result.get("events", ()):
                self.publish(topic, url, value)
            for update in result.get("updates", ()):
                self.apply(update, fds or [])
        except Exception as exc:
            log.exception("shim %s: bad result", job.method)
            result = {"error": (Code.UNKNOWN, f"shim worker: {exc}")}
        if job.method in _HOLDING:
            self.table.close_window()
        if job.method == "Pause":
            container = self.table.containers.get(ids(job.payload)[0])
            if container is not None:
                container.init.pausing = False
        if "error" in result:
            self.fail(job.conn, job.sid, *result["error"])
        else:
            self.reply(job.conn, job.sid, result.get("reply", b""))
        held, self.held = self.held, []
        for proc in held:
            self.exit_ready(proc)
        self.next_job()

    def apply(self, update: tuple[Any, ...], fds: list[int]) -> None:
        """One table change reported by a worker (see worker.py for who sends which)."""
        kind = update[0]
        if kind == "container":
            _, d, io = update
            init = Proc(d["id"], d["id"], True, d["stdin"], d["stdout"], d["stderr"], d["terminal"])
            container = Container(
                d["id"], d["bundle"], init, kill_all_on_exit=d["kill_all"], config=d["config"]
            )
            self.table.containers[container.id] = container
            if d["pid"]:  # 0: created from a checkpoint, its process comes with Start (runc restore)
                self.attach(init, d["pid"], io, fds)
            return
        container = self.table.containers[update[1]]
        if kind == "exec":
            d = update[2]
            container.execs[d["id"]] = Proc(
                d["id"],
                container.id,
                False,
                d["stdin"],
                d["stdout"],
                d["stderr"],
                d["terminal"],
                spec=d["spec"],
            )
        elif kind == "started":  # an exec's runc exec, or an init's runc restore
            _, _, exec_id, pid, io = update
            proc = container.process(exec_id)
            assert proc is not None
            before = proc.state
            self.attach(proc, pid, io, fds)
            proc.commit(before, State.RUNNING)
        elif kind == "state":
            _, _, exec_id, before, after = update
            proc = container.process(exec_id)
            if proc is not None:
                proc.commit(State(before), State(after))
        elif kind == "failed":  # an exec whose runc exec failed: it never ran, Wait must answer
            _, _, exec_id, status, ts = update
            proc = container.execs[exec_id]
            proc.mark_exited(status, ts)
            self.release(proc)
        elif kind == "config":
            container.config.update(update[2])
        elif kind == "oom":
            _, _, desc, indexes = update
            if container.oom is None:
                container.oom = OomWatch(self, container.id, desc, [fds[i] for i in indexes])
        elif kind == "deleted":
            self.remove(container, update[2])

    def attach(self, proc: Proc, pid: int, io: dict[str, Any] | None, fds: list[int]) -> None:
        if io is not None:
            proc.io = ProcIO(self, proc, io, fds)
        exit = self.table.register(pid, proc)
        if exit is not None:
            self.on_proc_exit(proc)

    def remove(self, container: Container, exec_id: str) -> None:
        procs = [container.execs.pop(exec_id)] if exec_id else container.all()
        if not exec_id:
            del self.table.containers[container.id]
            if container.oom is not None:
                container.oom.close()
        self.table.forget(procs)
        for proc in procs:
            proc.state = State.DELETED
            if proc.io is not None:
                proc.io.close()
                proc.io = None
            self.release(proc)  # nothing will report their exits any more: Wait must not hang


def _ignore(signum: int, frame: object) -> None:
    """Python-level handler, so the signal reaches the wakeup fd; the loop does the work."""


_CHEAP: dict[str, Callable[[Keeper, bytes, Conn, int], bytes | None]] = {
    "State": Keeper.state,
    "Wait": Keeper.wait,
    "Connect": Keeper.connect,
    "Shutdown": Keeper.shutdown,
    "CloseIO": Keeper.close_io,
    "ResizePty": Keeper.resize_pty,
}


def serve(
    namespace: str, address: str, listener: socket.socket, bundle: str, socket_flag: str = ""
) -> NoReturn:
    """The shim's main loop; never returns. The working directory is the bundle."""
    keeper = Keeper(namespace, address, listener, bundle, socket_flag)
    code = 0
    try:
        keeper.run()
    except Exception:
        log.exception("shim failed")
        code = 1
    os._exit(code)


def warm_up(rounds: int = 10) -> list[str]:
    """Runs the keeper's everyday paths in the launcher, before it forks any shim.

    3.11 counts calls in every code object until it quickens it, and specialises instructions in
    place; strings get their hash cached and caches get built on first use: done here, those writes
    land in pages every shim shares instead of in each shim's private copy. Accepts a connection,
    takes Create through dispatch and applies a worker's result for it (no fork: the job is answered
    over a socketpair), runs Start, Kill and Delete through direct.py with ``true`` as the runtime,
    serves Connect, State, Wait and Shutdown, and finishes an exit (the event goes to a socket that
    does not exist, which also runs the retry path). Returns the calls that failed (none should).
    """
    failed: list[str] = []
    methods: dict[int, str] = {}
    decoder = ttrpc.FrameDecoder()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0pyrunc-warm-up-{os.getpid()}")
    listener.listen(1)
    keeper = Keeper("warm-up", "", listener, "/")
    keeper.publisher.address = "/nonexistent/pyrunc-warm-up.sock"
    listener.setblocking(False)
    keeper.watch(listener.fileno(), _IN, keeper.on_accept)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(listener.getsockname())
        keeper.on_accept(_IN)
        (conn,) = keeper.conns.values()
        sid = 1

        def call_with(payload: bytes, *names: str) -> None:
            nonlocal sid
            frames = b""
            for method in names:
                methods[sid] = method
                frames += ttrpc.encode_frame(
                    sid, ttrpc.REQUEST, 0, ttrpc.Request(TASK_SERVICE, method, payload).encode()
                )
                sid += 2
            client.sendall(frames)
            keeper.handlers[conn.fd](_IN)

        def call(*names: str) -> None:
            call_with(request, *names)

        def settle() -> None:
            """Reaps the stand-in runc commands direct.py started (the launcher has no other children)."""
            deadline = time.monotonic() + 5.0
            while keeper.children and time.monotonic() < deadline:
                time.sleep(0.0005)
                keeper.reap()

        def answer(result: dict[str, Any]) -> None:
            job = keeper.jobs.popleft()
            keeper.job = job
            if job.method in _HOLDING:
                keeper.table.open_window()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            job.sock = ours
            socket.send_fds(theirs, [marshal.dumps(result)], [])
            theirs.close()
            keeper.watch(ours.fileno(), _IN, keeper.on_result)
            keeper.handlers[ours.fileno()](_IN)

        for round in range(rounds):
            id = f"w{round}"
            request = pw.string(1, id)
            keeper.stopping = True  # queue the jobs, never fork a worker here
            call("Connect", "Create")
            record = {
                "id": id,
                "bundle": "/",
                "stdin": "",
                "stdout": "",
                "stderr": "",
                "terminal": False,
                "pid": -1 - round,
                "kill_all": False,
                "config": {
                    "command": "true",
                    "root": "/",
                    "log": "/nonexistent/log.json",
                    "rootfs": "",
                    "cgroup": None,
                },
            }
            answer(
                {
                    "reply": pw.uint(1, 1),
                    "events": [("/tasks/create", "containerd.events.TaskCreate", request)],
                    "updates": [("container", record, None)],
                }
            )
            keeper.stopping = False
            call("Start")  # direct.py, with `true` standing in for runc
            settle()
            call("Connect", "State", "Wait", "State")
            call_with(pw.string(1, id) + pw.uint(3, 15), "Kill")
            settle()
            keeper.reap()
            proc = keeper.table.on_exit(Exit(-1 - round, 0, time.time()))
            if proc is not None:
                keeper.on_proc_exit(proc)
            call("Delete")
            settle()
            call("Shutdown")
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while data := client.recv(65536):
                    for frame in decoder.feed(data):
                        assert isinstance(frame, ttrpc.Frame)
                        status = ttrpc.Response.decode(frame.data).status
                        if status is not None and status.code:
                            failed.append(f"{methods[frame.stream_id]}: {status.message}")
            client.setblocking(True)
        keeper.publisher.drop_conn()
        keeper.drop(conn)
    finally:
        for fd in list(keeper.handlers):
            keeper.unwatch(fd)
        keeper.ep.close()
        for sock in (client, listener):
            sock.close()
        os.close(keeper.wake_r)
        os.close(keeper.wake_w)
    return failed
