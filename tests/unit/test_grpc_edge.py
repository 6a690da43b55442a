"""The gRPC edge (``daemon/server.py`` over ``daemon/http2.py``) in process, against three clients.

grpclib's client and grpcio's C-core client exercise ordinary calls of every cardinality, flow
control in both directions (messages larger than the windows), deadlines, cancellation, error
mapping and the namespace header; raw frames cover what clients rarely send (padding, PING,
CONTINUATION, garbage). The Go client is covered by tests/interop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, PingAckReceived, ResponseReceived, StreamEnded, TrailersReceived
from hpack import Decoder

from pyctr.api import errdefs, h2wire, namespaces
from pyctr.api._pb.containerd.services.content import v1 as pb
from pyctr.daemon import http2
from pyctr.daemon.server import GRPCServer, _Connection

READ = "/containerd.services.content.v1.Content/Read"
INFO = "/containerd.services.content.v1.Content/Info"
MiB = 1 << 20


class Recorder(pb.ContentBase):
    """A Content service whose methods exist to be called by these tests."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    async def info(self, message: pb.InfoRequest) -> pb.InfoResponse:
        what = message.digest
        if what == "notfound":
            raise errdefs.NotFound("content thing")
        if what == "boom":
            raise RuntimeError("boom")
        if what == "sleep":
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.append("sleep")
                raise
        if what == "slow":
            self.started.set()
            await asyncio.sleep(0.3)
        # The namespace and lease headers, as the handler's task sees them.
        return pb.InfoResponse(
            info=pb.Info(digest=f"{namespaces.current.get()}|{namespaces.lease.get()}", size=len(what))
        )

    async def read(self, message: pb.ReadContentRequest) -> AsyncIterator[pb.ReadContentResponse]:
        """``size`` bytes in messages of ``offset`` bytes; byte i is i % 251."""
        chunk, total = message.offset, message.size
        pos = 0
        try:
            while pos < total:
                n = min(chunk, total - pos)
                yield pb.ReadContentResponse(offset=pos, data=pattern(pos, n))
                pos += n
                if message.digest == "hold":
                    self.started.set()
                    await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append("read")
            raise

    async def write(
        self, messages: AsyncIterator[pb.WriteContentRequest]
    ) -> AsyncIterator[pb.WriteContentResponse]:
        """One reply per request: bytes so far and the sha256 of all of them."""
        h = hashlib.sha256()
        total = 0
        async for req in messages:
            h.update(req.data)
            total += len(req.data)
            if req.ref == "fail":
                raise errdefs.FailedPrecondition("told to fail")
            yield pb.WriteContentResponse(offset=total, digest=h.hexdigest())
            if req.action == pb.WriteAction.COMMIT:
                return


def pattern(start: int, n: int) -> bytes:
    base = bytes(i % 251 for i in range(251))
    rep = base * (n // 251 + 2)
    off = start % 251
    return rep[off : off + n]


class Served:
    def __init__(self, service: Recorder, server: GRPCServer, path: str) -> None:
        self.service = service
        self.server = server
        self.path = path


def serve(test: Callable[[Served], Awaitable[None]], max_recv: int = 16 * MiB) -> None:
    async def main() -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="edge-"), "grpc.sock")
        service = Recorder()
        server = GRPCServer([service], max_recv=max_recv)
        await server.start(path)
        try:
            await asyncio.wait_for(test(Served(service, server, path)), 60)
        finally:
            await server.stop(grace=1)
        assert not os.path.exists(path)

    asyncio.run(main())


def stub(s: Served, ns: str = "edge", lease: str | None = None) -> tuple[Channel, pb.ContentStub]:
    md = {namespaces.GRPC_HEADER: ns}
    if lease:
        md[namespaces.LEASE_HEADER] = lease
    ch = Channel(path=s.path)
    return ch, pb.ContentStub(ch, metadata=md)


# -- grpclib's client -----------------------------------------------------------------------------


def test_unary_carries_namespace_and_lease() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s, "edge-ns", "lease-1")
        try:
            resp = await c.info(pb.InfoRequest(digest="abc"))
            assert resp.info is not None and resp.info.digest == "edge-ns|lease-1"
            # Many calls on one connection, sequential and concurrent.
            for _ in range(200):
                await c.info(pb.InfoRequest(digest="x"))
            got = await asyncio.gather(*(c.info(pb.InfoRequest(digest="y" * i)) for i in range(150)))
            assert [r.info.size for r in got if r.info] == list(range(150))
        finally:
            ch.close()

    serve(go)


