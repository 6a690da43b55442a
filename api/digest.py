"""OCI content digests: ``<algorithm>:<encoded>``, parsed and checked once."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pyctr.api.errdefs import InvalidArgument

# Algorithm -> length of the hex encoding. sha256 is the default, sha512 and sha384 are accepted.
ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_HEX = re.compile(r"^[a-f0-9]+$")


def parse(value: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest, or InvalidArgument saying what is wrong."""
    m = _RE.match(value)
    if not m:
        raise InvalidArgument(f"invalid checksum digest format: {value!r}")
    alg, enc = m.group(1), m.group(2)
    if alg not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm: {value!r}")
    if len(enc) != ALGORITHMS[alg] or not _HEX.match(enc):
        raise InvalidArgument(f"invalid checksum digest length or encoding: {value!r}")
    return alg, enc


def validate(value: str) -> str:
    parse(value)
    return value


def hasher(algorithm: str = "sha256") -> Any:
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm: {algorithm}")
    return hashlib.new(algorithm)


def of(data: bytes, algorithm: str = "sha256") -> str:
    h = hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"
