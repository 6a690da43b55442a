"""A small blocking gRPC client over HTTP/2 on a unix socket, for commands that must start fast.

``pyctr images pull`` spends most of its life waiting for the daemon; importing asyncio, grpclib
(h2, multidict) and betterproto2 cost it more than the daemon's whole pull of a small image. This
client needs only ``socket`` and ``struct``: one connection, calls multiplexed on it, messages as
bytes (the caller encodes them, e.g. with :mod:`pyctr.api.pblite`), one thread, no event loop.
The caller drives it: :meth:`Channel.pump` reads what arrived and files it under its call.

Wire facts (RFC 9113, RFC 7541, gRPC's PROTOCOL-HTTP2.md)::

    frame      length:24 type:8 flags:8 R:1 stream:31, then ``length`` payload bytes
    request    HEADERS :method POST, :scheme http, :path /pkg.Service/Method, :authority,
               content-type application/grpc, te trailers[, grpc-timeout][, metadata]
    message    compressed:8 length:32 bytes, in DATA frames; END_STREAM on the last
    reply      HEADERS :status 200, DATA messages, HEADERS (trailers) grpc-status[, grpc-message]
               with END_STREAM; a failure before any message may come as trailers alone

Flow control: we announce the largest window for every stream and the connection, and top the
connection up as data is read, so the server never waits for us; what we send stays within the
server's windows (a send waits for its WINDOW_UPDATE). Our header blocks never touch HPACK's
dynamic table (literals without indexing, no Huffman). Blocks we read are decoded by a few lines
here as long as they use only what pyctrd sends (static ``:status``, literals, no Huffman); the
first block that uses more switches the connection to ``hpack.Decoder`` (nothing was added to the
dynamic table before, so both agree on it).
"""

from __future__ import annotations

import socket
import time
from collections import deque

from pyctr.api import errdefs
from pyctr.api.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    GRPC_PREFIX,
    HEADER,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    U32,
    WINDOW_UPDATE,
    frame,
    literal,
)

MAX_MESSAGE = 16 << 20  # the daemon's limit too

# The static-table entries pyctrd's replies use (RFC 7541 appendix A); anything else goes to hpack.
_STATIC = {8: (":status", "200"), 13: (":status", "404"), 14: (":status", "500")}
_STATIC_NAMES = {31: "content-type", 58: "user-agent"}


class _NeedsFullDecoder(Exception):
    pass


def _read_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _read_str(block: bytes, pos: int) -> tuple[str, int]:
    if block[pos] & 0x80:
        raise _NeedsFullDecoder  # Huffman-coded
    n, pos = _read_int(block, pos, 7)
    return block[pos : pos + n].decode("utf-8", "replace"), pos + n


