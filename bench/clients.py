"""The raw gRPC client side: one event loop, channels with the namespace header, capability probes.

The same client code drives both daemons, so its own cost (grpclib in this process) is part of
both sides of every raw-gRPC figure and cancels out of the ratio only approximately: a faster
server cannot make this client faster than about 0.5 ms per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from bench.harness import NAMESPACE

T = TypeVar("T")
METADATA = {"containerd-namespace": NAMESPACE}

_loop: asyncio.AbstractEventLoop | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the bench's single event loop (uvloop when available, as the daemon uses)."""
    global _loop
    if _loop is None:
        try:
            import uvloop

            _loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a Linux dependency
            _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def channel(address: str) -> Channel:
    return Channel(path=address)


def metadata(namespace: str = NAMESPACE) -> dict[str, str]:
    return {"containerd-namespace": namespace}


class RawMessage:
    """Any protobuf message as bytes; ``b""`` is every proto3 message with all fields unset."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> RawMessage:
        return cls(data)


async def is_unimplemented(address: str, path: str, cardinality: Cardinality, request: bytes = b"") -> bool:
    """Call ``path`` with ``request`` (empty by default): True only if the daemon answers UNIMPLEMENTED.

    Any other answer (OK, INVALID_ARGUMENT, NOT_FOUND, a timeout, a dropped connection) means a
    handler exists. The probes are harmless for the methods we ask about: each rejects them or
    only reads; where an empty request is not (containerd's Diff.Apply), the Rpc carries another.
    """
    ch = channel(address)
    try:
        async with ch.request(
            path, cardinality, RawMessage, RawMessage, timeout=5.0, metadata=METADATA
        ) as stream:
            await stream.send_message(RawMessage(request), end=True)
            await stream.recv_initial_metadata()
            await stream.recv_message()
        return False
    except GRPCError as exc:
        return exc.status == Status.UNIMPLEMENTED
    except (TimeoutError, StreamTerminatedError, ConnectionError):
        return False
    finally:
        ch.close()
