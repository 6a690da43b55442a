"""Tables as ``ctr`` prints them (tab-aligned columns) and ``--format json``.

datetime, json and typing are imported where used: ``images pull`` needs only the sizes and
labels here, and its start-up time is most of its run (see pyctr.ctr.transfer).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    import datetime
    from typing import Any, TextIO


def table(
    header: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO | None = None, gap: int = 1
) -> None:
    """Columns padded to their widest cell plus ``gap`` spaces, like Go's tabwriter in ctr."""
    out = out or sys.stdout
    rows = [list(map(str, r)) for r in rows]
    all_rows = [list(header), *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    for r in all_rows:
        cells = [c.ljust(widths[i] + gap) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.write("".join(cells).rstrip() + "\n")


def labels(lbls: Mapping[str, str], empty: str = "-") -> str:
    if not lbls:
        return empty
    return ",".join(f"{k}={v}" for k, v in sorted(lbls.items()))


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def rfc3339(ts: datetime.datetime | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(value: Any, out: TextIO | None = None) -> None:
    import json

    out = out or sys.stdout
    json.dump(value, out, indent=2, sort_keys=True, default=_default)
    out.write("\n")


def _default(value: Any) -> Any:
    import datetime

    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_SIZE_UNITS = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]


def human_size(size: float) -> str:
    """Decimal units with four significant digits, as Docker's go-units prints them."""
    i = 0
    while size >= 1000 and i < len(_SIZE_UNITS) - 1:
        size /= 1000
        i += 1
    return f"{size:.4g}{_SIZE_UNITS[i]}"


def human_duration(seconds: float) -> str:
    """A rough age ("2 minutes", "About an hour"), as Docker's go-units prints it."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def age(ts: datetime.datetime | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return human_duration((datetime.datetime.now(datetime.UTC) - ts).total_seconds())
