"""The event exchange: publish, forward and subscribe, scoped by namespace.

Publishers never wait for subscribers. Each subscriber has a bounded queue; one that falls
behind by more than ``queue_size`` events is cut off (its stream ends with ResourceExhausted)
rather than slowing everybody down or growing without bound. A subscriber that goes away is
removed when its handler task is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from betterproto2 import Message

from pyctr.api import filters, identifiers, typeurl
from pyctr.api.errdefs import InvalidArgument, ResourceExhausted
from pyctr.api.log import get_logger
from pyctr.daemon import plugin

log = get_logger("pyctrd.events")

QUEUE_SIZE = 1024


@dataclass(frozen=True)
class Envelope:
    timestamp: int  # ns since the epoch
    namespace: str
    topic: str
    type_url: str
    value: bytes


def validate_topic(topic: str) -> str:
    try:
        if not topic:
            raise InvalidArgument("must not be empty")
        if topic[0] != "/":
            raise InvalidArgument("must start with '/'")
        if len(topic) == 1:
            raise InvalidArgument("must have at least one component")
        for component in topic[1:].split("/"):
            try:
                identifiers.validate(component)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"failed validation on component {identifiers.goquote(component)}: {exc.message}"
                ) from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"envelope topic {identifiers.goquote(topic)}: {exc.message}") from None
    return topic


class _EnvelopeAdaptor:
    """Filter fields of an envelope: namespace, topic, and ``event.<field>`` of the payload."""

    def __init__(self, env: Envelope) -> None:
        self.env = env
        self._event: filters.DictAdaptor | None = None

    def field(self, path: tuple[str, ...]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "namespace":
            return self.env.namespace
        if head == "topic":
            return self.env.topic
        if head == "event" and len(path) > 1:
            if self._event is None:
                self._event = filters.DictAdaptor(_event_fields(self.env))
            return self._event.field(path[1:])
        return None


def _event_fields(env: Envelope) -> dict[str, object]:
    """The payload's string fields and labels, by proto (snake_case) name."""
    try:
        msg = typeurl.unmarshal(env.type_url, env.value)
    except Exception:
        return {}
    out: dict[str, object] = {}
    for name, value in vars(msg).items():
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            out[name] = value
    return out


class Subscription:
    def __init__(self, exchange: Exchange, flt: filters.Filter, queue_size: int) -> None:
        self._exchange = exchange
        self._filter = flt
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self.closed = False

    def offer(self, env: Envelope) -> None:
        if self.closed or not self._filter.match(_EnvelopeAdaptor(env)):
            return
        try:
            self._queue.put_nowait(env)
        except asyncio.QueueFull:
            # Cut off: a consumer this far behind would only ever see a gap in the stream.
            self.dropped += 1
            self.closed = True
            self._exchange._remove(self)
            self._drain_and_mark()

    def _drain_and_mark(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._exchange._remove(self)
            self._drain_and_mark()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        try:
            while True:
                env = await self._queue.get()
                if env is None:
                    if self.dropped:
                        raise ResourceExhausted("event subscriber fell too far behind; events were dropped")
                    return
                yield env
        finally:
            self.close()


class Exchange:
    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self._subscribers: set[Subscription] = set()
        self.queue_size = queue_size

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        """Publish an event from inside the daemon."""
        validate_topic(topic)
        url, value = typeurl.marshal(event)
        self._broadcast(Envelope(time.time_ns(), namespace, topic, url, value))

    def forward(self, env: Envelope) -> None:
        """Re-publish an envelope made elsewhere (a shim, a client's Publish)."""
        try:
            identifiers.validate(env.namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"envelope namespace: {exc.message}") from None
        validate_topic(env.topic)
        self._broadcast(env)

    def _broadcast(self, env: Envelope) -> None:
        log.debug("event published", ns=env.namespace, topic=env.topic, type=env.type_url)
        for sub in list(self._subscribers):
            sub.offer(env)

    def subscribe(self, fs: Sequence[str] = ()) -> Subscription:
        sub = Subscription(self, filters.parse_all(fs), self.queue_size)
        self._subscribers.add(sub)
        log.debug("event subscriber added", subscribers=len(self._subscribers))
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            # Tests read this line to see that vanished clients do not leak subscriptions.
            log.debug("event subscriber removed", subscribers=len(self._subscribers))

    def close(self) -> None:
        for sub in list(self._subscribers):
            sub.close()


async def _init(ic: plugin.InitContext) -> Exchange:
    return Exchange()


REGISTRATION = plugin.Registration(type=plugin.EVENT, id="exchange", init=_init)
