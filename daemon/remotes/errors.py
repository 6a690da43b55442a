"""Registry failures as containerd error categories (sans-IO: status, headers and body in).

The distribution spec's error body is ``{"errors": [{"code": "...", "message": "...",
"detail": ...}]}``; its codes and messages go into our message so a user sees what the registry
said. The category comes from the status, except for the codes that name a precise failure:

    401, 403                     -> PermissionDenied "unauthorized: <registry>: ..."
    404                          -> NotFound
    DIGEST_INVALID, SIZE_INVALID -> FailedPrecondition "digest mismatch" (the bytes were wrong)
    400, other 4xx               -> InvalidArgument
    405 (UNSUPPORTED)            -> NotImplementedErr
    416                          -> OutOfRange
    429, 5xx                     -> Unavailable (the request may succeed later)
"""

from __future__ import annotations

import json
from typing import Any

from pyctr.api.errdefs import (
    ContainerdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedErr,
    OutOfRange,
    PermissionDenied,
    Unavailable,
    Unknown,
)

# Statuses worth sending an idempotent request again for, after a pause.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Codes the registry sends when the uploaded bytes do not match what was claimed.
_MISMATCH_CODES = frozenset({"DIGEST_INVALID", "SIZE_INVALID"})
# Upper bound on how much of an error body is read and quoted.
MAX_ERROR_BODY = 64 << 10


def registry_errors(body: bytes) -> list[dict[str, Any]]:
    """The ``errors`` array of an error body, or [] when the body is something else."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    return [e for e in errors if isinstance(e, dict)]


def describe(status: int, reason: str, body: bytes) -> str:
    """``MANIFEST_UNKNOWN: manifest unknown; ...`` or the status line when the body says nothing."""
    parts = []
    for e in registry_errors(body):
        code = str(e.get("code", "")).strip()
        msg = str(e.get("message", "")).strip()
        text = f"{code}: {msg}" if code and msg else code or msg
        detail = e.get("detail")
        if detail not in (None, "", {}, []):
            text += f" ({json.dumps(detail, separators=(',', ':'))[:200]})"
        if text:
            parts.append(text)
    if parts:
        return "; ".join(parts)
    text = body[:200].decode("utf-8", "replace").strip()
    # Some registries answer HTML (a proxy's error page): the status line says more than markup.
    if text and not text.startswith("<"):
        return f"{status} {reason}: {text}"
    return f"{status} {reason}".strip()


def for_response(status: int, reason: str, body: bytes, *, what: str, registry: str) -> ContainerdError:
    """The categorised error for a failed request about ``what`` sent to ``registry``."""
    detail = describe(status, reason, body)
    codes = {str(e.get("code", "")) for e in registry_errors(body)}
    if codes & _MISMATCH_CODES:
        return FailedPrecondition(f"digest mismatch: {what}: {registry}: {detail}")
    if status in (401, 403):
        return PermissionDenied(f"unauthorized: {registry}: {what}: {detail}")
    if status == 404:
        return NotFound(f"{what} ({registry}: {detail})")
    if status == 405:
        return NotImplementedErr(f"{what}: {registry}: {detail}")
    if status == 416:
        return OutOfRange(f"{what}: {registry}: {detail}")
    if status in RETRYABLE_STATUS or status >= 500:
        return Unavailable(f"{what}: {registry}: {detail}")
    if 400 <= status < 500:
        return InvalidArgument(f"{what}: {registry}: {detail}")
    return Unknown(f"{what}: {registry}: unexpected status {detail}")
