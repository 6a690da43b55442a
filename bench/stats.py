"""Summaries of repeated measurements and the pyctrd/containerd ratio with its goal."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))


def ratio(pyctrd: Summary | None, containerd: Summary | None) -> float | None:
    """pyctrd's median over containerd's: the one number per figure the goal is stated in."""
    if pyctrd is None or containerd is None or containerd.median == 0:
        return None
    return pyctrd.median / containerd.median


def goal_met(r: float | None, better: Better) -> bool | None:
    """Times and memory: pyctrd no worse than containerd (<= 1.0); throughput: >= 1.0."""
    if r is None:
        return None
    return r <= 1.0 if better == "lower" else r >= 1.0


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
