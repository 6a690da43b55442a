"""Named side streams (containerd.services.streaming.v1): progress, data and credentials for
transfers.

A client opens ``Streaming.Stream``, sends ``StreamInit{id}``, and gets an empty acknowledgement
once the stream is registered; a later ``Transfer`` call names it (``progress_stream``, a data
stream, a registry's ``auth_stream``), and the transfer sends ``Any`` messages down it. Closing it
from the server ends the client's stream.

The auth stream (containerd 2.x's credential callback), one question at a time::

    daemon -> client   containerd.types.transfer.AuthRequest{host, reference}
    client -> daemon   containerd.types.transfer.AuthResponse{authType, secret, username, expire_at}

``host`` is the endpoint the registry client is about to authenticate to (``host[:port]``: a
mirror's, a token realm's registry). authType NONE means "no credentials for that host";
CREDENTIALS is a username and password, REFRESH an identity token in ``secret``, HEADER a
ready Authorization value. An answer is kept for the transfer (until ``expire_at`` when set),
so a host is asked about once however many tokens its scopes need. A client that ends its half
of the stream has nothing more to give: later questions get "no credentials".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pyctr.api import typeurl
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import AlreadyExists, DeadlineExceeded, NotFound

if TYPE_CHECKING:
    from betterproto2 import Message

    from pyctr.daemon.remotes.auth import Credentials

# How long the daemon waits for the client's answer on an auth stream. The client answers from
# what it already holds (a password prompt happens before the transfer starts), so this only
# ends transfers whose client stopped answering.
AUTH_TIMEOUT = 60.0


class SideStream:
    def __init__(self, stream_id: str) -> None:
        self.id = stream_id
        self._out: asyncio.Queue[PbAny | None] = asyncio.Queue()
        self.incoming: asyncio.Queue[PbAny | None] = asyncio.Queue()
        self.closed = False

    def send(self, message: Message) -> None:
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


class AuthCallback:
    """A CredentialsFunc that asks the transfer's client over its auth stream (see the module doc).

    Never logs or repeats what the client answers: secrets stay in the returned Credentials."""

    def __init__(self, side: SideStream, reference: str, timeout: float = AUTH_TIMEOUT) -> None:
        self.side = side
        self.reference = reference
        self.timeout = timeout
        self._lock = asyncio.Lock()  # one question in flight: answers come back in order
        self._answers: dict[str, tuple[Credentials | None, float]] = {}  # host -> (creds, expiry)
        self._ended = False

    async def __call__(self, host: str) -> Credentials | None:
        async with self._lock:
            cached = self._answers.get(host)
            if cached is not None and cached[1] > time.time():
                return cached[0]
            if self._ended or self.side.closed:
                return None
            self.side.send(tt.AuthRequest(host=host, reference=self.reference))
            resp = await self._answer(host)
            if resp is None:
                return None
            creds = _credentials(resp)
            expiry = resp.expire_at.timestamp() if resp.expire_at is not None else float("inf")
            self._answers[host] = (creds, expiry)
            return creds

    async def _answer(self, host: str) -> tt.AuthResponse | None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                msg = await asyncio.wait_for(self.side.incoming.get(), deadline - time.monotonic())
            except TimeoutError:
                raise DeadlineExceeded(
                    f"auth stream {self.side.id}: no answer about {host} within {self.timeout:.0f}s"
                ) from None
            if msg is None:
                self._ended = True
                return None
            try:
                obj = typeurl.unmarshal(msg.type_url, msg.value)
            except KeyError:
                continue  # unknown message types are ignored, as containerd does
            if isinstance(obj, tt.AuthResponse):
                return obj


def _credentials(resp: tt.AuthResponse) -> Credentials | None:
    from pyctr.daemon.remotes.auth import Credentials

    if resp.auth_type == tt.AuthType.CREDENTIALS:
        return Credentials(resp.username, resp.secret)
    if resp.auth_type == tt.AuthType.REFRESH:
        return Credentials("", resp.secret)
    if resp.auth_type == tt.AuthType.HEADER:
        return Credentials("", "", header=resp.secret)
    return None
