"""ttrpc framing, message codec, and a real client/server pair on unix sockets (stdlib loop and uvloop)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import socket
import struct
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api.ttrpc import (
    DATA,
    MESSAGE_HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    NAMESPACE_KEY,
    REQUEST,
    RESPONSE,
    Client,
    Code,
    ConnectionClosed,
    Context,
    Frame,
    FrameDecoder,
    KeyValue,
    OversizeFrame,
    ProtocolError,
    Request,
    Response,
    Server,
    Status,
    TtrpcError,
    encode_frame,
)

T = TypeVar("T")
SVC = "test.v1.Echo"

# The Connect example from reference/ttrpc-shim.md §1: Connect{id:"redis"} in namespace "default".
CONNECT_FRAME = bytes.fromhex(
    "00000052 00000001 01 00"
    "0a17"
    + b"containerd.task.v2.Task".hex()
    + "1207"
    + b"Connect".hex()
    + "1a07 0a05"
    + b"redis".hex()
    + "2a25"
    "0a1a" + b"containerd-namespace-ttrpc".hex() + "1207" + b"default".hex()
)
CONNECT_REPLY = bytes.fromhex("0000000a 00000001 02 00 0a00 1206 08b960 10be60")


# ---------------------------------------------------------------------------------------------------
# Framing


def test_frame_header_layout() -> None:
    # length u32, stream id u32, type u8, flags u8, big-endian.
    assert encode_frame(1, REQUEST, 0, b"abc") == b"\x00\x00\x00\x03\x00\x00\x00\x01\x01\x00abc"
    assert encode_frame(0x01020304, DATA, 0x05, b"") == b"\x00\x00\x00\x00\x01\x02\x03\x04\x03\x05"
    assert MESSAGE_HEADER_LENGTH == 10 and MESSAGE_LENGTH_MAX == 4 << 20


def test_connect_example_is_byte_exact() -> None:
    request = Request(
        service="containerd.task.v2.Task",
        method="Connect",
        payload=b"\x0a\x05redis",
        metadata=(KeyValue(NAMESPACE_KEY, "default"),),
    )
    assert encode_frame(1, REQUEST, 0, request.encode()) == CONNECT_FRAME
    (frame,) = FrameDecoder().feed(CONNECT_FRAME)
    assert frame == Frame(1, REQUEST, 0, CONNECT_FRAME[10:])
    assert Request.decode(frame.data) == request

    # Reply: status OK is present but empty (0a 00), then ConnectResponse{shim_pid 12345, task_pid 12350}.
    reply = Response(Status(), bytes.fromhex("08b96010be60"))
    assert encode_frame(1, RESPONSE, 0, reply.encode()) == CONNECT_REPLY
    assert Response.decode(CONNECT_REPLY[10:]) == reply


def test_decoder_fed_one_byte_at_a_time() -> None:
    frames = [Frame(1, REQUEST, 0, b"x" * 300), Frame(3, RESPONSE, 0, b""), Frame(5, DATA, 5, b"\x00\xff")]
    stream = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in frames)
    decoder = FrameDecoder()
    out: list[Frame | OversizeFrame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == frames
    assert decoder.buffered == 0


def test_decoder_discards_oversize_frames_without_buffering() -> None:
    length = MESSAGE_LENGTH_MAX + 1
    tail = encode_frame(9, REQUEST, 0, b"after")
    stream = struct.pack(">IIBB", length, 7, REQUEST, 0) + b"\xaa" * length + tail
    decoder = FrameDecoder()
    out: list[Frame | OversizeFrame] = []
    for i in range(0, len(stream), 65536):
        out += decoder.feed(memoryview(stream)[i : i + 65536])
        assert decoder.buffered < 65536
    assert out == [OversizeFrame(7, length), Frame(9, REQUEST, 0, b"after")]

    # Same bytes in one chunk.
    assert FrameDecoder().feed(stream) == out


def test_encode_frame_refuses_oversize() -> None:
    with pytest.raises(TtrpcError) as err:
        encode_frame(1, REQUEST, 0, bytes(MESSAGE_LENGTH_MAX + 1))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert len(encode_frame(1, REQUEST, 0, bytes(MESSAGE_LENGTH_MAX))) == MESSAGE_LENGTH_MAX + 10


# ---------------------------------------------------------------------------------------------------
# Messages


def test_negative_integers_are_ten_byte_varints() -> None:
    assert Request(timeout_nano=-1).encode() == b"\x20" + b"\xff" * 9 + b"\x01"
    assert Request.decode(b"\x20" + b"\xff" * 9 + b"\x01").timeout_nano == -1
    assert Request.decode(Request(timeout_nano=-(2**63)).encode()).timeout_nano == -(2**63)
    assert Status(code=-1).encode() == b"\x08" + b"\xff" * 9 + b"\x01"
    assert Status.decode(Status(code=-(2**31)).encode()).code == -(2**31)
    # int32 fields keep the low 32 bits of a wider varint, like Go.
    assert Status.decode(b"\x08\x85\x80\x80\x80\x10").code == 5
    with pytest.raises(ValueError):
        Request(timeout_nano=2**63).encode()


def test_decode_skips_unknown_fields_of_every_wire_type() -> None:
    unknown = (
        b"\x78\x96\x01"  # field 15 varint
        b"\x81\x01"
        + bytes(8)
        + b"\x8d\x01"
        + bytes(4)  # field 16 fixed64, field 17 fixed32
        + b"\x92\x01\x03abc"  # field 18 length-delimited
        + b"\x9b\x01\x08\x01\x0b\x12\x00\x0c\x9c\x01"  # field 19 group with a nested group inside
        + b"\x08\x07"  # field 1 (service) with the wrong wire type: ignored, as Go does
    )
    request = Request("svc", "m", b"p", 5, (KeyValue("k", "v"),))
    assert Request.decode(unknown + request.encode() + unknown) == request
    response = Response(Status(3, "bad", (b"any",)), b"reply")
    assert Response.decode(unknown + response.encode()) == response
    # A message field seen twice merges (later scalars win, repeated fields append).
    merged = Response.decode(Response(Status(3, "a", (b"1",))).encode() + Response(Status(5)).encode())
    assert merged.status == Status(5, "a", (b"1",))


@pytest.mark.parametrize(
    "data",
    [
        b"\x08",  # varint value missing
        b"\x20\xff\xff",  # truncated varint
        b"\x20" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x20" + b"\xff" * 9 + b"\x02",  # 10th byte overflows 64 bits
        b"\x0a\x05abc",  # length past the end
        b"\x0e",  # wire type 6
        b"\x0f",  # wire type 7
        b"\x0c",  # end group without a start
        b"\x0b\x08\x01",  # unterminated group
        b"\x0b\x14",  # group closed by another field's end tag
        b"\x02\x00",  # field number 0
        b"\x0a\x02\xc3\x28",  # service is not UTF-8
        b"\x2a\x02\x0a\x05",  # metadata entry with a truncated key
        b"\x09\x00\x00",  # truncated fixed64
    ],
)
def test_malformed_requests_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Request.decode(data)


def test_malformed_responses_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Response.decode(b"\x0a\x02\x08")  # status with a truncated code
    # A status message that is not UTF-8 is still reported, with replacement characters.
    assert Response.decode(b"\x0a\x04\x12\x02\xc3\x28").status == Status(0, "\ufffd(")


int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32s = st.integers(min_value=-(2**31), max_value=2**31 - 1)
key_values = st.builds(KeyValue, st.text(), st.text())
requests = st.builds(
    Request, st.text(), st.text(), st.binary(), int64s, st.lists(key_values, max_size=5).map(tuple)
)
statuses = st.builds(Status, int32s, st.text(), st.lists(st.binary(), max_size=3).map(tuple))
responses = st.builds(Response, st.none() | statuses, st.binary())


@given(requests)
def test_request_round_trip(request: Request) -> None:
    assert Request.decode(request.encode()) == request


@given(responses)
def test_response_round_trip(response: Response) -> None:
    assert Response.decode(response.encode()) == response


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_decoding_random_bytes_only_raises_protocol_error(data: bytes) -> None:
    for decode in (Request.decode, Response.decode, Status.decode, KeyValue.decode):
        try:
            decode(data)
        except ProtocolError:
            pass


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_decoder_random_bytes_any_chunking(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_length=64)  # small limit so random lengths hit the oversize path
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out: list[Frame | OversizeFrame] = []
    for start, stop in itertools.pairwise(points):
        out += decoder.feed(data[start:stop])
    assert out == FrameDecoder(max_length=64).feed(data)  # chunking never changes the result


@given(
    st.lists(
        st.builds(
            Frame,
            st.integers(0, 2**32 - 1),
            st.integers(0, 255),
            st.integers(0, 255),
            st.binary(max_size=100),
        ),
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)
def test_decoder_reassembles_frames_split_anywhere(frames: list[Frame], rnd: random.Random) -> None:
    stream = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in frames)
    decoder = FrameDecoder()
    out: list[Frame | OversizeFrame] = []
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 40)
        out += decoder.feed(stream[pos : pos + step])
        pos += step
    assert out == frames


def test_context_helpers() -> None:
    ctx = Context({NAMESPACE_KEY: ["default", "other"], "x": []}, None)
    assert ctx.namespace == "default"
    assert ctx.get("X") is None and ctx.get("missing") is None
    assert Context().namespace is None


def test_error_string_names_the_code() -> None:
    assert str(TtrpcError(5, "container x")) == "ttrpc: NOT_FOUND: container x"
    assert str(TtrpcError(99, "odd")) == "ttrpc: 99: odd"
    assert TtrpcError(6, "x").grpc_status == 6


# ---------------------------------------------------------------------------------------------------
# Client and server on real unix sockets


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(10):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@pytest.fixture
def path() -> Iterator[str]:
    # Short directory: sun_path holds 108 bytes and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ttrpc-", dir="/tmp") as d:
        yield os.path.join(d, "s.sock")


async def echo(payload: bytes, ctx: Context) -> bytes:
    return payload


async def start(path: str, methods: dict[str, Any] | None = None, **kwargs: Any) -> Server:
    server = Server(**kwargs)
    server.register(SVC, {"Echo": echo, **(methods or {})})
    await server.serve_unix(path)
    return server


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, Response]:
    length, sid, mtype, flags = struct.unpack(">IIBB", await reader.readexactly(10))
    assert (mtype, flags) == (RESPONSE, 0)
    return sid, Response.decode(await reader.readexactly(length))


def test_concurrent_calls_complete_out_of_order(run: Any, path: str) -> None:
    n = 200

    async def scenario() -> None:
        gates = [asyncio.Event() for _ in range(n)]
        all_arrived = asyncio.Event()
        stream_ids: list[int] = []

        async def slow(payload: bytes, ctx: Context) -> bytes:
            stream_ids.append(ctx.stream_id)
            if len(stream_ids) == n:
                all_arrived.set()
            await gates[int(payload)].wait()
            return b"reply-" + payload

        server = await start(path, {"Slow": slow})
        client = await Client.connect(path)
        finished: list[int] = []

        async def one(i: int) -> None:
            assert await client.call(SVC, "Slow", b"%d" % i) == b"reply-%d" % i
            finished.append(i)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await all_arrived.wait()
        # Release the handlers last-first; each reply must reach its own caller straight away.
        for i in reversed(range(n)):
            gates[i].set()
            await tasks[i]
        assert finished == list(reversed(range(n)))
        assert stream_ids == list(range(1, 2 * n, 2))
        client.close()
        server.close()
        await server.wait_closed()

    run(scenario())


def test_unknown_service_and_method_are_unimplemented(run: Any, path: str) -> None:
    async def scenario() -> None:
        server = await start(path)
        async with await Client.connect("unix://" + path) as client:
            for service, method in [("no.such.Service", "Echo"), (SVC, "Nope")]:
                with pytest.raises(TtrpcError) as err:
                    await client.call(service, method, b"")
                assert err.value.code == Code.UNIMPLEMENTED
                assert err.value.message == f"service {service}: method {method}: not implemented"
            assert await client.call(SVC, "Echo", b"still fine") == b"still fine"
        server.close()

    run(scenario())


class NotFoundError(Exception):
    grpc_status = Code.NOT_FOUND


class CodedError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"coded {code}")
        self.code = code


def test_handler_exceptions_map_to_status(run: Any, path: str) -> None:
    async def not_found(payload: bytes, ctx: Context) -> bytes:
        raise NotFoundError("container abc: not found")

    async def boom(payload: bytes, ctx: Context) -> bytes:
        raise RuntimeError("boom")

    async def downstream(payload: bytes, ctx: Context) -> bytes:
        raise TtrpcError(Code.FAILED_PRECONDITION, "task must be stopped")

    async def coded(payload: bytes, ctx: Context) -> bytes:
        raise CodedError(Code.ALREADY_EXISTS)

    async def not_bytes(payload: bytes, ctx: Context) -> bytes:
        return None  # type: ignore[return-value]

    def hook(exc: Exception) -> Status:
        code = getattr(exc, "code", Code.UNKNOWN)
        return Status(code, f"hooked: {exc}")

    methods = {"NotFound": not_found, "Boom": boom, "Downstream": downstream, "Coded": coded}
    methods["NotBytes"] = not_bytes
    expected = {
        "NotFound": (Code.NOT_FOUND, "container abc: not found"),
        "Boom": (Code.UNKNOWN, "boom"),
        "Downstream": (Code.FAILED_PRECONDITION, "task must be stopped"),
        "Coded": (Code.UNKNOWN, "coded 6"),
        "NotBytes": (Code.INTERNAL, "ttrpc: handler returned NoneType, want bytes"),
    }

    async def scenario() -> None:
        server = await start(path, methods)
        async with await Client.connect(path) as client:
            for method, (code, message) in expected.items():
                with pytest.raises(TtrpcError) as err:
                    await client.call(SVC, method, b"")
                assert (err.value.code, err.value.message) == (code, message)
        await server.shutdown()

        # A status_from_exception hook reads the errdefs-style `code` attribute.
        server = await start(path, methods, status_from_exception=hook)
        async with await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as err:
                await client.call(SVC, "Coded", b"")
            assert (err.value.code, err.value.message) == (Code.ALREADY_EXISTS, "hooked: coded 6")
        await server.shutdown()

    run(scenario())


def test_deadline_exceeded(run: Any, path: str) -> None:
    async def scenario() -> None:
        cancelled: list[int] = []

        async def block(payload: bytes, ctx: Context) -> bytes:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(ctx.stream_id)
                raise
            return b""

        server = await start(path, {"Block": block})
        async with await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as err:
                await client.call(SVC, "Block", b"", timeout=0.05)
            assert err.value.code == Code.DEADLINE_EXCEEDED
            with pytest.raises(TtrpcError):
                await client.call(SVC, "Block", b"", timeout=0)  # already expired: never sent
            assert await client.call(SVC, "Echo", b"ok", timeout=5) == b"ok"

        # The server enforces timeout_nano itself and answers DeadlineExceeded on the stream.
        reader, writer = await asyncio.open_unix_connection(path)
        request = Request(SVC, "Block", timeout_nano=20_000_000)
        writer.write(encode_frame(1, REQUEST, 0, request.encode()))
        sid, response = await read_reply(reader)
        assert (sid, response.status) == (1, Status(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))
        writer.close()
        assert cancelled == [1, 1]  # both handlers saw the deadline cancel them (one per connection)
        server.close()
        await server.wait_closed()

    run(scenario())


def test_metadata_and_context_reach_the_handler(run: Any, path: str) -> None:
    async def describe(payload: bytes, ctx: Context) -> bytes:
        info = {"ns": ctx.namespace, "md": ctx.metadata, "timeout": ctx.timeout, "method": ctx.method}
        return json.dumps(info).encode()

    async def scenario() -> None:
        server = await start(path, {"Describe": describe})
        async with await Client.connect(path) as client:
            metadata = {NAMESPACE_KEY: "default", "X-Multi": ["a", "ü"]}
            reply = json.loads(await client.call(SVC, "Describe", b"", metadata=metadata, timeout=3))
            assert reply["ns"] == "default"
            assert reply["md"] == {NAMESPACE_KEY: ["default"], "x-multi": ["a", "ü"]}
            assert 2.9 < reply["timeout"] <= 3 and reply["method"] == "Describe"
            reply = json.loads(await client.call(SVC, "Describe", b""))
            assert reply == {"ns": None, "md": {}, "timeout": None, "method": "Describe"}
        server.close()

    run(scenario())


def test_protocol_violations_answer_on_their_stream(run: Any, path: str) -> None:
    async def scenario() -> None:
        server = await start(path)
        reader, writer = await asyncio.open_unix_connection(path)
        echo_request = Request(SVC, "Echo", b"hi").encode()

        async def expect(sid: int, code: int, message: str) -> None:
            got_sid, response = await read_reply(reader)
            assert got_sid == sid and response.status is not None
            assert (response.status.code, response.status.message) == (code, message)

        writer.write(encode_frame(2, REQUEST, 0, echo_request))
        await expect(2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
        writer.write(encode_frame(5, REQUEST, 0, b"\x0a\x05ab"))
        message = "unmarshal request error: length-delimited field runs past the end of the message"
        await expect(5, Code.INVALID_ARGUMENT, message)
        writer.write(encode_frame(3, REQUEST, 0, echo_request))  # 3 <= 5: ids must increase
        await expect(3, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
        writer.write(encode_frame(41, DATA, 0, b""))
        await expect(41, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        writer.write(encode_frame(43, RESPONSE, 0, b"ignored"))  # not for servers: ignored
        length = MESSAGE_LENGTH_MAX + 1
        writer.write(struct.pack(">IIBB", length, 45, REQUEST, 0) + bytes(length))
        message = f"message length {length} exceed maximum message size of {4 << 20}"
        await expect(45, Code.RESOURCE_EXHAUSTED, message)
        # The connection keeps serving after all of that.
        writer.write(encode_frame(47, REQUEST, 0, echo_request))
        sid, response = await read_reply(reader)
        assert (sid, response) == (47, Response(Status(), b"hi"))
        writer.close()
        server.close()
        await server.wait_closed()

    run(scenario())


def test_garbage_closes_only_that_connection(run: Any, path: str) -> None:
    async def scenario() -> None:
        server = await start(path)
        client = await Client.connect(path)
        assert await client.call(SVC, "Echo", b"before") == b"before"

        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert await reader.read() == b""  # not ttrpc: the server hung up
        writer.close()

        rnd = random.Random(1234)
        for _ in range(20):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(rnd.randbytes(rnd.randint(1, 400)))
            writer.close()
            assert await client.call(SVC, "Echo", b"during") == b"during"

        async with await Client.connect(path) as other:
            assert await other.call(SVC, "Echo", b"new") == b"new"
        assert await client.call(SVC, "Echo", b"after") == b"after"
        client.close()
        server.close()
        await server.wait_closed()

    run(scenario())


def test_client_close_mid_call(run: Any, path: str) -> None:
    async def scenario() -> None:
        started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def block(payload: bytes, ctx: Context) -> bytes:
            started.set()
            await release.wait()
            finished.set()
            return b"late"

        server = await start(path, {"Block": block})
        closes: list[str] = []
        client = await Client.connect(path, on_close=lambda: closes.append("closed"))
        call = asyncio.create_task(client.call(SVC, "Block", b""))
        await started.wait()
        client.close()
        with pytest.raises(ConnectionClosed):
            await call
        await client.wait_closed()
        assert closes == ["closed"] and client.closed
        with pytest.raises(ConnectionClosed):
            await client.call(SVC, "Echo", b"")

        # The handler is not cancelled by the client going away; its reply is dropped.
        release.set()
        await finished.wait()
        async with await Client.connect(path) as other:
            assert await other.call(SVC, "Echo", b"x") == b"x"
        client.close()  # idempotent
        assert closes == ["closed"]
        server.close()
        await server.wait_closed()

    run(scenario())


def test_server_close_fails_pending_calls(run: Any, path: str) -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def block(payload: bytes, ctx: Context) -> bytes:
            started.set()
            try:
                await asyncio.sleep(30)
            finally:
                cancelled.set()
            return b""

        server = await start(path, {"Block": block})
        closes: list[int] = []
        client = await Client.connect(path, on_close=lambda: closes.append(1))
        calls = [asyncio.create_task(client.call(SVC, "Block", b"")) for _ in range(3)]
        await started.wait()
        server.close()
        for call in calls:
            with pytest.raises(ConnectionClosed):
                await call
        await server.wait_closed()
        assert cancelled.is_set()
        await client.wait_closed()
        assert closes == [1]

    run(scenario())


def test_graceful_shutdown_lets_running_calls_answer(run: Any, path: str) -> None:
    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def block(payload: bytes, ctx: Context) -> bytes:
            started.set()
            await release.wait()
            return b"done"

        server = await start(path, {"Block": block})
        client = await Client.connect(path)
        call = asyncio.create_task(client.call(SVC, "Block", b""))
        await started.wait()
        shutdown = asyncio.create_task(server.shutdown(grace=5))
        await asyncio.sleep(0.01)
        with pytest.raises(OSError):
            await Client.connect(path)  # no longer listening
        release.set()
        assert await call == b"done"
        await shutdown
        await client.wait_closed()

    run(scenario())


def test_peer_credentials_must_match(run: Any, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        with monkeypatch.context() as patch:
            patch.setattr(os, "geteuid", lambda: os.getuid() + 1)
            server = await start(path)
        closes: list[int] = []
        client = await Client.connect(path, on_close=lambda: closes.append(1))
        await client.wait_closed()  # dropped by the server without a word
        assert closes == [1]
        with pytest.raises(ConnectionClosed):
            await client.call(SVC, "Echo", b"")
        server.close()

        server = await start(path, require_same_user=False)
        async with await Client.connect(path) as client:
            assert await client.call(SVC, "Echo", b"x") == b"x"
        server.close()

    run(scenario())


def test_prebound_socket_large_and_oversize_messages(run: Any, path: str) -> None:
    async def huge(payload: bytes, ctx: Context) -> bytes:
        return bytes(MESSAGE_LENGTH_MAX + 1)

    async def scenario() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        server = Server()
        server.register(SVC, {"Echo": echo, "Huge": huge})
        await server.serve_socket(sock)
        async with await Client.connect(path) as client:
            big = os.urandom(3 << 20)
            results = await asyncio.gather(*(client.call(SVC, "Echo", big) for _ in range(3)))
            assert results == [big] * 3
            with pytest.raises(TtrpcError) as err:
                await client.call(SVC, "Echo", bytes(MESSAGE_LENGTH_MAX))  # the Request wrapper tips it over
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            with pytest.raises(TtrpcError) as err:
                await client.call(SVC, "Huge", b"")
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert await client.call(SVC, "Echo", b"small") == b"small"
        server.close()
        await server.wait_closed()

    run(scenario())


def test_register_rejects_duplicates() -> None:
    server = Server()
    server.register(SVC, {"Echo": echo})
    with pytest.raises(ValueError, match="duplicate service"):
        server.register(SVC, {})


def test_stale_socket_file_and_abstract_names(run: Any, path: str) -> None:
    async def scenario() -> None:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)  # left behind by a dead process: nobody listens, the file stays
        stale.close()
        server = await start(path)
        async with await Client.connect(path) as client:
            assert await client.call(SVC, "Echo", b"file") == b"file"
        server.close()

        # Go's "@name" spelling of an abstract socket, as well as the raw "\0name".
        abstract = await start("\0" + path)
        async with await Client.connect("@" + path) as client:
            assert await client.call(SVC, "Echo", b"abstract") == b"abstract"
        abstract.close()
        await abstract.wait_closed()

    run(scenario())
