"""containerd's identifier rules: safe as a path component, at most 76 characters.

The same grammar names namespaces, containers, leases and snapshotter-independent ids.
"""

from __future__ import annotations

import json
import re

from pyctr.api.errdefs import InvalidArgument

MAX_LENGTH = 76
PATTERN = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
_RE = re.compile(PATTERN)


def goquote(s: str) -> str:
    """A Go ``%q`` rendering, close enough for messages users compare with containerd's."""
    return json.dumps(s, ensure_ascii=False)


def validate(s: str) -> str:
    """Return ``s`` when it is a valid identifier, else raise InvalidArgument."""
    if not s:
        raise InvalidArgument("identifier must not be empty")
    if len(s) > MAX_LENGTH:
        raise InvalidArgument(
            f"identifier {goquote(s)} greater than maximum length ({MAX_LENGTH} characters)"
        )
    if not _RE.match(s):
        raise InvalidArgument(f"identifier {goquote(s)} must match {PATTERN}")
    return s
