"""HTTP/2 for the gRPC edge, sans IO: frame layout, the header blocks we send, the ones we read.

Wire facts used by ``daemon/server.py`` (RFC 9113, RFC 7541, gRPC's PROTOCOL-HTTP2.md):

    frame      length:24 type:8 flags:8 R:1 stream:31, then ``length`` payload bytes
    DATA       [pad length:8 if PADDED] data [padding]                         END_STREAM 0x1
    HEADERS    [pad length:8 if PADDED] [dependency:32 weight:8 if PRIORITY] block [padding]
               flags END_STREAM 0x1, END_HEADERS 0x4, PADDED 0x8, PRIORITY 0x20;
               a block without END_HEADERS continues in CONTINUATION frames of the same stream
    SETTINGS   6-byte entries id:16 value:32; ACK 0x1 with an empty payload
    gRPC body  per message: compressed:8 length:32 message

The header blocks we send never touch HPACK's dynamic table: ``:status 200`` is static entry 8,
the rest are literals "without indexing" (with a static name where one exists). Our encoder then
has no state to keep in step with the peer, and the usual reply headers are constant bytes.
Blocks we receive go through ``hpack.Decoder``; a client repeating the same request sends the same
fully indexed block, so decoded blocks that left the dynamic table unchanged are remembered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import quote

from hpack import Decoder

T = TypeVar("T")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9

# Settings.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1

HEADER = struct.Struct(">HBBBL")  # length split 16+8 bits, type, flags, stream id
_PACK_HEADER = HEADER.pack
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
GRPC_PREFIX = struct.Struct(">BL")  # compressed flag, message length


class H2Error(Exception):
    """A connection error: the peer gets GOAWAY with ``code`` and the connection closes."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _PACK_HEADER(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def frame_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return _PACK_HEADER(length >> 8, length & 0xFF, ftype, flags, stream_id)


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise H2Error(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def u32(payload: bytes) -> int:
    return int(_U32.unpack_from(payload)[0])


# -- header blocks we send -------------------------------------------------------------------------


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; ``first`` holds the representation's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _integer(len(raw), 7, 0) + raw  # never Huffman: H bit 0


def literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name (RFC 7541 §6.2.2)."""
    return b"\x00" + _string(name) + _string(value)


STATUS_200 = b"\x88"  # indexed: static entry 8, ":status: 200"
_CONTENT_TYPE_NAME = _integer(31, 4, 0x00)  # literal without indexing, static name 31 "content-type"


def content_type(value: str) -> bytes:
    return _CONTENT_TYPE_NAME + _string(value)


# gRPC percent-encodes grpc-message: everything outside printable ASCII, and "%" itself.
_UNQUOTED = "".join(chr(i) for i in range(0x20, 0x7F) if chr(i) != "%")


def grpc_message(message: str) -> str:
    return quote(message, safe=_UNQUOTED, encoding="utf-8")


def status_fields(status: int, message: str | None) -> bytes:
    block = literal("grpc-status", str(status))
    if message is not None:
        block += literal("grpc-message", grpc_message(message))
    return block


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """HEADERS (and, for a block above the peer's frame size, CONTINUATION) frames."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return [frame(HEADERS, flags | END_HEADERS, stream_id, block)]
    out = [frame(HEADERS, flags, stream_id, block[:max_frame])]
    pos = max_frame
    while pos < len(block):
        piece = block[pos : pos + max_frame]
        pos += len(piece)
        out.append(frame(CONTINUATION, END_HEADERS if pos >= len(block) else 0, stream_id, piece))
    return out


# -- header blocks we receive ----------------------------------------------------------------------


class HeaderDecoder:
    """``hpack.Decoder`` plus a memory of blocks whose decoding left the dynamic table as it was.

    Decoding is a function of the block and the table. A block that neither added an entry nor
    resized the table decodes the same way for as long as the table stays unchanged, so it is
    remembered (with what the caller made of it) until any change forgets everything.
    """

    CACHE_BLOCK_MAX = 1024
    CACHE_ENTRIES = 128

    def __init__(self, max_header_list_size: int = 64 << 10) -> None:
        self.decoder = Decoder(max_header_list_size)
        self._table = self.decoder.header_table
        self._cache: dict[bytes, Any] = {}

    def _state(self) -> tuple[int, object, int]:
        entries = self._table.dynamic_entries
        return len(entries), entries[0] if entries else None, self._table.maxsize

    def decode(self, block: bytes, interpret: Callable[[list[tuple[str, str]]], T]) -> T:
        """``interpret`` (a pure function) of the block's fields; H2Error(COMPRESSION_ERROR) if bad."""
        cached = self._cache.get(block)
        if cached is not None:
            return cast(T, cached)
        before = self._state()
        try:
            fields = [(str(n), str(v)) for n, v in self.decoder.decode(block)]
        except Exception as exc:  # hpack's errors, and anything a hostile block provokes
            raise H2Error(COMPRESSION_ERROR, f"header block: {exc}") from None
        result = interpret(fields)
        if self._state() != before:
            self._cache.clear()
        elif len(block) <= self.CACHE_BLOCK_MAX:
            if len(self._cache) >= self.CACHE_ENTRIES:
                self._cache.clear()
            self._cache[block] = result
        return result


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; ValueError if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits or len(digits) > 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"invalid grpc-timeout {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]
