"""Named side streams (containerd.services.streaming.v1): progress and data for transfers.

A client opens ``Streaming.Stream``, sends ``StreamInit{id}``, and gets an empty acknowledgement
once the stream is registered; a later ``Transfer`` call names it (``progress_stream``), and the
transfer sends ``Any`` messages down it. Closing it from the server ends the client's stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pyctr.api import typeurl
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import AlreadyExists, NotFound


class SideStream:
    def __init__(self, stream_id: str) -> None:
        self.id = stream_id
        self._out: asyncio.Queue[PbAny | None] = asyncio.Queue()
        self.incoming: asyncio.Queue[PbAny | None] = asyncio.Queue()
        self.closed = False

    def send(self, message: object) -> None:
        if self.closed:
            return
        url, value = typeurl.marshal(message)
        self._out.put_nowait(PbAny(type_url=url, value=value))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.put_nowait(None)

    async def outgoing(self) -> AsyncIterator[PbAny]:
        while (msg := await self._out.get()) is not None:
            yield msg


class StreamManager:
    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], SideStream] = {}

    def register(self, ns: str, stream: SideStream) -> None:
        key = (ns, stream.id)
        if key in self._streams:
            raise AlreadyExists(f"stream {stream.id}")
        self._streams[key] = stream

    def unregister(self, ns: str, stream: SideStream) -> None:
        if self._streams.get((ns, stream.id)) is stream:
            del self._streams[(ns, stream.id)]

    def get(self, ns: str, stream_id: str) -> SideStream:
        try:
            return self._streams[(ns, stream_id)]
        except KeyError:
            raise NotFound(f"stream {stream_id}") from None
