"""The base classes of the generated gRPC code: betterproto2 0.10's, without ``grpclib.server``.

The generated modules (``api/_pb``) subclass ``ServiceStub`` (clients) and ``ServiceBase``
(servers). betterproto2 keeps both in the package ``betterproto2.grpclib``, whose import also
imports ``grpclib.server`` and with it h2 (~15 ms of CPU), only for a type annotation; pyctrd
serves through its own edge (``daemon/server.py``) and needs neither. ``api/protogen.py`` points
the generated code here. The two classes are copied from betterproto2 0.10.0
(``betterproto2/grpclib/grpclib_{client,server}.py``, MIT licence, (c) the betterproto
authors), unchanged but for formatting and the annotations; ``tests/unit/test_protogen.py``
checks they stay in step with the installed betterproto2.
"""

from __future__ import annotations

import asyncio
from abc import ABC
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpclib.const

if TYPE_CHECKING:
    from betterproto2._types import IProtoMessage, T
    from grpclib.client import Channel
    from grpclib.metadata import Deadline
    from grpclib.server import Stream


Value = str | bytes
MetadataLike = Mapping[str, Value] | Collection[tuple[str, Value]]
MessageSource = Iterable["IProtoMessage"] | AsyncIterable["IProtoMessage"]


class ServiceStub(ABC):  # noqa: B024 (as upstream: a marker base)
    """
    Base class for async gRPC clients.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.deadline = deadline
        self.metadata = metadata

    def __resolve_request_kwargs(
        self,
        timeout: float | None,
        deadline: Deadline | None,
        metadata: MetadataLike | None,
    ):
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "deadline": self.deadline if deadline is None else deadline,
            "metadata": self.metadata if metadata is None else metadata,
        }

    async def _unary_unary(
        self,
        route: str,
        request: IProtoMessage,
        response_type: type[T],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> T:
        """Make a unary request and return the response."""
        async with self.channel.request(
            route,
            grpclib.const.Cardinality.UNARY_UNARY,
            type(request),
            response_type,
            **self.__resolve_request_kwargs(timeout, deadline, metadata),
        ) as stream:
            await stream.send_message(request, end=True)
            response = await stream.recv_message()
        assert response is not None
        return response

    async def _unary_stream(
        self,
        route: str,
        request: IProtoMessage,
        response_type: type[T],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> AsyncIterator[T]:
        """Make a unary request and return the stream response iterator."""
        async with self.channel.request(
            route,
            grpclib.const.Cardinality.UNARY_STREAM,
            type(request),
            response_type,
            **self.__resolve_request_kwargs(timeout, deadline, metadata),
        ) as stream:
            await stream.send_message(request, end=True)
            async for message in stream:
                yield message

    async def _stream_unary(
        self,
        route: str,
        request_iterator: MessageSource,
        request_type: type[IProtoMessage],
        response_type: type[T],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> T:
        """Make a stream request and return the response."""
        async with self.channel.request(
            route,
            grpclib.const.Cardinality.STREAM_UNARY,
            request_type,
            response_type,
            **self.__resolve_request_kwargs(timeout, deadline, metadata),
        ) as stream:
            await stream.send_request()
            await self._send_messages(stream, request_iterator)
            response = await stream.recv_message()
        assert response is not None
        return response

    async def _stream_stream(
        self,
        route: str,
        request_iterator: MessageSource,
        request_type: type[IProtoMessage],
        response_type: type[T],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> AsyncIterator[T]:
        """
        Make a stream request and return an AsyncIterator to iterate over response
        messages.
        """
        async with self.channel.request(
            route,
            grpclib.const.Cardinality.STREAM_STREAM,
            request_type,
            response_type,
            **self.__resolve_request_kwargs(timeout, deadline, metadata),
        ) as stream:
            await stream.send_request()
            sending_task = asyncio.ensure_future(self._send_messages(stream, request_iterator))
            try:
                async for response in stream:
                    yield response
            except:
                sending_task.cancel()
                raise

    @staticmethod
    async def _send_messages(stream, messages: MessageSource):
        if isinstance(messages, AsyncIterable):
            async for message in messages:
                await stream.send_message(message)
        else:
            for message in messages:
                await stream.send_message(message)
        await stream.end()


class ServiceBase(ABC):  # noqa: B024 (as upstream: a marker base)
    """
    Base class for async gRPC servers.
    """

    async def _call_rpc_handler_server_stream(
        self,
        handler: Callable,
        stream: Stream,
        request: Any,
    ) -> None:
        response_iter = handler(request)
        # check if response is actually an AsyncIterator
        # this might be false if the method just returns without
        # yielding at least once
        # in that case, we just interpret it as an empty iterator
        if isinstance(response_iter, AsyncIterable):
            async for response_message in response_iter:
                await stream.send_message(response_message)
        else:
            response_iter.close()
