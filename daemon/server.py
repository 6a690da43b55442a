"""The gRPC edge: the unix socket, HTTP/2, per-request context, error mapping and graceful drain.

Services are the generated betterproto2 classes (``__mapping__()`` gives each method's handler,
cardinality and message types); the handlers only ever call ``recv_message``, ``send_message``
and iterate the stream, which is all :class:`ServerStream` offers. Underneath is our own lean
HTTP/2 server rather than grpclib's: at containerd's call pattern (``ctr content get`` issues one
Read RPC per 32 KiB) the per-call cost of grpclib + h2 (event objects, state machines, a queue
per stream, one write per frame) set the figure. What it does, once for every service:

* the ``containerd-namespace`` and ``containerd-lease`` headers become context variables of the
  handler's task; a categorised error becomes a gRPC status in one place (:func:`grpc_error`);
* unknown methods get UNIMPLEMENTED *with* ``content-type`` (the Go client reports a reply
  without it as a transport error);
* messages above the configured size are refused with RESOURCE_EXHAUSTED, and a body that is not
  well-formed protobuf with INTERNAL, as grpc-go does;
* a connection's output is collected and leaves in one ``writev``: once per loop iteration, or
  as soon as the connection's last open call ends (a call costs one read and one write, and every
  wake-up of the client counts on a busy 2-CPU machine); acks for what a read brought (SETTINGS,
  PING, window updates) wait for the replies of the calls that read started;
* flow control runs both ways: credit for received data is returned as handlers consume it
  (data behind unread messages waits), and replies wait for the client's windows;
* ``grpc-timeout`` cancels the handler and answers DEADLINE_EXCEEDED; RST_STREAM from the client,
  its GOAWAY or a lost connection cancels it;
* shutdown: stop accepting, let in-flight calls finish (bounded), then close.

Requests that are not gRPC get grpclib's answers (405, 415, 400), so clients see what they saw.
The frame layout and the header fields we send live in ``api/h2wire.py`` (shared with pyctr's client),
the header blocks and their decoding in ``daemon/http2.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, cast

import betterproto2
from grpclib.const import Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from pyctr.api import errdefs, filters, h2wire, namespaces, pbencode
from pyctr.api.log import get_logger
from pyctr.daemon import http2
from pyctr.daemon.http2 import H2Error

log = get_logger("pyctrd.server")

# Our side of flow control: what a client may send before we return credit (grpclib's defaults).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 4 << 20
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 64 << 10
CONTENT_TYPE = "application/grpc+proto"

_INITIAL_SETTINGS = h2wire.settings_frame(
    {
        h2wire.SETTINGS_ENABLE_PUSH: 0,
        h2wire.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        h2wire.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        h2wire.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
    }
) + h2wire.window_update(0, CONNECTION_WINDOW - h2wire.DEFAULT_WINDOW)
_SETTINGS_ACK = h2wire.frame(h2wire.SETTINGS, h2wire.ACK, 0)
_REPLY_HEADERS = http2.STATUS_200 + http2.content_type(CONTENT_TYPE)
_OK_TRAILERS = http2.status_fields(0, None)


class SocketInUse(RuntimeError):
    pass


class LimitedCodec(ProtoCodec):
    """The protobuf codec with a size limit on both directions."""

    def __init__(self, max_recv: int, max_send: int) -> None:
        self.max_recv = max_recv
        self.max_send = max_send

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, betterproto2.Message) and isinstance(message, message_type):
            data = pbencode.encode(message)  # bytes(message), without its per-field overhead
        else:
            data = super().encode(message, message_type)  # hand-coded replies, type errors
        if len(data) > self.max_send:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"trying to send message larger than max ({len(data)} vs. {self.max_send})",
            )
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_recv:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, self.too_large(len(data)))
        try:
            check_wire(data)
        except ValueError as exc:
            # grpc-go's answer to a body it cannot unmarshal.
            raise GRPCError(Status.INTERNAL, f"grpc: error unmarshalling request: {exc}") from None
        return super().decode(data, message_type)

    def too_large(self, size: int) -> str:
        return f"grpc: received message larger than max ({size} vs. {self.max_recv})"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``."""
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise ValueError("unexpected EOF")
        value |= (buf[pos + i] & 0x7F) << (7 * i)
        if buf[pos + i] < 0x80:
            return value, pos + i + 1
    raise ValueError("varint overflow")


