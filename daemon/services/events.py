"""containerd.services.events.v1.Events over gRPC, and the ttrpc Events.Forward used by shims."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.services.events import v1 as pb
from pyctr.api._pb.containerd.services.events.ttrpc import v1 as ttrpc_pb
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.api.ttrpc import Context, Server
from pyctr.daemon import plugin
from pyctr.daemon.events import Envelope, Exchange

TTRPC_SERVICE = "containerd.services.events.ttrpc.v1.Events"


def _envelope(msg: pb.Envelope | ttrpc_pb.Envelope | None) -> Envelope:
    if msg is None:
        raise InvalidArgument("envelope must be set")
    if msg.event is None:
        raise InvalidArgument("envelope event must be set")
    return Envelope(
        timestamp=pbutil.nanoseconds(msg.timestamp) or time.time_ns(),
        namespace=msg.namespace,
        topic=msg.topic,
        type_url=msg.event.type_url,
        value=msg.event.value,
    )


def envelope_message(env: Envelope) -> pb.Envelope:
    return pb.Envelope(
        timestamp=pbutil.timestamp(env.timestamp),
        namespace=env.namespace,
        topic=env.topic,
        event=pbutil.any_(env.type_url, env.value),
    )


class EventsService(pb.EventsBase):
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    async def publish(self, message: pb.PublishRequest) -> Empty:
        ns = namespaces.required()
        if message.event is None:
            raise InvalidArgument("event must be set")
        self.exchange.forward(
            Envelope(time.time_ns(), ns, message.topic, message.event.type_url, message.event.value)
        )
        return Empty()

    async def forward(self, message: pb.ForwardRequest) -> Empty:
        self.exchange.forward(_envelope(message.envelope))
        return Empty()

    async def subscribe(self, message: pb.SubscribeRequest) -> AsyncIterator[pb.Envelope]:
        # Subscriptions see every namespace; callers narrow them with filters.
        async for env in self.exchange.subscribe(message.filters):
            yield envelope_message(env)

    def register_ttrpc(self, server: Server) -> None:
        async def forward(payload: bytes, ctx: Context) -> bytes:
            req = ttrpc_pb.ForwardRequest.parse(payload)
            self.exchange.forward(_envelope(req.envelope))
            return b""

        server.register(TTRPC_SERVICE, {"Forward": forward})


async def _init(ic: plugin.InitContext) -> EventsService:
    return EventsService(ic.get(plugin.EVENT))


REGISTRATION = plugin.Registration(type=plugin.GRPC, id="events", init=_init, requires=(plugin.EVENT,))


async def _init_ttrpc(ic: plugin.InitContext) -> EventsService:
    return EventsService(ic.get(plugin.EVENT))


TTRPC_REGISTRATION = plugin.Registration(
    type=plugin.TTRPC, id="events", init=_init_ttrpc, requires=(plugin.EVENT,)
)
