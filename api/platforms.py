"""OCI platforms: parsing ``os/arch[/variant]``, the host's platform, and matching index entries."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyctr.api.errdefs import InvalidArgument

_ARCH = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def normalize(p: Platform) -> Platform:
    arch = _ARCH.get(p.architecture, p.architecture)
    variant = p.variant
    if arch == "arm64" and variant in ("8", "v8"):
        variant = ""  # arm64 means v8 unless said otherwise, as containerd normalises it
    if arch == "amd64" and variant == "v1":
        variant = ""
    return Platform(p.os.lower(), arch, variant)


def parse(text: str) -> Platform:
    parts = text.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(f"{text!r}: unknown operating system or architecture")
    if len(parts) == 1:
        # A lone word is an OS (then the host's architecture) or an architecture (then linux).
        if parts[0] in ("linux", "windows", "darwin", "freebsd"):
            return normalize(Platform(parts[0], default().architecture))
        return normalize(Platform("linux", parts[0]))
    return normalize(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else ""))


def default() -> Platform:
    return normalize(Platform("linux", os.uname().machine))


def matches(candidate: Platform, wanted: Platform) -> bool:
    c, w = normalize(candidate), normalize(wanted)
    return c.os == w.os and c.architecture == w.architecture and (not w.variant or c.variant == w.variant)