def check_wire(buf: bytes) -> None:
    """Raise ValueError unless ``buf`` is well-formed protobuf at the top level.

    betterproto2 parses leniently: a length running past the end, a cut varint or wire type 6
    all decode to *something*. Checking the outer level catches every truncated body (its last
    field runs past the end); nested messages are left to the parser.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        if key >> 3 == 0:
            raise ValueError("invalid field number 0")
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            pos += length
        elif wire_type not in (3, 4):  # groups are deprecated; left to the parser
            raise ValueError(f"invalid wire type {wire_type}")
        if pos > end:
            raise ValueError("unexpected EOF")


def grpc_error(exc: BaseException) -> GRPCError:
    """The one place where a handler's exception becomes a gRPC status."""
    if isinstance(exc, GRPCError):
        return exc
    if isinstance(exc, filters.FilterParseError):
        exc = errdefs.InvalidArgument(str(exc))
    code, message = errdefs.to_status(exc)
    return GRPCError(Status(code), message)


def prepare_socket(path: str, uid: int = 0, gid: int = 0, mode: int = 0o660) -> socket.socket:
    """Bind a listening unix socket: refuse a live server, replace a stale file, set owner and mode."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            os.unlink(path)  # stale: nobody listens there any more
        else:
            raise SocketInUse(
                f"{path} is in use by a running server; is another pyctrd or containerd using it?"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if uid or gid:
            os.chown(path, uid, gid)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- requests --------------------------------------------------------------------------------------


class _Call:
    """What a request's header block asks for; cached with the block (see ``HeaderDecoder``)."""

    __slots__ = ("abort", "fields", "handler", "lease", "namespace", "path", "timeout")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self.path = ""
        self.handler: Handler | None = None
        self.namespace = ""
        self.lease = ""
        self.timeout: float | None = None
        # (":status", grpc-status or None, grpc-message or None, with content-type) if refused
        self.abort: tuple[int, int | None, str | None, bool] | None = None


def _interpret(
    mapping: dict[str, Handler],
    fields: list[tuple[str, str]],
    load: Callable[[str], bool] | None = None,
) -> _Call:
    """The checks grpclib's request handler makes, in its order, with its answers.

    ``load(service)`` is asked for a method not in ``mapping``; True means it added the service's
    methods (a :class:`LazyService` loaded by its first call).
    """
    call = _Call(fields)
    method = content_type = te = timeout = namespace = lease = None
    for name, value in fields:
        # Pseudo-headers and grpclib's dict(headers) semantics: the last value wins...
        if name == ":path":
            call.path = value
        elif name == ":method":
            method = value
        elif name == "content-type":
            content_type = value
        elif name == "te":
            te = value
        elif name == "grpc-timeout":
            timeout = value
        # ... while metadata lookups take the first.
        elif name == namespaces.GRPC_HEADER:
            if namespace is None:
                namespace = call.namespace = value
        elif name == namespaces.LEASE_HEADER:
            if lease is None:
                lease = call.lease = value
    if method != "POST":
        call.abort = (405, None, None, False)
    elif content_type is None:
        call.abort = (415, Status.UNKNOWN.value, "Missing content-type header", False)
    elif _bad_content_type(content_type):
        call.abort = (415, Status.UNKNOWN.value, "Unacceptable content-type header", False)
    elif te != "trailers":
        call.abort = (400, Status.UNKNOWN.value, 'Required "te: trailers" header is missing', False)
    else:
        call.handler = mapping.get(call.path)
        if call.handler is None and load is not None and load(call.path[1:].partition("/")[0]):
            call.handler = mapping.get(call.path)
        if call.handler is None:
            service, _, name = call.path.lstrip("/").partition("/")
            message = f"unknown method {name} for service {service}"
            call.abort = (200, Status.UNIMPLEMENTED.value, message, True)
        elif timeout is not None:
            try:
                call.timeout = http2.parse_timeout(timeout)
            except ValueError:
                call.handler = None
                call.abort = (200, Status.UNKNOWN.value, "Invalid grpc-timeout header", False)
    return call


