"""Small conversions between our plain types and the generated protobuf messages."""

from __future__ import annotations

import datetime

from pyctr.api._pb.google.protobuf import Any as PbAny

_UTC = datetime.UTC
# Go's zero time.Time, which Go 1.6 clients send for an unset non-nullable timestamp.
GO_ZERO_SECONDS = -62135596800


def timestamp(ns: int) -> datetime.datetime:
    """A protobuf Timestamp value (microsecond precision, as betterproto2 keeps it)."""
    return datetime.datetime.fromtimestamp(ns // 1000 / 1_000_000, tz=_UTC)


def nanoseconds(ts: datetime.datetime | None) -> int:
    """Nanoseconds since the epoch; 0 for an unset timestamp or Go's zero time."""
    if ts is None:
        return 0
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_UTC)
    delta = ts - datetime.datetime(1970, 1, 1, tzinfo=_UTC)
    seconds = delta.days * 86400 + delta.seconds
    if seconds <= GO_ZERO_SECONDS:
        return 0
    return seconds * 1_000_000_000 + delta.microseconds * 1000


def any_(type_url: str, value: bytes) -> PbAny:
    return PbAny(type_url=type_url, value=value)
