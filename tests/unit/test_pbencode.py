"""``pyctr.api.pbencode.encode`` gives exactly ``bytes(message)``, for every generated message type.

Random instances are built from each class's own field metadata (scalars of every width and sign,
strings with non-ASCII text, nested and wrapped messages, enums, repeated and packed fields, maps),
with some fields left at their defaults so that the skipping rules are exercised too.
"""

# ruff: noqa: RUF009

from __future__ import annotations

import importlib
import pkgutil
import random
import string
from dataclasses import dataclass
from typing import Any

import betterproto2
import pytest

from pyctr.api import _pb, pbencode

B = betterproto2


def _message_classes() -> list[type[betterproto2.Message]]:
    found: dict[str, type[betterproto2.Message]] = {}

    def visit(namespace: dict[str, Any], module: str) -> None:
        for value in namespace.values():
            if (
                isinstance(value, type)
                and issubclass(value, betterproto2.Message)
                and value.__module__ == module
            ):
                if f"{module}.{value.__qualname__}" not in found:
                    found[f"{module}.{value.__qualname__}"] = value
                    visit(dict(vars(value)), module)  # nested messages

    for mod in pkgutil.walk_packages(_pb.__path__, _pb.__name__ + "."):
        module = importlib.import_module(mod.name)
        visit(dict(vars(module)), module.__name__)
    return [found[k] for k in sorted(found)]


_INTS = {
    B.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    B.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    B.TYPE_UINT32: (0, (1 << 32) - 1),
    B.TYPE_UINT64: (0, (1 << 64) - 1),
    B.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    B.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    B.TYPE_FIXED32: (0, (1 << 32) - 1),
    B.TYPE_FIXED64: (0, (1 << 64) - 1),
    B.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    B.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
}


def _scalar(rnd: random.Random, proto_type: str) -> Any:
    if proto_type in _INTS:
        lo, hi = _INTS[proto_type]
        return rnd.choice([0, 1, -1 if lo < 0 else 2, lo, hi, rnd.randint(lo, hi), rnd.randint(0, 300)])
    if proto_type == B.TYPE_BOOL:
        return rnd.choice([True, False])
    if proto_type == B.TYPE_DOUBLE:
        return rnd.choice([0.0, -1.5, 1e300, rnd.uniform(-1e6, 1e6)])
    if proto_type == B.TYPE_FLOAT:
        return rnd.choice([0.0, 0.5, -2.25, float(rnd.randint(-1000, 1000))])
    if proto_type == B.TYPE_STRING:
        return "".join(rnd.choice(string.printable + "äß€😀") for _ in range(rnd.randint(0, 12)))
    if proto_type == B.TYPE_BYTES:
        return rnd.randbytes(rnd.randint(0, 40))
    raise AssertionError(proto_type)


def _value(rnd: random.Random, meta: Any, cls: Any, depth: int) -> Any:
    if meta.proto_type == B.TYPE_ENUM:
        return rnd.choice(list(cls))
    if meta.proto_type == B.TYPE_MESSAGE:
        if meta.unwrap is not None:
            return _fill(meta.unwrap(), rnd, depth + 1).to_wrapped()
        return cls() if depth > 3 else _fill(cls, rnd, depth + 1)
    return _scalar(rnd, meta.proto_type)


def _fill(cls: Any, rnd: random.Random, depth: int = 0) -> Any:
    msg = cls()
    meta = msg._betterproto
    groups: set[str] = set()
    for name, m in meta.meta_by_field_name.items():
        if rnd.random() < 0.3 or (m.group and m.group in groups):
            continue
        if m.group:
            groups.add(m.group)
        if cls.__name__ == "Timestamp" and name == "nanos":
            value: Any = rnd.randint(0, 999_999_999)
        elif cls.__name__ == "Timestamp" and name == "seconds":
            value = rnd.randint(0, 4_000_000_000)
        elif cls.__name__ == "Duration":
            value = rnd.randint(0, 999_999) if name == "nanos" else rnd.randint(0, 10**6)
        elif m.map_meta:
            kmeta, vmeta = m.map_meta
            vcls = meta.cls_by_field.get(f"{name}.value")
            value = {
                _scalar(rnd, kmeta.proto_type): _value(rnd, vmeta, vcls, depth)
                for _ in range(rnd.randint(0, 3))
            }
        elif m.repeated:
            value = [_value(rnd, m, meta.cls_by_field[name], depth) for _ in range(rnd.randint(0, 3))]
        else:
            value = _value(rnd, m, meta.cls_by_field[name], depth)
        setattr(msg, name, value)
    return msg


