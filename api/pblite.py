"""Protobuf wire encoding and decoding by field number, for messages written without the generated
code (where importing betterproto2 would cost more than the message is worth: the CLI's
:mod:`pyctr.api.grpclite` calls, and the shim's keeper, whose every touched object costs memory).
proto3 rules: zero scalars and empty strings are left out; sub-messages are written whenever
present (an empty one as a zero-length field).

    key        varint(field_number << 3 | wire_type)
    wire type  0 varint, 1 fixed64, 2 length-delimited (string, bytes, message, packed), 5 fixed32
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from pyctr.api.wire import varint

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


def uint(number: int, value: int) -> bytes:
    """A varint scalar (int64, uint32, bool, enum); zero is left out."""
    return varint(number << 3 | VARINT) + varint(value) if value else b""


def string(number: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | LEN) + varint(len(data)) + data if data else b""


def message(number: int, body: bytes | None) -> bytes:
    """A sub-message field: present (even when empty) unless ``body`` is None."""
    if body is None:
        return b""
    return varint(number << 3 | LEN) + varint(len(body)) + body


def repeated(number: int, bodies: Iterable[bytes]) -> bytes:
    """A repeated message (or string) field: one entry per body, empty ones included."""
    return b"".join(message(number, b) for b in bodies)


def string_map(number: int, values: Mapping[str, str]) -> bytes:
    """A ``map<string, string>``: one entry message {key = 1, value = 2} per item, both always
    written (as protobuf's own encoders write map entries, empty strings included)."""
    return repeated(number, (message(1, k.encode()) + message(2, v.encode()) for k, v in values.items()))


def packed(number: int, values: Iterable[int]) -> bytes:
    """A packed repeated varint field (proto3's default for repeated scalars); left out when empty."""
    body = b"".join(varint(v) for v in values)
    return message(number, body) if body else b""


def timestamp(seconds: float) -> bytes:
    """The body of a google.protobuf.Timestamp for a Unix time in seconds."""
    whole = int(seconds // 1)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return uint(1, whole) + uint(2, nanos)


def any_(type_url: str, value: bytes) -> bytes:
    """The body of a google.protobuf.Any."""
    return string(1, type_url) + string(2, value)


def unpack_any(data: bytes) -> tuple[str, bytes]:
    """(type_url, value) of a google.protobuf.Any body: :func:`any_` read back."""
    url, value = "", b""
    for number, raw in fields(data):
        if number == 1 and isinstance(raw, bytes):
            url = raw.decode()
        elif number == 2 and isinstance(raw, bytes):
            value = raw
    return url, value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) in wire order: an int for varints and fixed fields, bytes for the
    length-delimited ones. ValueError on malformed input."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif wire == LEN:
            n, pos = _read_varint(data, pos)
            if pos + n > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + n]
            pos += n
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if pos + size > len(data):
                raise ValueError("truncated field")
            yield number, int.from_bytes(data[pos : pos + size], "little")
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def signed(value: int) -> int:
    """An int64 read as an unsigned varint, back to its sign."""
    return value - (1 << 64) if value >= 1 << 63 else value
