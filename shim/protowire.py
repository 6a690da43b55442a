"""Protobuf wire helpers for the few messages the shim writes without the generated code.

Used where importing betterproto would cost more than the message is worth: ``delete`` prints a
``DeleteResponse`` (it runs after every task delete and must start fast), ``start`` reads the
``containerd.runc.v1.Options`` it gets on stdin, and Stats encodes the cgroup metrics messages,
which have no generated classes in ``pyctr.api``. proto3 rules: zero scalars are left out,
sub-messages are written whenever present (an empty one as a zero-length field).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_VARINT = 0
_LEN = 2


def varint(value: int) -> bytes:
    """Base-128 varint of an unsigned value; negative ints are sign-extended to 64 bits."""
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def uint(number: int, value: int) -> bytes:
    """A varint scalar (uint32/uint64/int64/bool/enum); zero is left out."""
    return _key(number, _VARINT) + varint(value) if value else b""


def string(number: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(number, _LEN) + varint(len(data)) + data if data else b""


def message(number: int, body: bytes | None) -> bytes:
    """A sub-message field: present (even when empty) unless ``body`` is None."""
    if body is None:
        return b""
    return _key(number, _LEN) + varint(len(body)) + body


def packed(number: int, values: Iterable[int]) -> bytes:
    """A packed repeated varint field (proto3's default for repeated scalars)."""
    body = b"".join(varint(v) for v in values)
    return message(number, body) if body else b""


def timestamp(seconds: float) -> bytes:
    """The body of a google.protobuf.Timestamp for a Unix time in seconds."""
    whole = int(seconds // 1)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return uint(1, whole) + uint(2, nanos)


def any_message(type_url: str, value: bytes) -> bytes:
    """The body of a google.protobuf.Any."""
    return string(1, type_url) + string(2, value)


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: int for varints, bytes for length-delimited; fixed widths skipped."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, value
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("protobuf: field runs past the end of the message")
            yield number, buf[pos : pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"protobuf: unsupported wire type {wire_type}")


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("protobuf: varint too long")
    raise ValueError("protobuf: truncated varint")