def _decode_simple(block: bytes) -> list[tuple[str, str]]:
    """Decode a block that uses only static ``:status`` entries and plain literals."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(block):
        b = block[pos]
        if b & 0x80:  # indexed
            index, pos = _read_int(block, pos, 7)
            if index not in _STATIC:
                raise _NeedsFullDecoder
            out.append(_STATIC[index])
        elif b & 0xE0 == 0x20:  # dynamic table size update: nothing is in our table anyway
            _, pos = _read_int(block, pos, 5)
        elif b & 0xF0 in (0x00, 0x10):  # literal without indexing / never indexed
            index, pos = _read_int(block, pos, 4)
            if index:
                if index not in _STATIC_NAMES:
                    raise _NeedsFullDecoder
                name = _STATIC_NAMES[index]
            else:
                name, pos = _read_str(block, pos)
            value, pos = _read_str(block, pos)
            out.append((name, value))
        else:  # literal with incremental indexing: the dynamic table comes into play
            raise _NeedsFullDecoder
    return out


class Call:
    """One call's state: the messages received so far, and its status once it has ended."""

    def __init__(self, channel: Channel, stream_id: int) -> None:
        self.channel = channel
        self.id = stream_id
        self.messages: deque[bytes] = deque()
        self.done = False  # the server ended its half (or reset the stream, or the connection went)
        self.status: int | None = None
        self.message = ""
        self.window = channel.initial_window  # what we may still send on this stream
        self._buf = bytearray()
        self._block = bytearray()
        self._block_end = False
        self._headers_seen = False

    def send(self, message: bytes, end: bool = False) -> None:
        self.channel.send_data(self, GRPC_PREFIX.pack(0, len(message)) + message, end)

    def end(self) -> None:
        """End our half of the call (no more messages from us)."""
        self.channel.send_data(self, b"", True)

    def error(self) -> errdefs.ContainerdError | None:
        """The call's failure as a categorised error; None while it runs or when it succeeded."""
        if not self.done or self.status == 0:
            return None
        if self.status is None:
            return errdefs.Unavailable(self.message or f"call on {self.channel.path} ended without a status")
        return errdefs.from_status(self.status, self.message)

    def check(self) -> None:
        err = self.error()
        if err is not None:
            raise err

    # -- what the channel feeds in --------------------------------------------------------------

    def _data(self, payload: bytes) -> None:
        self._buf += payload
        while len(self._buf) >= 5:
            compressed, n = GRPC_PREFIX.unpack_from(self._buf)
            if compressed:
                raise errdefs.NotImplementedErr("compressed gRPC messages are not supported")
            if n > MAX_MESSAGE:
                raise errdefs.ResourceExhausted(f"message of {n} bytes is above the limit")
            if len(self._buf) < 5 + n:
                return
            self.messages.append(bytes(self._buf[5 : 5 + n]))
            del self._buf[: 5 + n]

    def _headers(self, fields: list[tuple[str, str]], end_stream: bool) -> None:
        values = dict(fields)
        first = not self._headers_seen
        self._headers_seen = True
        if first and values.get(":status", "200") != "200" and "grpc-status" not in values:
            self._finish(None, f"HTTP status {values.get(':status')} from {self.channel.path}")
            return
        if "grpc-status" in values:
            try:
                status = int(values["grpc-status"])
            except ValueError:
                status = int(errdefs.Code.UNKNOWN)
            message = values.get("grpc-message", "")
            if "%" in message:
                from urllib.parse import unquote  # only for a message gRPC had to percent-encode

                message = unquote(message)
            self._finish(status, message)
        elif end_stream:
            self._finish(None, f"call on {self.channel.path} ended without a status")

    def _finish(self, status: int | None, message: str) -> None:
        if not self.done:
            self.done = True
            self.status = status
            self.message = message