def test_errors_become_statuses() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            with pytest.raises(GRPCError) as err:
                await c.info(pb.InfoRequest(digest="notfound"))
            assert err.value.status == Status.NOT_FOUND
            assert err.value.message == "content thing: not found"
            with pytest.raises(GRPCError) as err:
                await c.info(pb.InfoRequest(digest="boom"))
            assert (err.value.status, err.value.message) == (Status.UNKNOWN, "boom")
            # The connection is still good.
            assert (await c.info(pb.InfoRequest(digest="ok"))).info is not None
        finally:
            ch.close()

    serve(go)


def test_unknown_method_is_unimplemented_with_content_type() -> None:
    async def go(s: Served) -> None:
        ch = Channel(path=s.path)
        try:
            for path in ("/foo.Bar/Baz", "/containerd.services.content.v1.Content/Nope"):
                async with ch.request(path, Cardinality.UNARY_UNARY, pb.InfoRequest, pb.InfoResponse) as st:
                    await st.send_message(pb.InfoRequest(), end=True)
                    with pytest.raises(GRPCError) as err:
                        await st.recv_message()
                assert err.value.status == Status.UNIMPLEMENTED
                service, _, method = path.lstrip("/").partition("/")
                assert err.value.message == f"unknown method {method} for service {service}"
        finally:
            ch.close()

    serve(go)


def test_server_stream_beyond_the_windows() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            # 24 MiB in 1 MiB messages, then odd sizes: far more than any window.
            for chunk, total in ((MiB, 24 * MiB), (32 * 1024 + 7, 3 * MiB + 5), (1, 10)):
                got = bytearray()
                async for resp in c.read(pb.ReadContentRequest(offset=chunk, size=total)):
                    assert resp.offset == len(got)
                    got += resp.data
                assert bytes(got) == pattern(0, total)
        finally:
            ch.close()

    serve(go)


def test_client_stream_beyond_the_windows() -> None:
    async def go(s: Served) -> None:
        ch = Channel(path=s.path)
        path = "/containerd.services.content.v1.Content/Write"
        md = {namespaces.GRPC_HEADER: "edge"}
        try:
            # Messages of 6 MiB exceed the 4 MiB stream window on their own.
            sizes = [6 * MiB, 1, 0, 3 * MiB, 700_000, 6 * MiB]
            h = hashlib.sha256()
            async with ch.request(
                path, Cardinality.STREAM_STREAM, pb.WriteContentRequest, pb.WriteContentResponse, metadata=md
            ) as st:
                total = 0
                for i, n in enumerate(sizes):
                    data = os.urandom(n)
                    h.update(data)
                    total += n
                    last = i == len(sizes) - 1
                    action = pb.WriteAction.COMMIT if last else pb.WriteAction.WRITE
                    await st.send_message(pb.WriteContentRequest(action=action, data=data), end=last)
                    reply = await st.recv_message()
                    assert reply is not None and reply.offset == total
                assert reply is not None and reply.digest == h.hexdigest()
                await st.recv_trailing_metadata()
            # Pipelined without waiting for replies: flow control alone holds the client back.
            async with ch.request(
                path, Cardinality.STREAM_STREAM, pb.WriteContentRequest, pb.WriteContentResponse, metadata=md
            ) as st:
                for _ in range(12):
                    await st.send_message(pb.WriteContentRequest(data=b"z" * MiB))
                await st.end()
                replies = [r async for r in st]
                assert [r.offset for r in replies] == [MiB * (i + 1) for i in range(12)]
        finally:
            ch.close()

    serve(go)


def test_failing_bidi_call_resets_the_open_stream() -> None:
    async def go(s: Served) -> None:
        ch = Channel(path=s.path)
        md = {namespaces.GRPC_HEADER: "edge"}
        try:
            with pytest.raises(GRPCError) as err:
                async with ch.request(
                    "/containerd.services.content.v1.Content/Write",
                    Cardinality.STREAM_STREAM,
                    pb.WriteContentRequest,
                    pb.WriteContentResponse,
                    metadata=md,
                ) as st:
                    await st.send_message(pb.WriteContentRequest(ref="fail", data=b"x"))
                    await st.recv_message()
            assert err.value.status == Status.FAILED_PRECONDITION
            assert err.value.message == "told to fail: failed precondition"
            c = pb.ContentStub(ch, metadata=md)
            assert (await c.info(pb.InfoRequest(digest="after"))).info is not None
        finally:
            ch.close()

    serve(go)


