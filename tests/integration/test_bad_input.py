"""What clients get wrong must cost them an error status, never the daemon its life.

Garbage and truncated messages on both sockets, unknown methods, bad or missing namespaces,
and subscribers that vanish mid-stream (their subscriptions must be released: the daemon logs
the subscriber count at debug level, and the count has to come back to zero).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from pyctr.api import ttrpc
from pyctr.api._pb.containerd.events import NamespaceCreate
from pyctr.api._pb.containerd.services.events.ttrpc import v1 as ttrpc_pb
from pyctr.api._pb.containerd.services.events.v1 import (
    Envelope,
    EventsStub,
    PublishRequest,
    SubscribeRequest,
)
from pyctr.api._pb.containerd.services.leases.v1 import LeasesStub, ListRequest
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api._pb.grpc.health.v1 import HealthCheckRequest, HealthCheckResponseServingStatus, HealthStub
from tests.helpers import daemons
from tests.helpers.streams import log_records, stop_process, wait_for

NS_KEY = "containerd-namespace"
TTRPC_EVENTS = "containerd.services.events.ttrpc.v1.Events"


@pytest.fixture(scope="module")
def pyd() -> Iterator[daemons.Daemon]:
    d = daemons.start_pyctrd()
    try:
        yield d
    finally:
        daemons.cleanup(d)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def healthy(address: str) -> bool:
    channel = Channel(path=address)
    try:
        resp = await HealthStub(channel).check(HealthCheckRequest(), timeout=5)
        return resp.status == HealthCheckResponseServingStatus.SERVING
    finally:
        channel.close()


def assert_serving(d: daemons.Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    assert run(healthy(d.address))


class RawCodec(CodecBase):
    """Sends and returns message bytes as they are, so a test can put anything on the wire."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return bytes(data)


async def raw_unary(address: str, path: str, body: bytes, ns: str | None = "default") -> bytes | GRPCError:
    channel = Channel(path=address, codec=RawCodec())
    try:
        md = {NS_KEY: ns} if ns is not None else None
        async with channel.request(path, Cardinality.UNARY_UNARY, bytes, bytes, metadata=md, timeout=5) as st:
            await st.send_message(body, end=True)
            reply = await st.recv_message()
            await st.recv_trailing_metadata()
            assert reply is not None
            return reply
    except GRPCError as exc:
        return exc
    finally:
        channel.close()


def subscriber_count(d: daemons.Daemon) -> int:
    """The daemon's own count of event subscribers, from its latest debug line about them."""
    count = 0
    for rec in log_records(d.log_path):
        if rec.get("event") in ("event subscriber added", "event subscriber removed"):
            count = int(rec["subscribers"])
    return count


async def open_subscription(
    address: str, filters: list[str] | None = None
) -> tuple[Channel, AsyncIterator[Envelope]]:
    channel = Channel(path=address)
    stream = EventsStub(channel).subscribe(SubscribeRequest(filters=filters or [])).__aiter__()
    return channel, stream


# ------------------------------------------------------------------------------------------- garbage


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