CLASSES = _message_classes()


def test_every_generated_module_has_messages() -> None:
    assert len(CLASSES) > 200


@pytest.mark.parametrize(
    "cls", CLASSES, ids=lambda c: f"{c.__module__.removeprefix('pyctr.api._pb.')}.{c.__name__}"
)
def test_same_bytes_as_betterproto2(cls: type[betterproto2.Message]) -> None:
    rnd = random.Random(cls.__qualname__)
    assert pbencode.encode(cls()) == bytes(cls())
    for _ in range(8):
        msg = _fill(cls, rnd)
        assert pbencode.encode(msg) == bytes(msg)


def test_unknown_fields_are_kept() -> None:
    from pyctr.api._pb.containerd.services.version.v1 import VersionResponse

    msg = VersionResponse.parse(bytes(VersionResponse(version="1", revision="r")) + b"\xa0\x06\x07")
    assert pbencode.encode(msg) == bytes(msg)
    assert pbencode.encode(msg).endswith(b"\xa0\x06\x07")


# Field kinds containerd's protos do not use, so that every rule of the encoder is exercised (written
# the way the generated code declares fields).
_STR_TO_INT = betterproto2.map_meta(B.TYPE_STRING, B.TYPE_INT32)
_INT_TO_STR = betterproto2.map_meta(B.TYPE_INT64, B.TYPE_STRING)


@dataclass(eq=False, repr=False)
class _Every(betterproto2.Message):
    s32: int = betterproto2.field(1, B.TYPE_SINT32)
    s64: int = betterproto2.field(2, B.TYPE_SINT64)
    packed_u32: list[int] = betterproto2.field(3, B.TYPE_UINT32, repeated=True)
    packed_i64: list[int] = betterproto2.field(4, B.TYPE_INT64, repeated=True)
    packed_bool: list[bool] = betterproto2.field(5, B.TYPE_BOOL, repeated=True)
    packed_s32: list[int] = betterproto2.field(6, B.TYPE_SINT32, repeated=True)
    packed_f32: list[int] = betterproto2.field(7, B.TYPE_FIXED32, repeated=True)
    packed_double: list[float] = betterproto2.field(8, B.TYPE_DOUBLE, repeated=True)
    f32: int = betterproto2.field(9, B.TYPE_FIXED32)
    f64: int = betterproto2.field(10, B.TYPE_FIXED64)
    sf32: int = betterproto2.field(11, B.TYPE_SFIXED32)
    sf64: int = betterproto2.field(12, B.TYPE_SFIXED64)
    flt: float = betterproto2.field(13, B.TYPE_FLOAT)
    dbl: float = betterproto2.field(14, B.TYPE_DOUBLE)
    blobs: list[bytes] = betterproto2.field(15, B.TYPE_BYTES, repeated=True)
    by_name: dict[str, int] = betterproto2.field(
        16, B.TYPE_MAP, map_meta=betterproto2.map_meta(B.TYPE_STRING, B.TYPE_INT32)
    )
    by_id: dict[int, str] = betterproto2.field(
        17, B.TYPE_MAP, map_meta=betterproto2.map_meta(B.TYPE_INT64, B.TYPE_STRING)
    )
    opt: int | None = betterproto2.field(18, B.TYPE_UINT64, optional=True)


def test_every_field_kind() -> None:
    rnd = random.Random(7)
    assert pbencode.encode(_Every()) == bytes(_Every())
    assert pbencode.encode(_Every(opt=0)) == bytes(_Every(opt=0)) != b""
    for _ in range(300):
        msg = _fill(_Every, rnd)
        assert pbencode.encode(msg) == bytes(msg)
