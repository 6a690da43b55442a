"""containerd.services.content.v1.Content: a thin edge over ``daemon/content/store.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from grpclib.const import Cardinality, Handler

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.events import ContentCreate, ContentDelete
from pyctr.api._pb.containerd.services.content import v1 as pb
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import AlreadyExists, InvalidArgument, OutOfRange
from pyctr.api.wire import varint
from pyctr.daemon import plugin
from pyctr.daemon.content.store import ContentStore, NamespacedWriter, Status
from pyctr.daemon.events import Exchange
from pyctr.daemon.metadata import content as meta

LIST_BATCH = 100  # infos per List message, as containerd batches them
READ_PATH = "/containerd.services.content.v1.Content/Read"
WRITE_PATH = "/containerd.services.content.v1.Content/Write"


def info_message(info: meta.Info) -> pb.Info:
    return pb.Info(
        digest=info.digest,
        size=info.size,
        created_at=pbutil.timestamp(info.created_at),
        updated_at=pbutil.timestamp(info.updated_at),
        labels=info.labels,
    )


def status_message(st: Status) -> pb.Status:
    return pb.Status(
        started_at=pbutil.timestamp(st.started_at),
        updated_at=pbutil.timestamp(st.updated_at),
        ref=st.ref,
        offset=st.offset,
        total=st.total,
        expected=st.expected,
    )


# -- Read and Write on the wire --------------------------------------------------------------------
#
# ``ctr content get`` reads with one Read call per 32 KiB, and ingests send 1 MiB per Write
# request: the generic message classes' cost per call (and their copies of the data) shows in both
# rates. These messages are simple enough to code by hand:
#
#     ReadContentRequest   1: digest (string)  2: offset (int64)  3: size (int64)
#     ReadContentResponse  1: offset (int64)   2: data (bytes)
#     WriteContentRequest  1: action (enum)  2: ref (string)  3: total (int64)
#                          4: expected (string)  5: offset (int64)  6: data (bytes)  7: labels (map)
#
# A request with anything else (labels, another field, an odd encoding) goes to the generated
# parser, which then decides exactly as it always did. The server has already checked that the
# body is well-formed protobuf at the top level.

_VARINT, _STRING, _BYTES = 0, 1, 2
_READ_KEYS = {0x0A: _STRING, 0x10: _VARINT, 0x18: _VARINT}
_WRITE_KEYS = {0x08: _VARINT, 0x12: _STRING, 0x18: _VARINT, 0x22: _STRING, 0x28: _VARINT, 0x32: _BYTES}
_MASK64 = (1 << 64) - 1
_SIGN64 = 1 << 63


class _Unusual(Exception):
    pass


def _uvarint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Unusual


def _scan(data: Any, keys: dict[int, int]) -> dict[int, Any]:
    """Top-level fields by key byte (the last of a repeated one wins, as in the generated parser);
    ``bytes`` fields are views into ``data``, not copies."""
    view = memoryview(data)
    out: dict[int, Any] = {}
    pos, n = 0, len(view)
    try:
        while pos < n:
            key = view[pos]
            kind = keys.get(key)
            if kind is None:
                raise _Unusual
            value, pos = _uvarint(view, pos + 1)
            if kind == _VARINT:
                out[key] = ((value & _MASK64) ^ _SIGN64) - _SIGN64  # int64 and enums
                continue
            end = pos + value
            if end > n:
                raise _Unusual
            out[key] = str(view[pos:end], "utf-8") if kind == _STRING else view[pos:end]
            pos = end
    except (IndexError, UnicodeDecodeError):
        raise _Unusual from None
    return out


class ReadArgs(NamedTuple):
    digest: str
    offset: int
    size: int


class ReadRequestCodec:
    """Decodes a ReadContentRequest into :class:`ReadArgs` (the server's codec calls FromString)."""

    @staticmethod
    def FromString(data: Any) -> ReadArgs:
        try:
            f = _scan(data, _READ_KEYS)
        except _Unusual:
            msg = pb.ReadContentRequest.FromString(bytes(data))
            return ReadArgs(msg.digest, msg.offset, msg.size)
        return ReadArgs(f.get(0x0A, ""), f.get(0x10, 0), f.get(0x18, 0))


class WriteRequestCodec:
    """Decodes a WriteContentRequest whose ``data`` stays a view of the received body."""

    @staticmethod
    def FromString(data: Any) -> pb.WriteContentRequest:
        try:
            f = _scan(data, _WRITE_KEYS)
        except _Unusual:
            return pb.WriteContentRequest.FromString(bytes(data))
        return pb.WriteContentRequest(
            action=pb.WriteAction(f.get(0x08, 0)),
            ref=f.get(0x12, ""),
            total=f.get(0x18, 0),
            expected=f.get(0x22, ""),
            offset=f.get(0x28, 0),
            data=f.get(0x32, b""),
        )


class ReadReply:
    """A ReadContentResponse already encoded, exactly as the generated class would encode it."""

    __slots__ = ("encoded",)

    def __init__(self, offset: int, data: bytes) -> None:
        head = b"\x08" + varint(offset) if offset else b""
        self.encoded = head + b"\x12" + varint(len(data)) + data if data else head

    def SerializeToString(self) -> bytes:
        return self.encoded


class ContentService(pb.ContentBase):
    def __init__(self, store: ContentStore, exchange: Exchange) -> None:
        self.store = store
        self.exchange = exchange

    def __mapping__(self) -> dict[str, Handler]:
        """The generated routes, with Read and Write on the hand-coded messages above."""
        mapping = super().__mapping__()
        mapping[READ_PATH] = Handler(self._read_rpc, Cardinality.UNARY_STREAM, ReadRequestCodec, ReadReply)
        write = mapping[WRITE_PATH]
        mapping[WRITE_PATH] = write._replace(request_type=WriteRequestCodec)
        return mapping

    async def _read_rpc(self, stream: Any) -> None:
        """Read, with the hand-coded messages above; the same store call as :meth:`read`."""
        req: ReadArgs | None = await stream.recv_message()
        assert req is not None  # as the generated handler asserts
        chunks = await self.store.read(namespaces.required(), req.digest, req.offset, req.size)
        async for offset, data in chunks:
            await stream.send_message(ReadReply(offset, data))

    async def info(self, message: pb.InfoRequest) -> pb.InfoResponse:
        info = await self.store.info(namespaces.required(), message.digest)
        return pb.InfoResponse(info=info_message(info))

    async def update(self, message: pb.UpdateRequest) -> pb.UpdateResponse:
        ns = namespaces.required()
        if message.info is None:
            raise InvalidArgument("info must be set")
        paths = list(message.update_mask.paths) if message.update_mask else []
        info = await self.store.update(ns, message.info.digest, dict(message.info.labels), paths)
        return pb.UpdateResponse(info=info_message(info))

    async def list(self, message: pb.ListContentRequest) -> AsyncIterator[pb.ListContentResponse]:
        infos = await self.store.list(namespaces.required(), message.filters)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListContentResponse(info=[info_message(x) for x in infos[i : i + LIST_BATCH]])

    async def delete(self, message: pb.DeleteContentRequest) -> Empty:
        ns = namespaces.required()
        await self.store.delete(ns, message.digest)
        self.exchange.publish(ns, "/content/delete", ContentDelete(digest=message.digest))
        return Empty()

    async def read(self, message: pb.ReadContentRequest) -> AsyncIterator[pb.ReadContentResponse]:
        chunks = await self.store.read(namespaces.required(), message.digest, message.offset, message.size)
        async for offset, data in chunks:
            yield pb.ReadContentResponse(offset=offset, data=data)

    async def status(self, message: pb.StatusRequest) -> pb.StatusResponse:
        st = await self.store.status(namespaces.required(), message.ref)
        return pb.StatusResponse(status=status_message(st))

    async def list_statuses(self, message: pb.ListStatusesRequest) -> pb.ListStatusesResponse:
        statuses = await self.store.list_statuses(namespaces.required(), message.filters)
        return pb.ListStatusesResponse(statuses=[status_message(s) for s in statuses])

    async def abort(self, message: pb.AbortRequest) -> Empty:
        await self.store.abort(namespaces.required(), message.ref, namespaces.lease.get())
        return Empty()

    async def write(
        self, messages: AsyncIterator[pb.WriteContentRequest]
    ) -> AsyncIterator[pb.WriteContentResponse]:
        """The STAT / WRITE / COMMIT session: one reply per request, done after COMMIT."""
        ns = namespaces.required()
        first = await anext(messages, None)
        if first is None:
            return
        if not first.ref:
            raise InvalidArgument("first message must have a reference")
        total, expected = first.total, first.expected
        w = await self.store.writer(ns, first.ref, total, expected, namespaces.lease.get())
        try:
            req: pb.WriteContentRequest | None = first
            while req is not None:
                resp, done = await self._step(ns, w, req, total, expected)
                if req.expected:
                    expected = req.expected
                if req.total > 0:
                    total = req.total
                yield resp
                if done:
                    return
                req = await anext(messages, None)
        finally:
            w.close()

    async def _step(
        self, ns: str, w: NamespacedWriter, req: pb.WriteContentRequest, total: int, expected: str
    ) -> tuple[pb.WriteContentResponse, bool]:
        st = w.status()
        resp = pb.WriteContentResponse(action=req.action, offset=st.offset)
        if req.expected:
            expected = req.expected
            if self.store.local.exists(expected) and await self._visible(ns, expected):
                w.close()
                await self.store.abort(ns, w.ingest.ref, w.lease)
                raise AlreadyExists(f"blob with expected digest {expected} exists")
        if req.total > 0:
            total = req.total
        if req.action == pb.WriteAction.STAT:
            resp.digest = w.digest()
            resp.started_at = pbutil.timestamp(st.started_at)
            resp.updated_at = pbutil.timestamp(st.updated_at)
            resp.total = total
            return resp, False
        if req.action not in (pb.WriteAction.WRITE, pb.WriteAction.COMMIT):
            raise InvalidArgument(f"unknown write action {int(req.action)}")
        if req.offset > 0 and req.offset != st.offset:
            raise OutOfRange(f"write @{req.offset} must occur at current offset {st.offset}")
        if req.offset == 0 and st.offset > 0:
            await w.truncate(0)
            resp.offset = 0
        if req.data:
            resp.offset += await w.write(req.data)
        if req.action == pb.WriteAction.COMMIT:
            dgst = await w.commit(total, expected, dict(req.labels))
            resp.digest = dgst
            self.exchange.publish(ns, "/content/create", ContentCreate(digest=dgst, size=resp.offset))
            return resp, True
        resp.digest = w.digest()
        return resp, False

    async def _visible(self, ns: str, dgst: str) -> bool:
        try:
            await self.store.info(ns, dgst)
        except Exception:
            return False
        return True


def service(ic: plugin.InitContext) -> ContentService:
    return ContentService(ic.get(plugin.CONTENT), ic.get(plugin.EVENT))