def _bad_content_type(value: str) -> bool:
    base, _, sub = value.partition("+")
    return base != "application/grpc" or (sub or "proto") != "proto"


class ServerStream:
    """One call, as generated handlers see it: ``recv_message``, ``send_message``, iteration."""

    __slots__ = (
        "call",
        "conn",
        "deadline",
        "deadline_hit",
        "headers_sent",
        "held",
        "id",
        "local_closed",
        "messages",
        "partial",
        "partial_len",
        "partial_need",
        "recv_error",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "reset",
        "send_window",
        "sent",
        "task",
        "waiter",
        "window_waiter",
    )

    def __init__(self, conn: _Connection, stream_id: int, call: _Call) -> None:
        self.conn = conn
        self.id = stream_id
        self.call = call
        self.task: asyncio.Task[None] | None = None
        self.messages: deque[tuple[int, Any]] = deque()  # (compressed flag, body)
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.local_closed = False
        self.reset = False
        self.headers_sent = False
        self.sent = 0
        self.send_window = conn.peer_initial_window
        self.window_waiter: asyncio.Future[None] | None = None
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0
        self.held = 0  # received bytes whose credit waits until queued messages are consumed
        self.partial: list[bytes | memoryview] = []
        self.partial_len = 0
        self.partial_need = 0
        self.recv_error: GRPCError | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.deadline_hit = False

    # -- the handler's side

    @property
    def metadata(self) -> dict[str, str]:
        """Request metadata (first value per key), for handlers that want more than the namespace."""
        out: dict[str, str] = {}
        for k, v in self.call.fields:
            if not k.startswith(":"):
                out.setdefault(k, v)
        return out

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def recv_message(self) -> Any:
        while not self.messages:
            if self.recv_error is not None:
                raise self.recv_error
            if self.remote_closed:
                return None
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        flag, body = self.messages.popleft()
        if self.held:
            self.conn.credit(self, self.held)
            self.held = 0
        if flag:
            # What grpclib answered (it implements no compression, and neither do we).
            raise GRPCError(Status.UNKNOWN, "Compression not implemented")
        handler = self.call.handler
        assert handler is not None
        return self.conn.server.codec.decode(body, handler.request_type)

    async def send_message(self, message: Any) -> None:
        handler = self.call.handler
        assert handler is not None
        if self.sent and not handler.cardinality.server_streaming:
            raise ProtocolError("Message was already sent")
        data = self.conn.server.codec.encode(message, handler.reply_type)
        conn = self.conn
        if self.reset or conn.transport is None:
            raise StreamTerminatedError("Stream reset by remote party")
        if not self.headers_sent:
            self.headers_sent = True
            conn.write_headers(self, _REPLY_HEADERS, False)
        await conn.send_data(self, h2wire.GRPC_PREFIX.pack(0, len(data)), data)
        self.sent += 1

    # -- the connection's side

    def feed(self, data: bytes | memoryview) -> None:
        """Reassemble gRPC messages (5-byte prefix + body) from DATA payloads."""
        if self.recv_error is not None:
            return
        if self.partial:
            self.partial.append(data)
            self.partial_len += len(data)
            if self.partial_len < self.partial_need:
                return
            data = b"".join(self.partial)
            self.partial = []
        n = len(data)
        pos = 0
        view = memoryview(data)
        while pos < n:
            if n - pos < 5:
                self._keep(data[pos:], 5)
                break
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            limit = self.conn.server.codec.max_recv
            if length > limit:
                # Refused on the prefix alone, as grpc-go does: nothing more is buffered.
                self.recv_error = GRPCError(
                    Status.RESOURCE_EXHAUSTED, self.conn.server.codec.too_large(length)
                )
                self.partial = []
                break
            end = pos + 5 + length
            if end > n:
                self._keep(data[pos:], 5 + length)
                break
            self.messages.append((data[pos], view[pos + 5 : end]))
            pos = end
        self.wake()

    def _keep(self, rest: bytes | memoryview, need: int) -> None:
        self.partial = [rest]
        self.partial_len = len(rest)
        self.partial_need = need

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def wake_sender(self) -> None:
        if self.window_waiter is not None and not self.window_waiter.done():
            self.window_waiter.set_result(None)

    def expire(self) -> None:
        self.deadline_hit = True
        if self.task is not None:
            self.task.cancel()


