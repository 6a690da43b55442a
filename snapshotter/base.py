"""The snapshotter contract: what every snapshotter provides, with containerd's semantics.

Keys name snapshots. An ACTIVE snapshot (from ``prepare``) is writable; ``commit`` turns it into
a COMMITTED snapshot under a new name, which can be the parent of others; a VIEW (from ``view``)
is a read-only snapshot of a committed parent. Parents cannot be removed while they have
children. Snapshotters return mounts; they never mount anything for the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pyctr.api.mount import Mount

INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"


class Kind(enum.IntEnum):
    """Wire values of containerd's snapshot kinds."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Info:
    name: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0  # ns
    updated_at: int = 0  # ns


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


def inherited_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels a snapshotter itself keeps: only ``containerd.io/snapshot/…`` ones."""
    return {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}


class Snapshotter(Protocol):
    async def stat(self, key: str) -> Info: ...
    async def update(self, info: Info, fieldpaths: Sequence[str]) -> Info: ...
    async def usage(self, key: str) -> Usage: ...
    async def mounts(self, key: str) -> list[Mount]: ...
    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]: ...
    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]: ...
    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None: ...
    async def remove(self, key: str) -> None: ...
    async def walk(self) -> list[Info]: ...
    async def cleanup(self) -> None: ...
    async def close(self) -> None: ...
