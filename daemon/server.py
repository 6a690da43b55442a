"""The gRPC edge: the unix socket, per-request context, error mapping and graceful drain.

grpclib needs help in four places, each handled here once for every service:
* request metadata: a ``RecvRequest`` listener (running in the handler's task) sets the
  namespace and lease context variables, and wraps the handler so that categorised errors
  become gRPC statuses in one place;
* unknown services and methods: grpclib's own answer lacks ``content-type``, which the Go
  client reports as a transport error instead of UNIMPLEMENTED, so lookups fall back to a
  handler that raises UNIMPLEMENTED properly;
* message size: a codec that refuses messages above the configured limit (Go clients refuse
  replies above 16 MiB anyway);
* shutdown: stop accepting, let in-flight calls finish (bounded), then close.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Collection
from typing import Any

import structlog
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from pyctr.api import errdefs, filters, namespaces

log = structlog.get_logger("pyctrd.server")


class SocketInUse(RuntimeError):
    pass


class LimitedCodec(ProtoCodec):
    """The protobuf codec with a size limit on both directions."""

    def __init__(self, max_recv: int, max_send: int) -> None:
        self.max_recv = max_recv
        self.max_send = max_send

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = super().encode(message, message_type)
        if len(data) > self.max_send:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"trying to send message larger than max ({len(data)} vs. {self.max_send})",
            )
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_recv:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"grpc: received message larger than max ({len(data)} vs. {self.max_recv})",
            )
        try:
            check_wire(data)
        except ValueError as exc:
            # grpc-go's answer to a body it cannot unmarshal.
            raise GRPCError(Status.INTERNAL, f"grpc: error unmarshalling request: {exc}") from None
        return super().decode(data, message_type)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``."""
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise ValueError("unexpected EOF")
        value |= (buf[pos + i] & 0x7F) << (7 * i)
        if buf[pos + i] < 0x80:
            return value, pos + i + 1
    raise ValueError("varint overflow")


def check_wire(buf: bytes) -> None:
    """Raise ValueError unless ``buf`` is well-formed protobuf at the top level.

    betterproto2 parses leniently: a length running past the end, a cut varint or wire type 6
    all decode to *something*. Checking the outer level catches every truncated body (its last
    field runs past the end); nested messages are left to the parser.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        if key >> 3 == 0:
            raise ValueError("invalid field number 0")
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            pos += length
        elif wire_type not in (3, 4):  # groups are deprecated; left to the parser
            raise ValueError(f"invalid wire type {wire_type}")
        if pos > end:
            raise ValueError("unexpected EOF")


class _Empty:
    """Request type of the fallback handler; it is never decoded."""

    @classmethod
    def FromString(cls, data: bytes) -> _Empty:
        return cls()


class _FallbackMapping(dict[str, Handler]):
    def get(self, key: str, default: Any = None) -> Handler:
        found = super().get(key)
        if found is not None:
            return found

        async def unimplemented(stream: Stream[Any, Any]) -> None:
            service, _, method = key.lstrip("/").partition("/")
            raise GRPCError(Status.UNIMPLEMENTED, f"unknown method {method} for service {service}")

        return Handler(unimplemented, Cardinality.UNARY_UNARY, _Empty, _Empty)


def grpc_error(exc: BaseException) -> GRPCError:
    """The one place where a handler's exception becomes a gRPC status."""
    if isinstance(exc, GRPCError):
        return exc
    if isinstance(exc, filters.FilterParseError):
        exc = errdefs.InvalidArgument(str(exc))
    code, message = errdefs.to_status(exc)
    return GRPCError(Status(code), message)


def _first(metadata: Any, key: str) -> str:
    value = metadata.get(key, "")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


def prepare_socket(path: str, uid: int = 0, gid: int = 0, mode: int = 0o660) -> socket.socket:
    """Bind a listening unix socket: refuse a live server, replace a stale file, set owner and mode."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            os.unlink(path)  # stale: nobody listens there any more
        else:
            raise SocketInUse(
                f"{path} is in use by a running server; is another pyctrd or containerd using it?"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if uid or gid:
            os.chown(path, uid, gid)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class GRPCServer:
    def __init__(
        self,
        services: Collection[Any],
        *,
        max_recv: int = 16 << 20,
        max_send: int = 16 << 20,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.server = Server(list(services), codec=LimitedCodec(max_recv, max_send))
        # grpclib keeps the route table in a private attribute; see the module docstring.
        self.server._mapping = _FallbackMapping(self.server._mapping)
        self.inflight: set[asyncio.Task[Any]] = set()
        self._on_request = on_request
        self.path: str | None = None
        listen(self.server, RecvRequest, self._recv_request)

    async def _recv_request(self, ev: RecvRequest) -> None:
        namespaces.current.set(_first(ev.metadata, namespaces.GRPC_HEADER))
        namespaces.lease.set(_first(ev.metadata, namespaces.LEASE_HEADER))
        method_func = ev.method_func
        method_name = ev.method_name
        inflight = self.inflight
        if self._on_request is not None:
            self._on_request(method_name)

        async def wrapped(stream: Stream[Any, Any]) -> None:
            task = asyncio.current_task()
            if task is not None:
                inflight.add(task)
            try:
                await method_func(stream)
            except (GRPCError, asyncio.CancelledError):
                raise
            except Exception as exc:
                err = grpc_error(exc)
                if err.status in (Status.UNKNOWN, Status.INTERNAL):
                    log.warning("rpc failed", method=method_name, error=str(exc), exc_info=exc)
                raise err from exc
            finally:
                if task is not None:
                    inflight.discard(task)

        ev.method_func = wrapped

    async def start(self, path: str, uid: int = 0, gid: int = 0) -> None:
        sock = prepare_socket(path, uid, gid)
        self.path = path
        await self.server.start(sock=sock)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, wait up to ``grace`` seconds for in-flight calls, then close."""
        inner = self.server._server
        if inner is not None:
            inner.close()
        pending = [t for t in self.inflight if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                log.warning("closing with calls still running", count=len(still))
        self.server.close()
        await self.server.wait_closed()
        if self.path and os.path.lexists(self.path):
            os.unlink(self.path)
