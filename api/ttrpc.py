"""ttrpc: containerd's small RPC protocol over unix sockets (unary calls only).

Used by the daemon (serving ``containerd.services.events.ttrpc.v1.Events`` on ``<address>.ttrpc``) and by
the shim (serving ``containerd.task.v2.Task``, and as a client publishing events to the daemon).

Frame layout: a 10-byte header, all integers big-endian, then ``length`` bytes of data::

    offset size field
    0      4    length     data bytes after the header, at most MESSAGE_LENGTH_MAX (4 MiB), so byte 0
                           is always zero (the spec reserves it)
    4      4    stream_id  odd = client-initiated; even ids are reserved for server-initiated streams
    8      1    type       0x01 Request, 0x02 Response, 0x03 Data (streaming, ttrpc >= 1.2)
    9      1    flags      0x01 remote-closed, 0x02 remote-open, 0x04 no-data; a unary Request and
                           every Response carry 0
    10     ...  data       an encoded Request or Response message (below)

A unary call is one Request frame and one Response frame on the same stream id. Calls on a connection
run concurrently and their replies come back in completion order, so both ends multiplex by stream id.
There is no handshake, ping, cancel frame or flow control: an abandoned call keeps running on the server.

Messages (proto3, package ``ttrpc``), encoded here by hand to keep generated code off the hot path::

    Request  {string service = 1; string method = 2; bytes payload = 3; int64 timeout_nano = 4;
              repeated KeyValue metadata = 5;}
    KeyValue {string key = 1; string value = 2;}
    Response {google.rpc.Status status = 1; bytes payload = 2;}
    google.rpc.Status {int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3;}
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import NamedTuple, cast

from pyctr.api.errdefs import Code
from pyctr.api.wire import varint as _varint

log = logging.getLogger(__name__)

MESSAGE_HEADER_LENGTH = 10
MESSAGE_LENGTH_MAX = 4 << 20

# Message types (header byte 8).
REQUEST = 0x01
RESPONSE = 0x02
DATA = 0x03

# Flags (header byte 9); only streaming calls set them, and this module serves unary calls only.
FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04

# Metadata key carrying the containerd namespace (namespaces.WithNamespace sets it for ttrpc).
NAMESPACE_KEY = "containerd-namespace-ttrpc"

_HEADER = struct.Struct(">IIBB")
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
# A length with the reserved top byte set is at least 16 MiB: no ttrpc peer sends that, the stream is
# not ttrpc (or has lost framing), so connections close instead of discarding up to 4 GiB.
_RESERVED_LENGTH = 1 << 24
_MAX_STREAM_ID = 0xFFFFFFFF


class ProtocolError(ValueError):
    """Malformed bytes from the peer: a bad frame or an undecodable ttrpc message."""


class ConnectionClosed(ConnectionError):
    """The ttrpc connection is gone (Go's ``ttrpc.ErrClosed``); pending calls fail with it."""


class TtrpcError(Exception):
    """A call finished with a non-OK status; ``code`` is the gRPC code, ``message`` the peer's text.

    ``grpc_status`` mirrors ``code`` so a handler that re-raises a downstream error keeps its code.
    """

    def __init__(self, code: int, message: str, details: tuple[bytes, ...] = ()) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def grpc_status(self) -> int:
        return self.code

    def __str__(self) -> str:
        try:
            name = Code(self.code).name
        except ValueError:
            name = str(self.code)
        return f"ttrpc: {name}: {self.message}"


def _oversize_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"


# ---------------------------------------------------------------------------------------------------
# Framing (sans-IO)


# Frames and messages are NamedTuples: immutable values like frozen dataclasses, but created
# about ten times faster, and the daemon creates these classes at every start.
class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    data: bytes


class OversizeFrame(NamedTuple):
    """A frame whose declared length exceeded the limit; its data was discarded, not buffered.

    The receiver answers ResourceExhausted on ``stream_id`` (what Go ttrpc does).
    """

    stream_id: int
    length: int


def encode_frame(stream_id: int, type: int, flags: int, data: bytes) -> bytes:
    """Header + data as one bytes object, so a single transport write keeps frames whole.

    Raises TtrpcError(RESOURCE_EXHAUSTED) for data over MESSAGE_LENGTH_MAX, as ttrpc 1.2 senders do.
    """
    length = len(data)
    if length > MESSAGE_LENGTH_MAX:
        raise TtrpcError(Code.RESOURCE_EXHAUSTED, _oversize_message(length))
    return _HEADER.pack(length, stream_id, type, flags) + data


class FrameDecoder:
    """Turns a byte stream, chunked arbitrarily, into frames.

    Invariant: ``_buf`` holds less than one complete frame after every ``feed``; while ``_discard`` > 0
    the next that many bytes belong to an oversize frame and are dropped as they arrive.
    """

    __slots__ = ("_buf", "_discard", "_max_length")

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self._buf = bytearray()
        self._discard = 0
        self._max_length = max_length

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (discarded bytes are never held)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | OversizeFrame]:
        if self._discard:
            if len(data) <= self._discard:
                self._discard -= len(data)
                return []
            data = memoryview(data)[self._discard :]
            self._discard = 0
        buf = self._buf
        if buf:
            buf += data
            frames, used = self._parse(buf)
            del buf[:used]
        else:
            # Common case: nothing buffered, so parse the chunk in place and keep only its tail.
            frames, used = self._parse(data)
            if used < len(data):
                buf += memoryview(data)[used:]
        return frames

    def _parse(self, src: bytes | bytearray | memoryview) -> tuple[list[Frame | OversizeFrame], int]:
        frames: list[Frame | OversizeFrame] = []
        pos = 0
        end = len(src)
        # The view must be released before the caller resizes the bytearray behind it.
        with memoryview(src) as view:
            while end - pos >= MESSAGE_HEADER_LENGTH:
                length, stream_id, mtype, flags = _HEADER.unpack_from(view, pos)
                start = pos + MESSAGE_HEADER_LENGTH
                if length > self._max_length:
                    frames.append(OversizeFrame(stream_id, length))
                    if end - start >= length:
                        pos = start + length
                        continue
                    self._discard = length - (end - start)
                    return frames, end
                stop = start + length
                if stop > end:
                    break
                frames.append(Frame(stream_id, mtype, flags, bytes(view[start:stop])))
                pos = stop
        return frames, pos


