"""Tables as ``ctr`` prints them (tab-aligned columns) and ``--format json``."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
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
    if ts is None:
        return "-"
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(value: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(value, out, indent=2, sort_keys=True, default=_default)
    out.write("\n")


def _default(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
