"""HTTP/2 frames and the header fields we send, shared by pyctrd's gRPC edge (``daemon/http2.py``)
and pyctr's small client (``api/grpclite.py``).

    frame      length:24 type:8 flags:8 R:1 stream:31, then ``length`` payload bytes
    SETTINGS   6-byte entries id:16 value:32; ACK 0x1 with an empty payload
    gRPC body  per message: compressed:8 length:32 message

The header fields we send never touch HPACK's dynamic table: literals "without indexing", never
Huffman-coded (RFC 7541 §5.1, §5.2, §6.2.2), so an encoder keeps no state.
"""

from __future__ import annotations

import struct

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
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")  # id, value
GRPC_PREFIX = struct.Struct(">BL")  # compressed flag, message length


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _PACK_HEADER(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def frame_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return _PACK_HEADER(length >> 8, length & 0xFF, ftype, flags, stream_id)


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_stream_id) + U32.pack(code) + debug)


def u32(payload: bytes) -> int:
    return int(U32.unpack_from(payload)[0])


# -- header fields we send -------------------------------------------------------------------------


def hpack_integer(value: int, prefix_bits: int, first: int) -> bytes:
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


def hpack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return hpack_integer(len(raw), 7, 0) + raw  # never Huffman: H bit 0


def literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name (RFC 7541 §6.2.2)."""
    return b"\x00" + hpack_string(name) + hpack_string(value)