def test_message_above_the_limit_is_resource_exhausted() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            with pytest.raises(GRPCError) as err:
                await c.info(pb.InfoRequest(digest="d" * 2000))
            assert err.value.status == Status.RESOURCE_EXHAUSTED
            assert err.value.message == "grpc: received message larger than max (2003 vs. 1024)"
            assert (await c.info(pb.InfoRequest(digest="small"))).info is not None
        finally:
            ch.close()

    serve(go, max_recv=1024)


def test_deadline_cancels_the_handler() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            with pytest.raises((asyncio.TimeoutError, GRPCError)):
                await c.info(pb.InfoRequest(digest="sleep"), timeout=0.2)
            for _ in range(50):
                if s.service.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert s.service.cancelled == ["sleep"]
        finally:
            ch.close()

    serve(go)


def test_client_cancel_cancels_the_handler() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            it = c.read(pb.ReadContentRequest(digest="hold", offset=10, size=100)).__aiter__()
            first = await it.__anext__()
            assert first.data == pattern(0, 10)
            await s.service.started.wait()
            ch.close()  # the connection goes away under the open stream
            for _ in range(50):
                if s.service.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert s.service.cancelled == ["read"]
            assert not s.server.inflight
        finally:
            ch.close()

    serve(go)


def test_stop_drains_calls_in_flight() -> None:
    async def go(s: Served) -> None:
        ch, c = stub(s)
        try:
            slow = asyncio.ensure_future(c.info(pb.InfoRequest(digest="slow")))
            await s.service.started.wait()
            await s.server.stop(grace=5)
            assert (await slow).info is not None  # finished, not cancelled
            with pytest.raises(OSError):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(s.path)
                finally:
                    probe.close()
        finally:
            ch.close()

    serve(go)


# -- grpcio's C-core client -----------------------------------------------------------------------


