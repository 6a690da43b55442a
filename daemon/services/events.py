"""containerd.services.events.v1.Events over gRPC (the ttrpc Events.Forward is ``events_ttrpc``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.services.events import v1 as pb
from pyctr.api._pb.containerd.services.events.ttrpc import v1 as ttrpc_pb
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon import plugin
from pyctr.daemon.events import Envelope, Exchange


def envelope(msg: pb.Envelope | ttrpc_pb.Envelope | None) -> Envelope:
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
        self.exchange.forward(envelope(message.envelope))
        return Empty()

    async def subscribe(self, message: pb.SubscribeRequest) -> AsyncIterator[pb.Envelope]:
        # Subscriptions see every namespace; callers narrow them with filters.
        async for env in self.exchange.subscribe(message.filters):
            yield envelope_message(env)


def service(ic: plugin.InitContext) -> EventsService:
    return EventsService(ic.get(plugin.EVENT))
