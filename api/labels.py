"""Label rules shared by every object that carries labels."""

from __future__ import annotations

from collections.abc import Mapping

from pyctr.api.errdefs import InvalidArgument

MAX_SIZE = 4096  # key and value together, in bytes, as containerd enforces

GC_ROOT = "containerd.io/gc.root"
GC_EXPIRE = "containerd.io/gc.expire"
GC_FLAT = "containerd.io/gc.flat"
GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
DEFAULT_SNAPSHOTTER = "containerd.io/defaults/snapshotter"
DEFAULT_RUNTIME = "containerd.io/defaults/runtime"


def validate(key: str, value: str) -> None:
    if len(key.encode()) + len(value.encode()) > MAX_SIZE:
        raise InvalidArgument(
            f"label key and value greater than maximum size ({MAX_SIZE} bytes), key: {key[:10]}"
        )


def validate_all(labels: Mapping[str, str], what: str = "") -> None:
    for k, v in labels.items():
        try:
            validate(k, v)
        except InvalidArgument as exc:
            if not what:
                raise
            raise InvalidArgument(f"{what}: {exc.message}") from None