def test_grpcio_client() -> None:
    def calls(path: str) -> None:
        with grpc.insecure_channel(f"unix:{path}") as ch:
            md = ((namespaces.GRPC_HEADER, "cc"),)
            info = ch.unary_unary(
                INFO, request_serializer=bytes, response_deserializer=pb.InfoResponse.FromString
            )
            assert info(pb.InfoRequest(digest="q"), metadata=md).info.digest == "cc|"
            with pytest.raises(grpc.RpcError) as err:
                info(pb.InfoRequest(digest="notfound"), metadata=md)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "content thing: not found"
            read = ch.unary_stream(
                READ, request_serializer=bytes, response_deserializer=pb.ReadContentResponse.FromString
            )
            got = b"".join(
                r.data for r in read(pb.ReadContentRequest(offset=MiB, size=9 * MiB + 3), metadata=md)
            )
            assert got == pattern(0, 9 * MiB + 3)
            write = ch.stream_stream(
                "/containerd.services.content.v1.Content/Write",
                request_serializer=bytes,
                response_deserializer=pb.WriteContentResponse.FromString,
            )
            blobs = [os.urandom(n) for n in (5 * MiB, 17, 2 * MiB)]
            replies = list(write(iter(pb.WriteContentRequest(data=b) for b in blobs), metadata=md))
            assert replies[-1].digest == hashlib.sha256(b"".join(blobs)).hexdigest()
            with pytest.raises(grpc.RpcError) as err:
                info(pb.InfoRequest(digest="sleep"), metadata=md, timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def go(s: Served) -> None:
        await asyncio.to_thread(calls, s.path)

    serve(go)


# -- raw frames -----------------------------------------------------------------------------------


class Raw:
    """A blocking HTTP/2 client built on h2, for frames that ordinary clients do not send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.send()
        self.events: list[Any] = []

    def send(self, extra: bytes = b"") -> None:
        self.sock.sendall(self.h2.data_to_send() + extra)

    def request(self, sid: int, path: str, body: bytes, **kw: Any) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "edge"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            (namespaces.GRPC_HEADER, "raw"),
            *kw.pop("extra", []),
        ]
        self.h2.send_headers(sid, headers)
        data = h2wire.GRPC_PREFIX.pack(0, len(body)) + body
        for pos in range(0, len(data), 16000):
            last = pos + 16000 >= len(data)
            self.h2.send_data(sid, data[pos : pos + 16000], end_stream=last, **kw)
        self.send()

    def until(self, done: Callable[[list[Any]], bool]) -> list[Any]:
        while not done(self.events):
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self.events.extend(self.h2.receive_data(data))
            self.send()
        return self.events

    def close(self) -> None:
        self.sock.close()


def _ended(sid: int) -> Callable[[list[Any]], bool]:
    return lambda evs: any(isinstance(e, StreamEnded) and e.stream_id == sid for e in evs)


def test_padded_frames_ping_and_continuation() -> None:
    def raw(path: str) -> None:
        c = Raw(path)
        try:
            # Padded DATA (h2 pads when asked), a PING, then a header block split into
            # CONTINUATION frames by a metadata value larger than one frame.
            c.request(1, INFO, bytes(pb.InfoRequest(digest="pad")), pad_length=17)
            c.h2.ping(b"12345678")
            c.send()
            c.request(3, INFO, bytes(pb.InfoRequest(digest="big")), extra=[("x-big", "v" * 40000)])
            evs = c.until(lambda evs: _ended(1)(evs) and _ended(3)(evs))
            assert any(isinstance(e, PingAckReceived) for e in evs)
            for sid in (1, 3):
                data = b"".join(e.data for e in evs if isinstance(e, DataReceived) and e.stream_id == sid)
                reply = pb.InfoResponse.FromString(data[5:])
                assert reply.info is not None and reply.info.digest == "raw|"
                trailers = [e for e in evs if isinstance(e, TrailersReceived) and e.stream_id == sid]
                assert ("grpc-status", "0") in trailers[0].headers
            headers = [e for e in evs if isinstance(e, ResponseReceived)]
            assert dict(headers[0].headers) == {":status": "200", "content-type": "application/grpc+proto"}
        finally:
            c.close()

    async def go(s: Served) -> None:
        await asyncio.to_thread(raw, s.path)

    serve(go)


def test_rst_stream_cancels_and_the_connection_goes_on() -> None:
    def raw(path: str, started: Callable[[], bool]) -> None:
        c = Raw(path)
        try:
            c.request(1, READ, bytes(pb.ReadContentRequest(digest="hold", offset=4, size=100)))
            c.until(lambda evs: any(isinstance(e, DataReceived) for e in evs))
            c.h2.reset_stream(1)
            c.request(3, INFO, bytes(pb.InfoRequest(digest="next")))
            c.until(_ended(3))
        finally:
            c.close()

    async def go(s: Served) -> None:
        await asyncio.to_thread(raw, s.path, s.service.started.is_set)
        for _ in range(50):
            if s.service.cancelled:
                break
            await asyncio.sleep(0.05)
        assert s.service.cancelled == ["read"]

    serve(go)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        h2wire.PREFACE + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff",  # bad HPACK
        h2wire.PREFACE + h2wire.frame(h2wire.DATA, 0, 1, b"xx"),  # DATA on an idle stream
        h2wire.PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x00",  # a frame above the size limit
        h2wire.PREFACE + h2wire.frame(h2wire.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"),  # window > 2^31-1
        h2wire.PREFACE
        + h2wire.frame(h2wire.HEADERS, 0, 1, b"\x82")
        + h2wire.frame(h2wire.PING, 0, 0, bytes(8)),
    ],
)
def test_garbage_gets_goaway_and_nothing_else_suffers(garbage: bytes) -> None:
    def raw(path: str) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(garbage)
            got = b""
            try:
                while chunk := sock.recv(65536):
                    got += chunk
            except OSError:
                pass
            return got

    async def go(s: Served) -> None:
        got = await asyncio.to_thread(raw, s.path)
        if got.startswith(_INITIAL):
            # After our settings: a GOAWAY, and then the server hung up.
            rest = got[len(_INITIAL) :]
            assert rest[3] == h2wire.GOAWAY, rest
        ch, c = stub(s)
        try:
            assert (await c.info(pb.InfoRequest(digest="fine"))).info is not None
        finally:
            ch.close()

    serve(go)


_INITIAL = h2wire.settings_frame({2: 0, 3: 100, 4: 4 * MiB, 6: 64 * 1024}) + h2wire.window_update(
    0, 4 * MiB - 65535
)


@pytest.mark.parametrize(
    ("change", "answer"),
    [
        ({":method": "GET"}, {":status": "405"}),
        (
            {"content-type": None},
            {":status": "415", "grpc-status": "2", "grpc-message": "Missing content-type header"},
        ),
        (
            {"content-type": "application/json"},
            {":status": "415", "grpc-status": "2", "grpc-message": "Unacceptable content-type header"},
        ),
        (
            {"te": None},
            {
                ":status": "400",
                "grpc-status": "2",
                "grpc-message": 'Required "te: trailers" header is missing',
            },
        ),
        (
            {"grpc-timeout": "soon"},
            {":status": "200", "grpc-status": "2", "grpc-message": "Invalid grpc-timeout header"},
        ),
    ],
)
def test_requests_that_are_not_grpc_get_grpclibs_answers(
    change: dict[str, str | None], answer: dict[str, str]
) -> None:
    def raw(path: str) -> dict[str, str]:
        c = Raw(path)
        try:
            headers = {
                ":method": "POST",
                ":scheme": "http",
                ":path": INFO,
                ":authority": "edge",
                "content-type": "application/grpc",
                "te": "trailers",
            }
            headers.update(change)  # type: ignore[arg-type]
            c.h2.send_headers(1, [(k, v) for k, v in headers.items() if v is not None], end_stream=True)
            c.send()
            evs = c.until(_ended(1))
            got = [e for e in evs if isinstance(e, ResponseReceived)]
            return {str(k): str(v) for k, v in got[0].headers}
        finally:
            c.close()

    async def go(s: Served) -> None:
        assert await asyncio.to_thread(raw, s.path) == answer

    serve(go)


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (h2wire.GRPC_PREFIX.pack(1, 2) + b"\x0a\x00", ("2", "Compression not implemented")),
        (h2wire.GRPC_PREFIX.pack(0, 10) + b"\x0a\x00", ("2", "Received less data than expected")),
    ],
)
def test_bodies_grpclib_refused_are_refused_alike(body: bytes, answer: tuple[str, str]) -> None:
    def raw(path: str) -> dict[str, str]:
        c = Raw(path)
        try:
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", INFO),
                (":authority", "edge"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
            c.h2.send_headers(1, headers)
            c.h2.send_data(1, body, end_stream=True)
            c.send()
            evs = c.until(_ended(1))
            got = [e for e in evs if isinstance(e, (ResponseReceived, TrailersReceived))]
            return {str(k): str(v) for e in got for k, v in e.headers}
        finally:
            c.close()

    async def go(s: Served) -> None:
        got = await asyncio.to_thread(raw, s.path)
        assert (got["grpc-status"], got["grpc-message"]) == answer

    serve(go)


class _Sink:
    """A transport that keeps what the server writes."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, pieces: list[bytes]) -> None:
        for p in pieces:
            self.out += p

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.mark.parametrize("cut", ["bytes", "random", "whole"])
def test_any_split_of_the_input(cut: str) -> None:
    """Frames and messages cut anywhere by the reads come out the same."""

    async def main() -> None:
        service = Recorder()
        server = GRPCServer([service])
        sink = _Sink()
        conn = _Connection(server.server)
        conn.connection_made(sink)
        client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        client.initiate_connection()
        c = Raw.__new__(Raw)
        c.h2 = client
        c.send = lambda extra=b"": None  # type: ignore[method-assign]
        sizes = (0, 1, 300)
        for i, n in enumerate(sizes):
            c.request(
                2 * i + 1, INFO, bytes(pb.InfoRequest(digest="i" * n)), pad_length=3 if i == 1 else None
            )
        c.request(7, READ, bytes(pb.ReadContentRequest(offset=999, size=20_000)))
        write = bytes(pb.WriteContentRequest(action=pb.WriteAction.COMMIT, data=bytes(range(256)) * 150))
        c.request(9, "/containerd.services.content.v1.Content/Write", write)
        raw = client.data_to_send()
        rnd = random.Random(5)
        pos = 0
        while pos < len(raw):
            n = {"bytes": 1, "random": rnd.randint(1, 4000), "whole": len(raw)}[cut]
            conn.data_received(raw[pos : pos + n])
            pos += n
            await asyncio.sleep(0)
        for _ in range(200):
            if not conn.streams and not server.inflight:
                break
            await asyncio.sleep(0.01)
        conn.flush()
        events = client.receive_data(bytes(sink.out))
        bodies: dict[int, bytes] = {}
        for e in events:
            if isinstance(e, DataReceived):
                bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
        ended = {e.stream_id for e in events if isinstance(e, StreamEnded)}
        assert ended == {1, 3, 5, 7, 9}
        for i, n in enumerate(sizes):
            reply = pb.InfoResponse.FromString(bodies[2 * i + 1][5:])
            assert reply.info is not None and reply.info.size == n
        got = bytearray()
        data = bodies[7]
        while data:
            n = int.from_bytes(data[1:5], "big")
            got += pb.ReadContentResponse.FromString(data[5 : 5 + n]).data
            data = data[5 + n :]
        assert bytes(got) == pattern(0, 20_000)
        reply = pb.WriteContentResponse.FromString(bodies[9][5:])
        assert reply.digest == hashlib.sha256(bytes(range(256)) * 150).hexdigest()

    asyncio.run(main())


# -- sans-IO pieces -------------------------------------------------------------------------------


def test_header_blocks_we_send_decode_as_meant() -> None:
    block = http2.STATUS_200 + http2.content_type("application/grpc+proto")
    block += http2.status_fields(5, "content sha256:ab: not found \u00e9 100%")
    assert Decoder().decode(block) == [
        (":status", "200"),
        ("content-type", "application/grpc+proto"),
        ("grpc-status", "5"),
        ("grpc-message", "content sha256:ab: not found %C3%A9 100%25"),
    ]
    long = h2wire.literal("grpc-message", "m" * 300)  # lengths past the 7-bit prefix
    assert Decoder().decode(long) == [("grpc-message", "m" * 300)]
    frames = http2.headers_frames(7, b"x" * 40000, True, 16384)
    assert [f[3] for f in frames] == [h2wire.HEADERS, h2wire.CONTINUATION, h2wire.CONTINUATION]
    assert [f[4] for f in frames] == [h2wire.END_STREAM, 0, h2wire.END_HEADERS]


def test_header_decoder_remembers_only_while_the_table_is_unchanged() -> None:
    from hpack import Encoder

    enc = Encoder()
    dec = http2.HeaderDecoder()
    plain = Decoder()  # fed the same blocks, never remembering anything
    calls: list[int] = []

    def interpret(fields: list[tuple[str, str]]) -> dict[str, str]:
        calls.append(1)
        return dict(fields)

    def both(block: bytes) -> dict[str, str]:
        got = dec.decode(block, interpret)
        assert got == dict(plain.decode(block))
        return got

    first = enc.encode([(":path", "/a"), ("x", "1")])  # adds to the table
    assert both(first) == {":path": "/a", "x": "1"}
    again = enc.encode([(":path", "/a"), ("x", "1")])  # fully indexed now
    assert both(again) == both(again) == {":path": "/a", "x": "1"}
    assert len(calls) == 2  # the indexed block was interpreted once
    both(enc.encode([(":path", "/b"), ("x", "2")]))  # the table changes
    both(again)  # the same bytes now name other entries: decoded afresh
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1S", 1.0), ("250m", 0.25), ("3M", 180.0), ("12345678u", 12.345678), ("1H", 3600.0)],
)
def test_grpc_timeout(value: str, seconds: float) -> None:
    assert http2.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "1", "123456789S", "1x", "-1S", "1.5S"])
def test_bad_grpc_timeout(value: str) -> None:
    with pytest.raises(ValueError):
        http2.parse_timeout(value)


def test_grpc_message_is_percent_encoded_as_grpc_specifies() -> None:
    """Printable ASCII except "%" stays; every other character goes as its UTF-8 bytes, %XX."""
    from urllib.parse import quote

    from pyctr.daemon.http2 import grpc_message

    safe = "".join(chr(i) for i in range(0x20, 0x7F) if chr(i) != "%")
    for text in ("plain", "", "100% sure", "tab\tand\nnewline", "héllo €", "\x00\x7f", "emoji 😀"):
        assert grpc_message(text) == quote(text, safe=safe, encoding="utf-8"), text
    assert grpc_message("a%b\n") == "a%25b%0A"
