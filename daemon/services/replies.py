"""List replies encoded straight from metadata records, byte for byte what the generated classes give.

Images.List and Leases.List answer with every record of a namespace. Building a generated message
per record (with datetime timestamps) and encoding it cost ~20 µs per image, most of pyctrd's share
of a 200-image List. The messages are simple, so they are written here by hand:

    Image       1: name  2: labels (map)  3: target (Descriptor)  7: created_at  8: updated_at
    Descriptor  1: media_type  2: digest  3: size (int64)  5: annotations (map)
    Lease       1: id  2: created_at  3: labels (map)
    Timestamp   1: seconds (int64)  2: nanos (int32), kept to the microsecond as betterproto2 does
    map entry   1: key  2: value, both always written (as betterproto2 writes them)
    ListImagesResponse / leases.ListResponse   1: repeated Image / Lease

A field at its default is left out, a message field never is (an empty target is ``1a 00``).
``tests/unit/test_list_replies.py`` compares the bytes with the generated classes' for random records.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from grpclib.const import Handler

from pyctr.api import namespaces
from pyctr.api.wire import varint
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.metadata.images import Image
from pyctr.daemon.metadata.leases import Lease

T = TypeVar("T")


class Encoded:
    """A reply already encoded; the gRPC edge sends its bytes as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


def _string(tag: bytes, value: str) -> bytes:
    if not value:
        return b""
    data = value.encode()
    return tag + varint(len(data)) + data


def _map(tag: bytes, values: Mapping[str, str]) -> bytes:
    out = bytearray()
    for key, value in values.items():
        k, v = key.encode(), value.encode()
        entry = b"\x0a" + varint(len(k)) + k + b"\x12" + varint(len(v)) + v
        out += tag + varint(len(entry)) + entry
    return bytes(out)


def _timestamp(tag: bytes, ns: int) -> bytes:
    seconds, micros = divmod(ns // 1000, 1_000_000)
    body = (b"\x08" + varint(seconds) if seconds else b"") + (
        b"\x10" + varint(micros * 1000) if micros else b""
    )
    return tag + varint(len(body)) + body


def image(img: Image) -> bytes:
    t = img.target
    target = (
        _string(b"\x0a", t.media_type)
        + _string(b"\x12", t.digest)
        + (b"\x18" + varint(t.size) if t.size else b"")
        + _map(b"\x2a", t.annotations)
    )
    return (
        _string(b"\x0a", img.name)
        + _map(b"\x12", img.labels)
        + b"\x1a"
        + varint(len(target))
        + target
        + _timestamp(b"\x3a", img.created_at)
        + _timestamp(b"\x42", img.updated_at)
    )


def lease(item: Lease) -> bytes:
    return _string(b"\x0a", item.id) + _timestamp(b"\x12", item.created_at) + _map(b"\x1a", item.labels)


def repeated(encoded: Iterable[bytes]) -> Encoded:
    """A reply whose field 1 repeats the given messages (ListImagesResponse, ListResponse)."""
    out = bytearray()
    for message in encoded:
        out += b"\x0a" + varint(len(message)) + message
    return Encoded(bytes(out))


def list_route(
    mapping: dict[str, Handler],
    path: str,
    db: Callable[[], DB],
    lister: Callable[[sqlite3.Connection, str, Sequence[str]], list[T]],
    encode: Callable[[T], bytes],
) -> None:
    """Replaces the generated List route at ``path``: the namespace's records as ``lister`` reads
    them (with the request's filters) from ``db()``, answered as repeated field 1 encoded by
    ``encode``. ``db`` is looked up per call: building the routes needs no service state."""

    async def handle(stream: Any) -> None:
        req = await stream.recv_message()
        assert req is not None  # as the generated handler asserts
        ns = namespaces.required()
        found = await db().view(lambda c: lister(c, ns, req.filters))
        await stream.send_message(repeated(map(encode, found)))

    mapping[path] = mapping[path]._replace(func=handle, reply_type=Encoded)
