"""Namespaces: the header that carries them and the context variable that holds them per request.

Every containerd object lives in a namespace. gRPC clients send it in the ``containerd-namespace``
metadata key, ttrpc clients in ``containerd-namespace-ttrpc``. The server sets :data:`current`
once per request (in the task that runs the handler), and services read it with :func:`required`.
"""

from __future__ import annotations

import contextvars

from pyctr.api import identifiers
from pyctr.api.errdefs import FailedPrecondition, InvalidArgument

GRPC_HEADER = "containerd-namespace"
TTRPC_HEADER = "containerd-namespace-ttrpc"
LEASE_HEADER = "containerd-lease"
DEFAULT = "default"

current: contextvars.ContextVar[str] = contextvars.ContextVar("pyctr_namespace", default="")
lease: contextvars.ContextVar[str] = contextvars.ContextVar("pyctr_lease", default="")


def required() -> str:
    """The request's namespace; a request without one fails as containerd fails it."""
    ns = current.get()
    if not ns:
        raise FailedPrecondition("namespace is required")
    try:
        return identifiers.validate(ns)
    except InvalidArgument as exc:
        raise InvalidArgument(f"namespace validation: {exc.message}") from None