class Channel:
    """One HTTP/2 connection to ``path``; ``timeout`` bounds every wait on it (None: no limit)."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path.removeprefix("unix://")
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.calls: dict[int, Call] = {}
        self.initial_window = DEFAULT_WINDOW  # the server's, for our sends
        self.window = DEFAULT_WINDOW  # the server's connection window, for our sends
        self.max_frame = 16384
        self._next_id = 1
        self._inbuf = bytearray()
        self._unacked = 0  # connection-level bytes read since our last WINDOW_UPDATE
        self._hpack: object | None = None  # hpack.Decoder, once a block needs it
        self._goaway = False

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        settings = b"".join(
            SETTING.pack(k, v)
            for k, v in ((SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW))
        )
        sock.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, U32.pack(MAX_WINDOW - DEFAULT_WINDOW))
        )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Channel:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------------

    def call(self, method: str, metadata: dict[str, str], timeout: float | None = None) -> Call:
        """Start a call of ``/pkg.Service/Method``: headers only; messages follow with ``send``."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        if self._goaway:
            raise errdefs.Unavailable(f"connection to {self.path} is closing")
        stream_id = self._next_id
        self._next_id += 2
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        timeout = timeout if timeout is not None else self.timeout
        if timeout:
            fields.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        fields.extend(metadata.items())
        block = b"".join(literal(k, v) for k, v in fields)
        if len(block) > self.max_frame:
            raise errdefs.InvalidArgument("request headers larger than one frame")
        call = Call(self, stream_id)
        self.calls[stream_id] = call
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream_id, block))
        return call

    def unary(self, method: str, request: bytes, metadata: dict[str, str]) -> Call:
        """Start a unary (or server-streaming) call: the request, then the end of our half."""
        call = self.call(method, metadata)
        call.send(request, end=True)
        return call

    def send_data(self, call: Call, data: bytes, end: bool) -> None:
        assert self.sock is not None
        view = memoryview(data)
        while True:
            if call.done:
                return  # the server has ended the call: nothing more is read
            n = min(len(view), self.max_frame, self.window, call.window)
            if n <= 0 and view:
                self.pump()  # wait for the server to open its window
                continue
            last = n == len(view)
            self.sock.sendall(frame(DATA, END_STREAM if (end and last) else 0, call.id, bytes(view[:n])))
            self.window -= n
            call.window -= n
            view = view[n:]
            if last:
                return

    def wait(self, until: object, timeout: float | None = None) -> None:
        """Pump until ``until()`` is true; TimeoutError after ``timeout`` (default: the channel's)."""
        limit = timeout if timeout is not None else self.timeout
        deadline = None if limit is None else time.monotonic() + limit
        while not until():  # type: ignore[operator]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"call to {self.path} timed out")
            self.pump(left)

    # -- reading -------------------------------------------------------------------------------

    def pump(self, timeout: float | None = None) -> None:
        """Read what the server sent (waiting up to ``timeout``) and file it under its calls."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(262144)
        except TimeoutError:
            return
        if not chunk:
            self._lost("connection closed by the daemon")
            return
        self._inbuf += chunk
        out = bytearray()
        while len(self._inbuf) >= 9:
            hi, lo, ftype, flags, stream_id = HEADER.unpack_from(self._inbuf)
            length = hi << 8 | lo
            if len(self._inbuf) < 9 + length:
                break
            payload = bytes(self._inbuf[9 : 9 + length])
            del self._inbuf[: 9 + length]
            out += self._frame_in(ftype, flags, stream_id & MAX_WINDOW, payload)
        if out:
            self.sock.sendall(out)

    def _lost(self, why: str) -> None:
        for call in self.calls.values():
            call._finish(None, f"connection to {self.path} lost: {why}")
        if not self.calls:
            raise errdefs.Unavailable(f"connection to {self.path} lost: {why}")

    def _frame_in(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
        call = self.calls.get(stream_id)
        if ftype == DATA:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            self._unacked += 9 + len(payload)  # padding counts; a little extra credit is harmless
            reply = b""
            if self._unacked > MAX_WINDOW // 2:
                reply = frame(WINDOW_UPDATE, 0, 0, U32.pack(self._unacked))
                self._unacked = 0
            if call is not None:
                call._data(payload)
                if flags & END_STREAM:
                    call._headers([], True)
            return reply
        if ftype in (HEADERS, CONTINUATION):
            if call is None:
                return b""
            if ftype == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                call._block = bytearray(payload)
                call._block_end = bool(flags & END_STREAM)
            else:
                call._block += payload
            if flags & END_HEADERS:
                call._headers(self._decode(bytes(call._block)), call._block_end)
            return b""
        if ftype == SETTINGS:
            if flags & ACK:
                return b""
            for i in range(0, len(payload) - 5, 6):
                key, value = SETTING.unpack_from(payload, i)
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    for c in self.calls.values():
                        c.window += value - self.initial_window
                    self.initial_window = value
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self.max_frame = value
            return frame(SETTINGS, ACK, 0)
        if ftype == WINDOW_UPDATE:
            increment = U32.unpack_from(payload)[0] & MAX_WINDOW
            if stream_id == 0:
                self.window += increment
            elif call is not None:
                call.window += increment
            return b""
        if ftype == PING:
            return b"" if flags & ACK else frame(PING, ACK, 0, payload)
        if ftype == RST_STREAM:
            if call is not None:
                code = U32.unpack_from(payload)[0]
                call._finish(
                    int(errdefs.Code.CANCELLED) if code == 8 else None, f"stream reset (code {code})"
                )
            return b""
        if ftype == GOAWAY:
            self._goaway = True
            last = U32.unpack_from(payload)[0] & MAX_WINDOW
            for sid, c in self.calls.items():
                if sid > last:
                    c._finish(None, f"connection to {self.path} is closing")
        return b""

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        if self._hpack is None:
            try:
                return _decode_simple(block)
            except _NeedsFullDecoder:
                from hpack import Decoder  # a server that uses more of HPACK than pyctrd does

                self._hpack = Decoder()
        fields = self._hpack.decode(block, raw=False)  # type: ignore[attr-defined]
        return [(str(k), str(v)) for k, v in fields]
