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

from collections.abc import Callable
from typing import Any, TypeVar, cast

from hpack import Decoder

from pyctr.api.h2wire import (
    COMPRESSION_ERROR,
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    FRAME_SIZE_ERROR,
    HEADERS,
    SETTING,
    frame,
    hpack_integer,
    hpack_string,
    literal,
)

T = TypeVar("T")


class H2Error(Exception):
    """A connection error: the peer gets GOAWAY with ``code`` and the connection closes."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise H2Error(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
    return [SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


# -- header blocks we send -------------------------------------------------------------------------


STATUS_200 = b"\x88"  # indexed: static entry 8, ":status: 200"
_CONTENT_TYPE_NAME = hpack_integer(31, 4, 0x00)  # literal without indexing, static name 31 "content-type"


def content_type(value: str) -> bytes:
    return _CONTENT_TYPE_NAME + hpack_string(value)


def grpc_message(message: str) -> str:
    """gRPC percent-encodes grpc-message: UTF-8 bytes outside printable ASCII, and "%" itself.

    (urllib.parse.quote does the same, but importing it and ipaddress costs ~3 ms of start-up.)
    """
    if message.isascii() and message.isprintable() and "%" not in message:
        return message
    return "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode()) for c in message
    )


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
