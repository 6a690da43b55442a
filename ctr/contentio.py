"""Reading and writing one blob through the Content service, for the commands that need it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator
from typing import BinaryIO

from pyctr.api._pb.containerd.services.content.v1 import ReadContentRequest, WriteAction, WriteContentRequest
from pyctr.api.errdefs import AlreadyExists
from pyctr.ctr.client import Client, rpc

CHUNK = 1 << 20  # bytes per Content.Write message


async def read_blob(client: Client, digest: str) -> bytes:
    return b"".join([resp.data async for resp in client.content.read(ReadContentRequest(digest=digest))])


async def write_requests(
    ref: str, src: BinaryIO, total: int, expected: str, labels: dict[str, str], start: int = 0
) -> AsyncIterator[WriteContentRequest]:
    """The Content.Write stream for ``src`` from offset ``start``: stat, the data in CHUNK-sized
    writes, commit."""
    loop = asyncio.get_running_loop()
    yield WriteContentRequest(action=WriteAction.STAT, ref=ref, total=total, expected=expected)
    offset = start
    while True:
        data = await loop.run_in_executor(None, src.read, CHUNK)
        if not data:
            break
        yield WriteContentRequest(action=WriteAction.WRITE, ref=ref, offset=offset, data=data)
        offset += len(data)
    yield WriteContentRequest(
        action=WriteAction.COMMIT, ref=ref, offset=offset, total=total, expected=expected, labels=labels
    )


async def write_blob(client: Client, ref: str, data: bytes, labels: dict[str, str]) -> str:
    """Writes ``data`` into the namespace's content (already there is fine); returns its digest."""
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"

    async def write() -> None:
        async for _ in client.content.write(write_requests(ref, io.BytesIO(data), len(data), digest, labels)):
            pass

    with contextlib.suppress(AlreadyExists):
        await rpc(client, write())
    return digest