# -- connections -----------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One client connection: frames in, frames out, one task per call."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inbuf = b""
        self.preface = False
        self.decoder = http2.HeaderDecoder(MAX_HEADER_LIST_SIZE)
        self.streams: dict[int, ServerStream] = {}
        self.last_stream_id = 0
        self.out: list[Any] = []
        self.flush_scheduled = False
        self.receiving = False
        self.writable = True
        self.write_waiters: list[asyncio.Future[None]] = []
        self.send_window = h2wire.DEFAULT_WINDOW
        self.peer_initial_window = h2wire.DEFAULT_WINDOW
        self.peer_max_frame = h2wire.DEFAULT_MAX_FRAME
        self.blocked: set[ServerStream] = set()
        self.recv_window = CONNECTION_WINDOW
        self.recv_unacked = 0
        self.continued: tuple[int, int, list[bytes]] | None = None  # stream, flags, block parts

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        self.transport.write(_INITIAL_SETTINGS)

    def data_received(self, data: bytes) -> None:
        # What this read makes us write (settings and ping acks, window updates) waits until
        # the calls it started have run their first step, and leaves with their replies.
        self.receiving = True
        try:
            self._receive(data)
        except H2Error as exc:
            log.debug("http2 connection error", code=exc.code, error=str(exc))
            self.fail(exc.code, str(exc))
        except Exception as exc:  # a bug here must cost this connection, never the daemon
            log.warning("http2 connection failed", error=str(exc), exc_info=exc)
            self.fail(h2wire.INTERNAL_ERROR, "internal error")
        finally:
            self.receiving = False
            if self.out and not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        waiters, self.write_waiters = self.write_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            self._terminate(st)
        self.resume_writing()
        for st in self.blocked:
            st.wake_sender()
        self.blocked.clear()

    # -- input

    def _receive(self, data: bytes) -> None:
        pos = 0
        if not self.preface:
            data = self.inbuf + data
            self.inbuf = b""
            if len(data) < len(h2wire.PREFACE):
                if not h2wire.PREFACE.startswith(data):
                    raise H2Error(h2wire.PROTOCOL_ERROR, "invalid connection preface")
                self.inbuf = data
                return
            if not data.startswith(h2wire.PREFACE):
                raise H2Error(h2wire.PROTOCOL_ERROR, "invalid connection preface")
            self.preface = True
            pos = len(h2wire.PREFACE)
        elif self.inbuf:
            # Complete the frame the last read cut, without copying the rest of this one.
            head = self.inbuf
            if len(head) < 9:
                head += data[: 9 - len(head)]
                pos = 9 - len(self.inbuf)
                if len(head) < 9:
                    self.inbuf = head
                    return
            length = (head[0] << 16) | (head[1] << 8) | head[2]
            if length > h2wire.DEFAULT_MAX_FRAME:
                raise H2Error(h2wire.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            need = 9 + length - len(head)
            if len(data) - pos < need:
                self.inbuf = head + data[pos:]
                return
            self.inbuf = b""
            if not self._frames(head + data[pos : pos + need], 0):
                return
            pos += need
        self._frames(data, pos)

    def _frames(self, data: bytes, pos: int) -> bool:
        """Handle the whole frames in ``data`` from ``pos``, keep the rest; False once closed."""
        n = len(data)
        view = memoryview(data)
        unpack = h2wire.HEADER.unpack_from
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = (hi << 8) | lo
            if length > h2wire.DEFAULT_MAX_FRAME:
                raise H2Error(h2wire.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > n:
                break
            sid &= 0x7FFFFFFF
            if self.continued is not None and ftype != h2wire.CONTINUATION:
                raise H2Error(h2wire.PROTOCOL_ERROR, "expected CONTINUATION")
            if ftype == h2wire.DATA:
                # A view: message bodies are copied once, when a message is complete.
                self._on_data(flags, sid, view[pos + 9 : end])
                pos = end
                continue
            payload = data[pos + 9 : end]
            pos = end
            if ftype == h2wire.HEADERS:
                self._on_headers(flags, sid, payload)
            elif ftype == h2wire.WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif ftype == h2wire.SETTINGS:
                self._on_settings(flags, sid, payload)
            elif ftype == h2wire.PING:
                if sid or length != 8:
                    raise H2Error(h2wire.PROTOCOL_ERROR, "bad PING")
                if not flags & h2wire.ACK:
                    self.write(h2wire.frame(h2wire.PING, h2wire.ACK, 0, payload))
            elif ftype == h2wire.RST_STREAM:
                self._on_rst_stream(sid, payload)
            elif ftype == h2wire.CONTINUATION:
                self._on_continuation(flags, sid, payload)
            elif ftype == h2wire.GOAWAY:
                # As grpclib: the client is leaving, and takes its calls with it.
                self.close()
                return False
            elif ftype == h2wire.PRIORITY:
                if length != 5 or not sid:
                    raise H2Error(h2wire.PROTOCOL_ERROR, "bad PRIORITY")
            elif ftype == h2wire.PUSH_PROMISE:
                raise H2Error(h2wire.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # Unknown frame types are ignored (RFC 9113 §4.1).
        if pos < n:
            self.inbuf = data[pos:]
        return True

    def _on_data(self, flags: int, sid: int, payload: memoryview) -> None:
        if not sid:
            raise H2Error(h2wire.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise H2Error(h2wire.FLOW_CONTROL_ERROR, "connection window exceeded")
        if flags & h2wire.PADDED:
            if not payload or payload[0] >= size:
                raise H2Error(h2wire.PROTOCOL_ERROR, "bad padding")
            payload = payload[1 : size - payload[0]]
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            if sid > self.last_stream_id:
                raise H2Error(h2wire.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # A stream we finished or reset: the data is dropped, its credit returned.
            self.credit(None, size)
            return
        st.recv_window -= size
        if st.recv_window < 0:
            self.credit(None, size)
            self._reset(st, h2wire.FLOW_CONTROL_ERROR)
            return
        if st.local_closed:
            self.credit(st, size)  # the call is over on our side: nobody will read this
        else:
            # Credit flows back as the handler consumes: data behind unread messages waits.
            unread = bool(st.messages)
            if payload:
                st.feed(payload)
            if unread:
                st.held += size
            else:
                self.credit(st, size)
        if flags & h2wire.END_STREAM:
            self._remote_end(st)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise H2Error(h2wire.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & h2wire.PADDED:
            if not payload:
                raise H2Error(h2wire.PROTOCOL_ERROR, "bad padding")
            start, end = 1, end - payload[0]
        if flags & h2wire.PRIORITY_FLAG:
            start += 5
        if start > end:
            raise H2Error(h2wire.PROTOCOL_ERROR, "bad HEADERS padding or priority")
        block = payload[start:end]
        if flags & h2wire.END_HEADERS:
            self._on_header_block(sid, flags, block)
        else:
            self.continued = (sid, flags, [block])

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self.continued is None or self.continued[0] != sid:
            raise H2Error(h2wire.PROTOCOL_ERROR, "unexpected CONTINUATION")
        parts = self.continued[2]
        parts.append(payload)
        if sum(map(len, parts)) > 2 * MAX_HEADER_LIST_SIZE:
            raise H2Error(h2wire.PROTOCOL_ERROR, "header block too large")
        if flags & h2wire.END_HEADERS:
            _, first_flags, _ = self.continued
            self.continued = None
            self._on_header_block(sid, first_flags, b"".join(parts))

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        # Decoded whatever becomes of the stream: HPACK state is shared by the whole connection.
        call = self.decoder.decode(block, self.server.interpret)
        st = self.streams.get(sid)
        if st is not None:
            # Trailers from the client: they may only end its side.
            if not flags & h2wire.END_STREAM:
                raise H2Error(h2wire.PROTOCOL_ERROR, "HEADERS without END_STREAM on an open stream")
            self._remote_end(st)
            return
        if sid % 2 == 0 or sid <= self.last_stream_id:
            if sid % 2 == 0:
                raise H2Error(h2wire.PROTOCOL_ERROR, f"stream {sid} is not a client stream")
            self.write(h2wire.rst_stream(sid, h2wire.STREAM_CLOSED))
            return
        self.last_stream_id = sid
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.write(h2wire.rst_stream(sid, h2wire.REFUSED_STREAM))
            return
        st = ServerStream(self, sid, call)
        self.streams[sid] = st
        if flags & h2wire.END_STREAM:
            st.remote_closed = True
        if call.abort is not None:
            self._refuse(st, *call.abort)
            return
        self.server.start_call(st)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(h2wire.FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = h2wire.u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise H2Error(h2wire.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > h2wire.MAX_WINDOW:
                raise H2Error(h2wire.FLOW_CONTROL_ERROR, "connection window overflow")
            blocked, self.blocked = self.blocked, set()
            for waiting in blocked:
                waiting.wake_sender()
            return
        st = self.streams.get(sid)
        if st is None:
            return  # a stream already gone
        if not increment:
            self._reset(st, h2wire.PROTOCOL_ERROR)
            return
        st.send_window += increment
        if st.send_window > h2wire.MAX_WINDOW:
            self._reset(st, h2wire.FLOW_CONTROL_ERROR)
            return
        st.wake_sender()

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise H2Error(h2wire.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2wire.ACK:
            if payload:
                raise H2Error(h2wire.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        for key, value in http2.parse_settings(payload):
            if key == h2wire.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > h2wire.MAX_WINDOW:
                    raise H2Error(h2wire.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    st.wake_sender()
            elif key == h2wire.SETTINGS_MAX_FRAME_SIZE:
                if not h2wire.DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise H2Error(h2wire.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == h2wire.SETTINGS_ENABLE_PUSH and value > 1:
                raise H2Error(h2wire.PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # Our header blocks never use the dynamic table, so HEADER_TABLE_SIZE needs nothing.
        self.write(_SETTINGS_ACK)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2Error(h2wire.FRAME_SIZE_ERROR, "bad RST_STREAM")
        if not sid:
            raise H2Error(h2wire.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        st = self.streams.get(sid)
        if st is not None:
            self._forget(st)
            self._terminate(st)

    def _remote_end(self, st: ServerStream) -> None:
        st.remote_closed = True
        if st.partial and st.recv_error is None:
            # grpclib's answer to a body cut short by END_STREAM.
            st.recv_error = GRPCError(Status.UNKNOWN, "Received less data than expected")
        st.wake()
        if st.local_closed:
            self._forget(st)

    # -- flow control

    def credit(self, st: ServerStream | None, size: int) -> None:
        """Return ``size`` bytes of credit; WINDOW_UPDATEs go out once a quarter window is owed."""
        if not size:
            return
        self.recv_unacked += size
        if self.recv_unacked >= CONNECTION_WINDOW // 4:
            self.recv_window += self.recv_unacked
            self.write(h2wire.window_update(0, self.recv_unacked))
            self.recv_unacked = 0
        if st is not None and not st.remote_closed:
            st.recv_unacked += size
            if st.recv_unacked >= STREAM_WINDOW // 4:
                st.recv_window += st.recv_unacked
                self.write(h2wire.window_update(st.id, st.recv_unacked))
                st.recv_unacked = 0

    # -- output

    def write(self, data: Any) -> None:
        self.out.append(data)
        if not self.flush_scheduled and not self.receiving:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Everything written since the last flush leaves in one system call."""
        self.flush_scheduled = False
        out = self.out
        if not out:
            return
        self.out = []
        if self.transport is not None:
            self.transport.writelines(out)

    def write_headers(self, st: ServerStream, block: bytes, end_stream: bool) -> None:
        for f in http2.headers_frames(st.id, block, end_stream, self.peer_max_frame):
            self.write(f)

    async def send_data(self, st: ServerStream, prefix: bytes, data: bytes) -> None:
        """DATA frames for one gRPC message, within both flow-control windows."""
        total = len(prefix) + len(data)
        if total <= self.peer_max_frame and total <= st.send_window and total <= self.send_window:
            # The common case: one frame, no waiting.
            st.send_window -= total
            self.send_window -= total
            self.write(h2wire.frame_header(h2wire.DATA, 0, st.id, total) + prefix + data)
            if not self.writable:
                await self._drained(st)
            return
        payload = memoryview(prefix + data)
        pos = 0
        while pos < total:
            if st.reset or self.transport is None:
                raise StreamTerminatedError("Stream reset by remote party")
            allowed = min(st.send_window, self.send_window, total - pos)
            if allowed <= 0:
                await self._window(st)
                continue
            end = pos + allowed
            while pos < end:
                size = min(self.peer_max_frame, end - pos)
                self.write(h2wire.frame_header(h2wire.DATA, 0, st.id, size))
                self.write(payload[pos : pos + size])
                pos += size
            st.send_window -= allowed
            self.send_window -= allowed
            if not self.writable:
                await self._drained(st)

    async def _window(self, st: ServerStream) -> None:
        st.window_waiter = self.loop.create_future()
        if self.send_window <= 0:
            self.blocked.add(st)
        try:
            await st.window_waiter
        finally:
            st.window_waiter = None
            self.blocked.discard(st)

    async def _drained(self, st: ServerStream) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        while not self.writable and self.transport is not None and not st.reset:
            waiter = self.loop.create_future()
            self.write_waiters.append(waiter)
            await waiter
        if st.reset or self.transport is None:
            raise StreamTerminatedError("Stream reset by remote party")

    def finish(self, st: ServerStream, status: int, message: str | None) -> None:
        """Trailers (or a trailers-only reply), then the stream is done on our side."""
        if st.local_closed or st.reset or self.transport is None:
            return
        fields = _OK_TRAILERS if status == 0 and message is None else http2.status_fields(status, message)
        if not st.headers_sent:
            fields = _REPLY_HEADERS + fields
        self.write_headers(st, fields, True)
        self._close_local(st, status != 0)
        if not self.streams:
            # The last call on this connection ended: nothing more to coalesce with, send now.
            self.flush()

    def _refuse(
        self, st: ServerStream, h2_status: int, grpc_status: int | None, message: str | None, ct: bool
    ) -> None:
        """grpclib's answers to a request it will not run: headers only, then the stream ends."""
        block = b"\x88" if h2_status == 200 else h2wire.literal(":status", str(h2_status))
        if ct:
            block += http2.content_type(CONTENT_TYPE)
        if grpc_status is not None:
            block += h2wire.literal("grpc-status", str(grpc_status))
        if message is not None:
            block += h2wire.literal("grpc-message", message if not ct else http2.grpc_message(message))
        self.write_headers(st, block, True)
        self._close_local(st, True)

    def _close_local(self, st: ServerStream, reset_if_open: bool) -> None:
        st.local_closed = True
        if st.remote_closed:
            self._forget(st)
        elif reset_if_open:
            # The client is still sending to a call that has failed (grpclib does the same).
            self.write(h2wire.rst_stream(st.id, h2wire.NO_ERROR))
            self._forget(st)
            st.reset = True

    def _reset(self, st: ServerStream, code: int) -> None:
        self.write(h2wire.rst_stream(st.id, code))
        self._forget(st)
        self._terminate(st)

    def _forget(self, st: ServerStream) -> None:
        if self.streams.pop(st.id, None) is not None and st.held:
            # Credit for what the handler will never read.
            self.credit(None, st.held)
            st.held = 0

    def _terminate(self, st: ServerStream) -> None:
        st.reset = True
        st.remote_closed = True
        if st.task is not None and not st.task.done():
            st.task.cancel()
        st.wake()
        st.wake_sender()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY, then close."""
        if self.transport is not None:
            self.write(h2wire.goaway(self.last_stream_id, code, message.encode()[:256]))
            self.flush()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()
            self.connection_lost(None)


# -- the server ------------------------------------------------------------------------------------


class LazyService:
    """A gRPC service whose code is imported by its first call, not by the daemon's start-up.

    Start-up time is imports (docs/benchmarks.md): a service's generated messages and its module
    cost milliseconds each, and most daemons never see most services called. ``load`` returns the
    real service (an object with ``__mapping__``); it runs once, on the loop, when the first call
    for one of ``names`` (full service names, ``containerd.services.tasks.v1.Tasks``) arrives.
    """

    def __init__(self, names: Collection[str], load: Callable[[], Any]) -> None:
        self.names = tuple(names)
        self._load = load
        self.service: Any = None

    def load(self) -> Any:
        if self.service is None:
            self.service = self._load()
        return self.service


class _Server:
    """Listens, owns the connections, runs calls; ``start``/``close``/``wait_closed`` as grpclib's."""

    def __init__(
        self,
        services: Collection[Any],
        codec: LimitedCodec,
        on_request: Callable[[str], None] | None,
        inflight: set[asyncio.Task[Any]],
    ) -> None:
        mapping: dict[str, Handler] = {}
        self.lazy: dict[str, LazyService] = {}
        for service in services:
            if isinstance(service, LazyService):
                self.lazy.update(dict.fromkeys(service.names, service))
            else:
                mapping.update(service.__mapping__())
        self.mapping = mapping
        self.codec = codec
        self.on_request = on_request
        self.inflight = inflight
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    def interpret(self, fields: list[tuple[str, str]]) -> _Call:
        return _interpret(self.mapping, fields, self._load if self.lazy else None)

    def _load(self, name: str) -> bool:
        lazy = self.lazy.get(name)
        if lazy is None:
            return False
        # A failure to load is not remembered: every call reports it (UNIMPLEMENTED, as for a
        # service that is not there) and the next one tries again.
        try:
            service = lazy.load()
        except Exception as exc:
            log.error("loading gRPC service failed", service=name, error=str(exc), exc_info=exc)
            return False
        for other in lazy.names:
            self.lazy.pop(other, None)
        self.mapping.update(service.__mapping__())
        return True

    async def start(self, *, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)

    def start_call(self, st: ServerStream) -> None:
        call = st.call
        loop = st.conn.loop
        task = loop.create_task(self._run(st))
        st.task = task
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        if call.timeout is not None:
            st.deadline = loop.call_later(call.timeout, st.expire)

    async def _run(self, st: ServerStream) -> None:
        call = st.call
        handler = call.handler
        assert handler is not None
        namespaces.current.set(call.namespace)
        namespaces.lease.set(call.lease)
        status: int = 0
        message: str | None = None
        try:
            if self.on_request is not None:
                self.on_request(call.path)
            await handler.func(st)
            if not handler.cardinality.server_streaming and not st.sent:
                log.error("unary call ended without a reply", method=call.path)
                status, message = Status.UNKNOWN.value, "Internal Server Error"
        except asyncio.CancelledError:
            if not st.deadline_hit:
                return  # the client reset the stream, or the server is closing: nobody to tell
            status, message = Status.DEADLINE_EXCEEDED.value, None
        except Exception as exc:
            err = grpc_error(exc)
            if err.status in (Status.UNKNOWN, Status.INTERNAL) and not isinstance(exc, GRPCError):
                log.warning("rpc failed", method=call.path, error=str(exc), exc_info=exc)
            status, message = err.status.value, err.message
        finally:
            if st.deadline is not None:
                st.deadline.cancel()
        st.conn.finish(st, status, message)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        """Stop accepting, cancel every call, close every connection."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        pending = [t for t in self.inflight if not t.done()]
        if pending:
            await asyncio.wait(pending)


class GRPCServer:
    def __init__(
        self,
        services: Collection[Any],
        *,
        max_recv: int = 16 << 20,
        max_send: int = 16 << 20,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.inflight: set[asyncio.Task[Any]] = set()
        self.server = _Server(list(services), LimitedCodec(max_recv, max_send), on_request, self.inflight)
        self.path: str | None = None

    async def start(self, path: str, uid: int = 0, gid: int = 0) -> None:
        sock = prepare_socket(path, uid, gid)
        self.path = path
        await self.server.start(sock=sock)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, wait up to ``grace`` seconds for in-flight calls, then close."""
        self.server.stop_accepting()
        pending = [t for t in self.inflight if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                log.warning("closing with calls still running", count=len(still))
        self.server.close()
        await self.server.wait_closed()
        if self.path and os.path.lexists(self.path):
            os.unlink(self.path)
