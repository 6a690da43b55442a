"""Docker's credential formats, read the same way by pyctr (for `--user`-less pulls) and pyctrd.

Two leaf functions, each side keeps its own policy around them (pyctr refuses a broken config
before it starts a transfer; the daemon logs and goes on anonymously):

* :func:`decode_auth_entry`: an ``auths`` entry of ``config.json``: an identity token wins (the
  refresh token of OAuth2, as containerd's CRI reads it), then base64 ``auth`` of ``user:password``,
  then ``username``/``password``.
* :func:`helper_get`: ``docker-credential-<helper> get`` with the server on stdin.

Both return ``(username, secret)`` or None; a malformed entry or answer raises ValueError.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import subprocess
from typing import Any


def decode_auth_entry(entry: dict[str, Any]) -> tuple[str, str] | None:
    if entry.get("identitytoken"):
        return "", str(entry["identitytoken"])
    if entry.get("auth"):
        try:
            raw = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("auth is not base64 of user:password") from None
        user, sep, secret = raw.partition(":")
        if not sep:
            raise ValueError("auth has no ':' between user and password")
        return user, secret
    if entry.get("username") or entry.get("password"):
        return str(entry.get("username", "")), str(entry.get("password", ""))
    return None


def helper_get(helper: str, server: str, timeout: float = 60) -> tuple[str, str] | None:
    """Raises FileNotFoundError when the helper is not installed, ValueError for an answer that is
    not the helper protocol's JSON; None when the helper has nothing for ``server``."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        raise FileNotFoundError(f"credential helper docker-credential-{helper} is not installed")
    res = subprocess.run([exe, "get"], input=server, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        return None  # "credentials not found in native keychain": the helper's way to say none
    try:
        out = json.loads(res.stdout)
        user, secret = str(out.get("Username", "")), str(out.get("Secret", ""))
    except (ValueError, AttributeError):
        raise ValueError(f"docker-credential-{helper}: its answer is not the JSON expected") from None
    if user == "<token>":  # Docker's marker for an identity token
        user = ""
    return (user, secret) if secret else None