# ---------------------------------------------------------------------------------------------------
# Protobuf codec for ttrpc's own messages

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Returns (value, next position). At most 10 bytes, the 10th at most 1, as Go's protowire."""
    result = 0
    shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise ProtocolError("varint overflows 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ProtocolError("truncated varint")


def _skip_value(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    """Skips one non-group value; returns the next position."""
    if wire_type == 0:
        return _read_varint(buf, pos, end)[1]
    if wire_type == 2:
        length, pos = _read_varint(buf, pos, end)
        size = length
    elif wire_type == 1:
        size = 8
    elif wire_type == 5:
        size = 4
    else:
        raise ProtocolError(f"invalid wire type {wire_type}")
    if pos + size > end:
        raise ProtocolError("field runs past the end of the message")
    return pos + size


def _split_key(key: int) -> tuple[int, int]:
    number = key >> 3
    if number < 1 or number > _MAX_FIELD:
        raise ProtocolError(f"invalid field number {number}")
    return number, key & 7


def _skip_group(buf: bytes, pos: int, end: int, number: int) -> int:
    """Skips a (deprecated) group up to its matching end tag; iterative, so nesting cannot recurse."""
    open_groups = [number]
    while open_groups:
        key, pos = _read_varint(buf, pos, end)
        inner, wire_type = _split_key(key)
        if wire_type == 3:
            open_groups.append(inner)
        elif wire_type == 4:
            if open_groups.pop() != inner:
                raise ProtocolError("mismatched end group")
        else:
            pos = _skip_value(buf, pos, end, wire_type)
    return pos


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yields (field number, value) per field: int for varints, bytes for length-delimited.

    Fixed32/64 and groups are skipped (no ttrpc field uses them). A known field with an unexpected
    wire type is thus seen as another type and ignored by the caller, as Go's decoders treat it as an
    unknown field.
    """
    pos = 0
    end = len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        number, wire_type = _split_key(key)
        if wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise ProtocolError("length-delimited field runs past the end of the message")
            yield number, buf[pos:stop]
            pos = stop
        elif wire_type == 0:
            value, pos = _read_varint(buf, pos, end)
            yield number, value
        elif wire_type == 3:
            pos = _skip_group(buf, pos, end, number)
        else:
            # Fixed widths are skipped; 4 (end group without a start), 6 and 7 raise.
            pos = _skip_value(buf, pos, end, wire_type)


def _utf8(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid UTF-8 in string field: {exc}") from None


def _len_field(tag: bytes, value: bytes) -> bytes:
    return tag + _varint(len(value)) + value


def _signed_varint(value: int, bits: int) -> bytes:
    """Varint of a signed int32/int64: negatives are sign-extended to 64 bits (always 10 bytes)."""
    limit = 1 << (bits - 1)
    if not -limit <= value < limit:
        raise ValueError(f"{value} does not fit in int{bits}")
    return _varint(value & _MASK64)


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _to_int32(value: int) -> int:
    # Go truncates the 64-bit varint to its low 32 bits for int32 fields.
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


class KeyValue(NamedTuple):
    key: str = ""
    value: str = ""

    def encode(self) -> bytes:
        parts = []
        if self.key:
            parts.append(_len_field(b"\x0a", self.key.encode()))
        if self.value:
            parts.append(_len_field(b"\x12", self.value.encode()))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> KeyValue:
        key = value = ""
        for number, raw in _fields(data):
            if isinstance(raw, bytes):
                if number == 1:
                    key = _utf8(raw)
                elif number == 2:
                    value = _utf8(raw)
        return cls(key, value)


class Request(NamedTuple):
    service: str = ""
    method: str = ""
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[KeyValue, ...] = ()

    def encode(self) -> bytes:
        # proto3: zero values are left out, field order follows field numbers (as Go emits them).
        parts = []
        if self.service:
            parts.append(_len_field(b"\x0a", self.service.encode()))
        if self.method:
            parts.append(_len_field(b"\x12", self.method.encode()))
        if self.payload:
            parts.append(_len_field(b"\x1a", self.payload))
        if self.timeout_nano:
            parts.append(b"\x20" + _signed_varint(self.timeout_nano, 64))
        for kv in self.metadata:
            parts.append(_len_field(b"\x2a", kv.encode()))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        service = method = ""
        payload = b""
        timeout_nano = 0
        metadata = []
        for number, raw in _fields(bytes(data)):
            if isinstance(raw, bytes):
                if number == 1:
                    service = _utf8(raw)
                elif number == 2:
                    method = _utf8(raw)
                elif number == 3:
                    payload = raw
                elif number == 5:
                    metadata.append(KeyValue.decode(raw))
            elif number == 4:
                timeout_nano = _to_int64(raw)
        return cls(service, method, payload, timeout_nano, tuple(metadata))


class Status(NamedTuple):
    """google.rpc.Status; ``details`` are encoded google.protobuf.Any messages, kept opaque."""

    code: int = 0
    message: str = ""
    details: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        parts = []
        if self.code:
            parts.append(b"\x08" + _signed_varint(self.code, 32))
        if self.message:
            parts.append(_len_field(b"\x12", self.message.encode()))
        for detail in self.details:
            parts.append(_len_field(b"\x1a", detail))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Status:
        code = 0
        message = ""
        details = []
        for number, raw in _fields(bytes(data)):
            if isinstance(raw, bytes):
                if number == 2:
                    # Only shown to humans: a peer's bad UTF-8 must not hide the error it reports.
                    message = raw.decode(errors="replace")
                elif number == 3:
                    details.append(raw)
            elif number == 1:
                code = _to_int32(raw)
        return cls(code, message, tuple(details))


class Response(NamedTuple):
    """``status`` None means the peer left it out, which clients treat as OK like Go does."""

    status: Status | None = None
    payload: bytes = b""

    def encode(self) -> bytes:
        parts = []
        if self.status is not None:
            parts.append(_len_field(b"\x0a", self.status.encode()))
        if self.payload:
            parts.append(_len_field(b"\x12", self.payload))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Response:
        status_parts: list[bytes] = []
        payload = b""
        for number, raw in _fields(bytes(data)):
            if isinstance(raw, bytes):
                if number == 1:
                    status_parts.append(raw)
                elif number == 2:
                    payload = raw
        # A repeated message field merges, which for protobuf is decoding the concatenation.
        status = Status.decode(b"".join(status_parts)) if status_parts else None
        return cls(status, payload)


# ---------------------------------------------------------------------------------------------------
# Server


class Context:
    """What a handler learns about its call besides the payload.

    A plain class: the daemon imports this module at every start, and creating a dataclass costs
    ~0.5 ms of it.
    """

    __slots__ = ("metadata", "method", "service", "stream_id", "timeout")

    def __init__(
        self,
        metadata: dict[str, list[str]] | None = None,
        timeout: float | None = None,  # seconds the client allowed (timeout_nano), None = no deadline
        service: str = "",
        method: str = "",
        stream_id: int = 0,
    ) -> None:
        self.metadata: dict[str, list[str]] = {} if metadata is None else metadata
        self.timeout = timeout
        self.service = service
        self.method = method
        self.stream_id = stream_id

    def get(self, key: str) -> str | None:
        """First value of a metadata key (looked up lower-cased, like Go's ttrpc.MD.Get)."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        return self.get(NAMESPACE_KEY)


Handler = Callable[[bytes, Context], Awaitable[bytes]]
StatusHook = Callable[[Exception], Status]

_DEADLINE_STATUS = Status(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
_OK_STATUS = Status()


def default_status_from_exception(exc: Exception) -> Status:
    """The status a failed handler answers with: the exception's ``grpc_status`` if any, else Unknown."""
    code = getattr(exc, "grpc_status", None)
    if not isinstance(code, int) or isinstance(code, bool) or code == 0:
        code = Code.UNKNOWN
    message = exc.message if isinstance(exc, TtrpcError) else str(exc)
    return Status(code, message or type(exc).__name__)


class Server:
    """Serves registered unary handlers on unix sockets.

    Lifetime: ``serve_unix``/``serve_socket`` return once listening; ``close()`` stops listening,
    drops connections and cancels running handlers; ``wait_closed()`` returns after ``close()`` once
    all of that finished; ``shutdown()`` is the graceful variant that lets running calls answer first.
    """

    def __init__(
        self,
        *,
        require_same_user: bool = True,
        status_from_exception: StatusHook = default_status_from_exception,
    ) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        # Resolved once, like Go's UnixSocketRequireSameUser: peers must match our euid and egid.
        self._required_creds = (os.geteuid(), os.getegid()) if require_same_user else None
        self._status_from_exception = status_from_exception
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[_ServerConnection] = set()
        # Strong references: the loop keeps only weak ones, and handlers outlive their connection.
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closed_event = asyncio.Event()

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        if service in self._services:
            raise ValueError(f"duplicate service {service} registered")
        self._services[service] = dict(methods)

    async def serve_unix(self, path: str) -> None:
        """Listens on a filesystem (or ``\\0``-prefixed abstract) path; a stale socket file is replaced."""
        loop = asyncio.get_running_loop()
        self._check_open()
        self._listeners.append(await loop.create_unix_server(self._new_connection, path=path))

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serves a bound, listening AF_UNIX socket (e.g. fd 3 inherited by a shim)."""
        loop = asyncio.get_running_loop()
        self._check_open()
        self._listeners.append(await loop.create_unix_server(self._new_connection, sock=sock))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.abort()
        for task in self._tasks:
            task.cancel()
        self._closed_event.set()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()
        for listener in self._listeners:
            await listener.wait_closed()
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def shutdown(self, grace: float | None = None) -> None:
        """Stops accepting, waits (up to ``grace`` seconds) for running calls to answer, then closes."""
        for listener in self._listeners:
            listener.close()
        try:
            async with asyncio.timeout(grace):
                # Loop: requests already in flight on open connections may still start new handlers.
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            pass
        self.close()
        await self.wait_closed()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ttrpc server is closed")

    def _new_connection(self) -> _ServerConnection:
        return _ServerConnection(self)


def _peer_creds(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer from SO_PEERCRED; None when not a unix socket."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class _ServerConnection(asyncio.Protocol):
    """One accepted connection: decodes frames, starts a task per request, writes replies as they finish."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._last_stream_id = 0
        self._active: set[int] = set()  # stream ids whose handler has not answered yet
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        required = self._server._required_creds
        if required is not None:
            creds = _peer_creds(transport)
            if creds is None or (creds[1], creds[2]) != required:
                log.warning(
                    "ttrpc: refusing connection: peer credentials %s, want uid/gid %s", creds, required
                )
                self._lost = True
                transport.abort()
                return
        if self._server._closed:
            self._lost = True
            transport.abort()
            return
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # Running handlers are left alone (nothing to cancel them with in the protocol); their replies
        # are dropped when they finish.
        self._lost = True
        self._server._connections.discard(self)

    def abort(self) -> None:
        self._lost = True
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        # The peer is not reading replies: stop reading its requests until it catches up.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
                if self._lost:
                    return
        except Exception:
            # A bug reached by peer bytes costs this connection only, never the server.
            log.exception("ttrpc: closing connection after internal error")
            self.abort()

    def _dispatch(self, frame: Frame | OversizeFrame) -> None:
        sid = frame.stream_id
        if isinstance(frame, OversizeFrame):
            if frame.length >= _RESERVED_LENGTH:
                log.warning("ttrpc: closing connection: frame length %d is not ttrpc", frame.length)
                self.abort()
            else:
                self._send_status(sid, Status(Code.RESOURCE_EXHAUSTED, _oversize_message(frame.length)))
            return
        # Checks in ttrpc 1.2's order: odd ids for every frame type, then per type.
        if sid % 2 != 1:
            self._send_status(
                sid, Status(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            )
        elif frame.type == REQUEST:
            self._on_request(sid, frame.data)
        elif frame.type == DATA:
            # Only unary methods exist here: Data is an error on a finished stream and ignored on a
            # running one (answering there would end the stream before its handler does).
            if sid not in self._active:
                self._send_status(sid, Status(Code.INVALID_ARGUMENT, "StreamID is no longer active"))
        else:
            log.debug("ttrpc: ignoring frame type %d on stream %d", frame.type, sid)

    def _on_request(self, sid: int, data: bytes) -> None:
        if sid <= self._last_stream_id:
            self._send_status(
                sid, Status(Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            )
            return
        self._last_stream_id = sid
        try:
            req = Request.decode(data)
        except ProtocolError as exc:
            self._send_status(sid, Status(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"))
            return
        handler = self._server._services.get(req.service, {}).get(req.method)
        if handler is None:
            message = f"service {req.service}: method {req.method}: not implemented"
            self._send_status(sid, Status(Code.UNIMPLEMENTED, message))
            return
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        # timeout_nano != 0 is a deadline (negative = already expired), as Go's context.WithTimeout.
        timeout = req.timeout_nano / 1e9 if req.timeout_nano else None
        ctx = Context(metadata, timeout, req.service, req.method, sid)
        task = asyncio.get_running_loop().create_task(self._serve(handler, req.payload, ctx))
        self._active.add(sid)
        tasks = self._server._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _serve(self, handler: Handler, payload: bytes, ctx: Context) -> None:
        reply = b""
        deadline = asyncio.timeout(ctx.timeout)
        try:
            async with deadline:
                reply = await handler(payload, ctx)
            status = _OK_STATUS
            if not isinstance(reply, bytes | bytearray | memoryview):
                status = Status(Code.INTERNAL, f"ttrpc: handler returned {type(reply).__name__}, want bytes")
                reply = b""
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._active.discard(ctx.stream_id)
                raise  # server shutdown: nobody is left to answer
            status = Status(Code.CANCELLED, "context canceled")
        except Exception as exc:
            status = _DEADLINE_STATUS if deadline.expired() else self._status_of(exc)
        self._active.discard(ctx.stream_id)
        self._send(ctx.stream_id, Response(status, bytes(reply)))

    def _status_of(self, exc: Exception) -> Status:
        try:
            return self._server._status_from_exception(exc)
        except Exception:
            log.exception("ttrpc: status_from_exception failed")
            return Status(Code.UNKNOWN, str(exc))

    def _send_status(self, sid: int, status: Status) -> None:
        self._send(sid, Response(status))

    def _send(self, sid: int, response: Response) -> None:
        if self._lost or self._transport is None:
            log.debug("ttrpc: dropping reply on stream %d: connection closed", sid)
            return
        try:
            frame = encode_frame(sid, RESPONSE, 0, response.encode())
        except TtrpcError as exc:
            # An oversize reply becomes an error on its stream; Go 1.2 would close the connection.
            frame = encode_frame(sid, RESPONSE, 0, Response(Status(exc.code, exc.message)).encode())
        self._transport.write(frame)


# ---------------------------------------------------------------------------------------------------
# Client

Metadata = Mapping[str, str | Sequence[str]]


def _metadata_pairs(metadata: Metadata | None) -> tuple[KeyValue, ...]:
    """One KeyValue per value with lower-cased keys, as Go's ttrpc.MD sends them."""
    if not metadata:
        return ()
    pairs = []
    for key, values in metadata.items():
        key = key.lower()
        if isinstance(values, str):
            pairs.append(KeyValue(key, values))
        else:
            pairs.extend(KeyValue(key, value) for value in values)
    return tuple(pairs)


def _socket_address(path: str) -> str:
    # containerd hands out "unix:///run/..." addresses; Go also reads a leading "@" as abstract.
    path = path.removeprefix("unix://")
    return "\0" + path[1:] if path.startswith("@") else path


class _ClientConnection(asyncio.Protocol):
    """Client state: the next stream id, the pending calls by id, and the read side."""

    def __init__(self, on_close: Callable[[], object] | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._next_id = 1
        # Futures of calls awaiting a reply; each call removes its own entry when it returns.
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._closed = False
        self._on_close = on_close
        self._lost = self._loop.create_future()
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending(exc)
        self._resume()
        if not self._lost.done():
            self._lost.set_result(None)
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:
                    log.exception("ttrpc: on_close callback failed")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._resume()

    def _resume(self) -> None:
        self._paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self._fail_pending(None)
        if self._transport is not None:
            self._transport.close()

    def _fail_pending(self, cause: Exception | None) -> None:
        self._closed = True
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                error = ConnectionClosed("ttrpc: closed")
                error.__cause__ = cause
                fut.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        for frame in self._decoder.feed(data):
            if isinstance(frame, OversizeFrame) and frame.length >= _RESERVED_LENGTH:
                log.warning("ttrpc: closing connection: frame length %d is not ttrpc", frame.length)
                self.close()
                return
            fut = self._pending.pop(frame.stream_id, None)
            if fut is None or fut.done():
                # Expected after a local timeout or cancellation: the server still answers.
                log.debug("ttrpc: reply on inactive stream %d dropped", frame.stream_id)
            elif isinstance(frame, OversizeFrame):
                fut.set_exception(TtrpcError(Code.RESOURCE_EXHAUSTED, _oversize_message(frame.length)))
            elif frame.type != RESPONSE:
                fut.set_exception(ProtocolError(f"unexpected message type {frame.type} on a unary call"))
            else:
                fut.set_result(frame.data)

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        metadata: Metadata | None,
        timeout: float | None,  # sent as timeout_nano, so not the caller's to wrap
    ) -> bytes:
        if self._closed or self._transport is None:
            raise ConnectionClosed("ttrpc: closed")
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            # At least 1: zero on the wire would mean "no deadline".
            timeout_nano = max(1, int(timeout * 1e9))
        request = Request(service, method, payload, timeout_nano, _metadata_pairs(metadata))
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            # 2**31 calls later: ids must keep increasing (ttrpc 1.2 servers enforce it), so start over.
            self.close()
            raise ConnectionClosed("ttrpc: stream ids exhausted on this connection, reconnect")
        # Encoding may refuse an oversize request; do it before the id is spent so ids stay dense.
        frame = encode_frame(sid, REQUEST, 0, request.encode())
        self._next_id = sid + 2
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[sid] = fut
        # Id allocation and the write happen without yielding, so ids reach the wire increasing.
        self._transport.write(frame)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if self._paused:
                    await self._drain()
                data = await fut
        except TimeoutError:
            if deadline.expired():
                raise TtrpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from None
            raise
        finally:
            self._pending.pop(sid, None)
        response = Response.decode(data)
        status = response.status
        if status is not None and status.code != Code.OK:
            raise TtrpcError(status.code, status.message, status.details)
        return response.payload

    async def _drain(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        # Shielded: one cancelled caller must not cancel the waiter the others share.
        await asyncio.shield(self._drain_waiter)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)


class Client:
    """A ttrpc client over one unix socket connection; calls are multiplexed and may run concurrently.

    ``on_close`` runs once when the connection ends, whether by ``close()`` or by the peer.
    """

    def __init__(self, conn: _ClientConnection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, path: str, *, on_close: Callable[[], object] | None = None) -> Client:
        """Dials ``path``: a file path, ``unix://`` address, or ``@name``/``\\0name`` abstract socket."""
        loop = asyncio.get_running_loop()
        # Our own socket: uvloop's connect(path=...) cannot reach abstract names (EINVAL).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, _socket_address(path))
        except BaseException:
            sock.close()
            raise
        return await cls.connect_socket(sock, on_close=on_close)

    @classmethod
    async def connect_socket(
        cls, sock: socket.socket, *, on_close: Callable[[], object] | None = None
    ) -> Client:
        """Wraps an already connected AF_UNIX socket (e.g. one end of a socketpair)."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(lambda: _ClientConnection(on_close), sock=sock)
        return cls(conn)

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: Metadata | None = None,
        timeout: float | None = None,  # the server must learn the deadline
    ) -> bytes:
        """One unary call; returns the reply payload.

        Raises TtrpcError for a non-OK status (also for a local timeout, as DEADLINE_EXCEEDED),
        ConnectionClosed when the connection ends first, ProtocolError for an undecodable reply.
        ``timeout`` (seconds) is also sent so the server cancels the handler at the same deadline.
        """
        return await self._conn.call(service, method, payload, metadata, timeout)

    @property
    def closed(self) -> bool:
        return self._conn._closed

    def close(self) -> None:
        """Fails pending calls with ConnectionClosed and closes the socket; idempotent."""
        self._conn.close()

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()
