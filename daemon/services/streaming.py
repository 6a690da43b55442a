"""containerd.services.streaming.v1.Streaming: side streams that transfers write to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pyctr.api import namespaces, typeurl
from pyctr.api._pb.containerd.services.streaming import v1 as pb
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon import plugin
from pyctr.daemon.transfer.streams import SideStream, StreamManager


class StreamingService(pb.StreamingBase):
    def __init__(self, manager: StreamManager) -> None:
        self.manager = manager

    async def stream(self, messages: AsyncIterator[PbAny]) -> AsyncIterator[PbAny]:
        ns = namespaces.required()
        first = await anext(messages, None)
        if first is None:
            return
        init = typeurl.unmarshal(first.type_url, first.value)
        if not isinstance(init, pb.StreamInit) or not init.id:
            raise InvalidArgument("the first message of a stream must be a StreamInit with an id")
        side = SideStream(init.id)
        self.manager.register(ns, side)

        async def pump() -> None:
            async for msg in messages:
                side.incoming.put_nowait(msg)
            side.incoming.put_nowait(None)

        reader = asyncio.ensure_future(pump())
        try:
            url, value = typeurl.marshal(Empty())
            yield PbAny(type_url=url, value=value)
            async for msg in side.outgoing():
                yield msg
        finally:
            self.manager.unregister(ns, side)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


def service(ic: plugin.InitContext) -> StreamingService:
    return StreamingService(ic.get_by_id(plugin.INTERNAL, "streaming").manager)