GARBAGE = {
    "http1": b"GET / HTTP/1.1\r\nHost: pyctrd\r\n\r\n",
    "random": random.Random(7).randbytes(8192),
    "zeros": bytes(4096),
    # A valid preface, then a HEADERS frame whose HPACK block is nonsense.
    "bad-hpack": HTTP2_PREFACE
    + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff",
    # A valid preface, then a frame cut short by the close.
    "cut-frame": HTTP2_PREFACE + b"\x00\x10\x00\x00\x00",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_on_grpc_socket(pyd: daemons.Daemon, name: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(pyd.address)
        try:
            s.sendall(GARBAGE[name])
            s.recv(65536)  # whatever the server answers (GOAWAY, nothing), then we leave
        except OSError:
            pass  # the server may drop us first; that is its right
    assert_serving(pyd)


def test_truncated_protobuf_is_an_error_status(pyd: daemons.Daemon) -> None:
    create = "/containerd.services.leases.v1.Leases/Create"
    get = "/containerd.services.namespaces.v1.Namespaces/Get"
    # CreateRequest{id: "ab…"} whose length says 5 bytes but only 2 follow.
    for path, body in ((create, b"\x0a\x05ab"), (get, b"\x0a\x05ab"), (get, b"\xff\xff\xff")):
        got = run(raw_unary(pyd.address, path, body, ns="truncated"))
        assert isinstance(got, GRPCError), (path, body, got)
        assert got.status == Status.INTERNAL, (path, got.status, got.message)
    # Nothing was created from the half message, and well-formed raw bytes still work.
    ok = run(raw_unary(pyd.address, get, b"\x0a\x02ab"))
    assert ok == b"\x0a\x04\x0a\x02ab"  # GetNamespaceResponse{namespace{name: "ab"}}

    async def leases() -> list[str]:
        channel = Channel(path=pyd.address)
        try:
            resp = await LeasesStub(channel, metadata={NS_KEY: "truncated"}).list(ListRequest())
            return [le.id for le in resp.leases]
        finally:
            channel.close()

    assert run(leases()) == []
    assert_serving(pyd)


# ------------------------------------------------------------------------------ unknown methods, headers


@pytest.mark.parametrize(
    "path",
    ["/foo.Bar/Baz", "/containerd.services.version.v1.Version/Nope", "/not-even-a-path"],
)
def test_unknown_method_is_unimplemented(pyd: daemons.Daemon, path: str) -> None:
    async def call() -> GRPCError:
        channel = Channel(path=pyd.address)
        try:
            async with channel.request(path, Cardinality.UNARY_UNARY, Empty, Empty, timeout=5) as st:
                await st.send_message(Empty(), end=True)
                await st.recv_message()
        except GRPCError as exc:
            return exc
        finally:
            channel.close()
        raise AssertionError(f"{path} answered OK")

    err = run(call())
    # grpclib checks content-type before grpc-status: without it this would be UNKNOWN, which is
    # also what the Go client reports (as a transport error) for grpclib's bare default answer.
    assert err.status == Status.UNIMPLEMENTED, (err.status, err.message)
    assert err.status.value == 12


async def list_leases_with(address: str, metadata: dict[str, str] | None) -> GRPCError | None:
    channel = Channel(path=address)
    try:
        await LeasesStub(channel, metadata=metadata).list(ListRequest(), timeout=5)
        return None
    except GRPCError as exc:
        return exc
    finally:
        channel.close()


@pytest.mark.parametrize("ns", ["bad!", "-leading", "x" * 77, "a..b"])
def test_invalid_namespace_is_invalid_argument(pyd: daemons.Daemon, ns: str) -> None:
    err = run(list_leases_with(pyd.address, {NS_KEY: ns}))
    assert err is not None and err.status == Status.INVALID_ARGUMENT, err
    assert err.message and err.message.startswith("namespace validation: ")


def test_missing_namespace_is_failed_precondition(pyd: daemons.Daemon) -> None:
    # (grpclib refuses to send an empty header value; the real ctr's `-n ''` is in tests/interop.)
    err = run(list_leases_with(pyd.address, None))
    assert err is not None and err.status == Status.FAILED_PRECONDITION, err
    assert err.message == "namespace is required: failed precondition"


# ------------------------------------------------------------------------------- vanishing subscribers


def test_vanishing_subscribers_are_released(pyd: daemons.Daemon) -> None:
    baseline = subscriber_count(pyd)
    in_process = 3

    # Two clients in their own processes, killed with SIGKILL (by their PIDs) mid-stream.
    procs = [
        subprocess.Popen(
            [daemons.PYCTR, "-a", pyd.address, "events"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]

    async def vanish_in_process() -> None:
        opened = [await open_subscription(pyd.address) for _ in range(in_process)]
        pending = [asyncio.ensure_future(stream.__anext__()) for _, stream in opened]
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_for, lambda: subscriber_count(pyd) == baseline + in_process + 2, 15)
        for channel, _ in opened:
            channel.close()  # the connection goes away under the open stream
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    try:
        run(vanish_in_process())
    finally:
        for proc in procs:
            proc.kill()
            stop_process(proc)
    wait_for(lambda: subscriber_count(pyd) == baseline, 10)

    # Publishing still works, and a new subscriber sees every event, in order.
    async def publish_and_receive(n: int) -> list[str]:
        channel, stream = await open_subscription(pyd.address, ['topic~="^/test/vanish/"'])
        try:
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.to_thread(wait_for, lambda: subscriber_count(pyd) == baseline + 1, 10)
            events = EventsStub(channel, metadata={NS_KEY: "vanish"})
            payload = PbAny(
                type_url="containerd.events.NamespaceCreate", value=bytes(NamespaceCreate(name="v"))
            )
            for i in range(n):
                await events.publish(PublishRequest(topic=f"/test/vanish/e{i}", event=payload))
            got = [(await first).topic]
            while len(got) < n:
                got.append((await stream.__anext__()).topic)
            return got
        finally:
            channel.close()

    assert run(publish_and_receive(200)) == [f"/test/vanish/e{i}" for i in range(200)]
    wait_for(lambda: subscriber_count(pyd) == baseline, 10)
    assert_serving(pyd)


# ----------------------------------------------------------------------------------------------- ttrpc


async def forward_and_receive(d: daemons.Daemon, topic: str) -> tuple[Envelope, ttrpc_pb.Envelope]:
    channel, stream = await open_subscription(d.address, [f'topic=="{topic}"'])
    try:
        received = asyncio.ensure_future(stream.__anext__())
        before = subscriber_count(d)
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_for, lambda: subscriber_count(d) > before, 10)
        sent = ttrpc_pb.Envelope(
            timestamp=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC),
            namespace="shim-ns",
            topic=topic,
            event=PbAny(
                type_url="containerd.events.NamespaceCreate", value=bytes(NamespaceCreate(name="fw"))
            ),
        )
        async with await ttrpc.Client.connect(d.address + ".ttrpc") as client:
            reply = await client.call(
                TTRPC_EVENTS,
                "Forward",
                bytes(ttrpc_pb.ForwardRequest(envelope=sent)),
                metadata={ttrpc.NAMESPACE_KEY: "shim-ns"},
                timeout=5,
            )
        assert reply == b""  # google.protobuf.Empty
        return await asyncio.wait_for(received, 5), sent
    finally:
        channel.close()


def test_ttrpc_forward_reaches_grpc_subscribers(pyd: daemons.Daemon) -> None:
    got, sent = run(forward_and_receive(pyd, "/test/forward"))
    assert (got.namespace, got.topic) == ("shim-ns", "/test/forward")
    assert got.timestamp == sent.timestamp
    assert got.event is not None and sent.event is not None
    assert (got.event.type_url, got.event.value) == (sent.event.type_url, sent.event.value)


def ttrpc_exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        reply = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            pass  # dropped by the server: allowed
        return reply


def test_garbage_on_ttrpc_socket(pyd: daemons.Daemon) -> None:
    path = pyd.address + ".ttrpc"
    # Not ttrpc at all: a "length" far above the limit; the server just hangs up.
    ttrpc_exchange(path, b"\xff" * 64)
    ttrpc_exchange(path, random.Random(11).randbytes(4096))
    # Well-framed, but the request inside is not a protobuf message: an error on that stream only.
    reply = ttrpc_exchange(path, ttrpc.encode_frame(1, ttrpc.REQUEST, 0, b"\x0a\x05ab"))
    frames = ttrpc.FrameDecoder().feed(reply)
    assert len(frames) == 1 and isinstance(frames[0], ttrpc.Frame), reply
    status = ttrpc.Response.decode(frames[0].data).status
    assert status is not None and status.code == ttrpc.Code.INVALID_ARGUMENT, status
    # A well-formed request whose payload is truncated protobuf.
    req = ttrpc.Request(TTRPC_EVENTS, "Forward", b"\x0a\x40\x12", 0, ())
    ttrpc_exchange(path, ttrpc.encode_frame(1, ttrpc.REQUEST, 0, req.encode()))

    got, _ = run(forward_and_receive(pyd, "/test/after-garbage"))
    assert got.topic == "/test/after-garbage"
    assert_serving(pyd)
    assert os.path.exists(path)
