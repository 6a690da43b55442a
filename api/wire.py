"""Protobuf wire-format primitives shared by the hand-written codecs (ttrpc, pbencode, content)."""

from __future__ import annotations

_ONE_BYTE = [bytes((i,)) for i in range(0x80)]  # the common case for tags and lengths


def varint(value: int) -> bytes:
    """Base-128 varint; a negative value is encoded as its 64-bit two's complement, as protobuf does."""
    if value < 0:
        if value < -(1 << 63):
            raise ValueError("a negative value below -2**63 does not fit a 64-bit varint")
        value += 1 << 64
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)
