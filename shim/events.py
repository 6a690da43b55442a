"""Task events to the daemon: ``containerd.services.events.ttrpc.v1.Events/Forward`` on $TTRPC_ADDRESS.

Topics, in the order the shim emits them for one task (the daemon relies on it):

    /tasks/create -> /tasks/start -> [/tasks/exec-added -> /tasks/exec-started -> /tasks/exit (exec)]
                  -> /tasks/exit -> /tasks/delete
    /tasks/paused, /tasks/resumed, /tasks/oom whenever they happen

One sender task forwards the queue in order. A failed send is retried on a fresh connection with a
growing pause, for up to ``budget`` seconds after the event was queued, then dropped (the Go shim
gives up after about 20 s as well): the shim keeps running while the daemon is down, and a restarted
daemon re-reads task state instead of replaying events. Each call carries the namespace in the
``containerd-namespace-ttrpc`` metadata key and in the envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass

import betterproto2

from pyctr.api import ttrpc
from pyctr.api._pb.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from pyctr.api._pb.google.protobuf import Any as AnyMessage
from pyctr.api._pb.message_pool import default_message_pool
from pyctr.api.namespaces import TTRPC_HEADER

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
_RETRYABLE = {ttrpc.Code.UNAVAILABLE, ttrpc.Code.DEADLINE_EXCEEDED, ttrpc.Code.CANCELLED}


def type_url(message: betterproto2.Message) -> str:
    """The bare type URL containerd 1.6 expects (``containerd.events.TaskExit``)."""
    # The generated module registered the class on import; no need to load every other module.
    url = default_message_pool.type_to_url[type(message)]
    return str(url).removeprefix("type.googleapis.com/")


@dataclass(slots=True)
class _Item:
    topic: str
    payload: bytes
    queued: float  # monotonic


class Publisher:
    def __init__(self, address: str, namespace: str, *, timeout: float = 5.0, budget: float = 20.0) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._timeout = timeout
        self._budget = budget
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._client: ttrpc.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publish(self, topic: str, event: betterproto2.Message) -> None:
        """Queues an event; never blocks, never fails (delivery is best effort, in order)."""
        if not self._address:
            log.debug("no TTRPC_ADDRESS: dropping event %s", topic)
            return
        now = datetime.datetime.now(datetime.UTC)
        envelope = Envelope(
            timestamp=now,
            namespace=self._namespace,
            topic=topic,
            event=AnyMessage(type_url=type_url(event), value=bytes(event)),
        )
        self._queue.put_nowait(_Item(topic, bytes(ForwardRequest(envelope=envelope)), time.monotonic()))

    async def _connect(self) -> ttrpc.Client:
        if self._client is None or self._client.closed:
            self._client = await ttrpc.Client.connect(self._address)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _send(self, item: _Item) -> None:
        pause = 0.1
        while True:
            try:
                client = await self._connect()
                await client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    item.payload,
                    metadata={TTRPC_HEADER: self._namespace},
                    timeout=self._timeout,
                )
                return
            except ttrpc.TtrpcError as exc:
                if exc.code not in _RETRYABLE:
                    log.warning("event %s refused by the daemon: %s", item.topic, exc)
                    return
                error: Exception = exc
            except (OSError, ttrpc.ProtocolError, TimeoutError) as exc:
                error = exc
            self._drop_client()
            if time.monotonic() - item.queued + pause > self._budget:
                log.warning("dropping event %s after retries: %s", item.topic, error)
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            await self._send(item)
        self._drop_client()

    async def close(self, grace: float = 5.0) -> None:
        """Sends what is queued (for at most ``grace`` seconds), then stops."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, grace)
        self._drop_client()
