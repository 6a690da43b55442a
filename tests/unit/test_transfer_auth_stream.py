"""The daemon's side of the auth stream (pyctr.daemon.transfer.streams.AuthCallback).

The client is played by a task answering on a real SideStream: what the daemon sends comes
out of ``outgoing()``, what the client answers goes into ``incoming`` as the Streaming service
puts it there.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable

import pytest

from pyctr.api import typeurl
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.errdefs import DeadlineExceeded
from pyctr.daemon.remotes.auth import Credentials
from pyctr.daemon.transfer.streams import AuthCallback, SideStream


def pack(msg: object) -> PbAny:
    url, value = typeurl.marshal(msg)  # type: ignore[arg-type]
    return PbAny(type_url=url, value=value)


def client(
    side: SideStream, answer: Callable[[tt.AuthRequest], tt.AuthResponse | None]
) -> asyncio.Task[list[str]]:
    """Answers every AuthRequest with ``answer(request)`` (None: end the stream); returns the hosts asked."""

    async def run() -> list[str]:
        asked = []
        async for msg in side.outgoing():
            req = typeurl.unmarshal(msg.type_url, msg.value)
            assert isinstance(req, tt.AuthRequest)
            asked.append(req.host)
            resp = answer(req)
            if resp is None:
                side.incoming.put_nowait(None)
                continue
            side.incoming.put_nowait(pack(tt.WindowUpdate(update=1)))  # unrelated: ignored
            side.incoming.put_nowait(pack(resp))
        return asked

    return asyncio.ensure_future(run())


def test_answers_by_type_and_remembered_per_host() -> None:
    async def main() -> None:
        side = SideStream("auth-1")
        answers = {
            "creds.example": tt.AuthResponse(auth_type=tt.AuthType.CREDENTIALS, username="u", secret="pw"),
            "refresh.example": tt.AuthResponse(auth_type=tt.AuthType.REFRESH, secret="tok"),
            "header.example": tt.AuthResponse(auth_type=tt.AuthType.HEADER, secret="Basic eDp5"),
            "none.example": tt.AuthResponse(auth_type=tt.AuthType.NONE),
        }
        task = client(side, lambda r: answers[r.host])
        cb = AuthCallback(side, "creds.example/a/b:c")
        for _ in range(2):  # the second round comes from what the first one learnt
            assert await cb("creds.example") == Credentials("u", "pw")
            assert await cb("refresh.example") == Credentials("", "tok")
            assert await cb("header.example") == Credentials("", "", header="Basic eDp5")
            assert await cb("none.example") is None
        side.close()
        assert await task == list(answers)
        assert "pw" not in repr(Credentials("u", "pw")) and "eDp5" not in repr(await cb("header.example"))

    asyncio.run(main())


def test_expired_answers_are_asked_again_and_questions_queue() -> None:
    async def main() -> None:
        side = SideStream("auth-2")
        past = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
        task = client(
            side,
            lambda r: tt.AuthResponse(
                auth_type=tt.AuthType.CREDENTIALS, username="u", secret="s", expire_at=past
            ),
        )
        cb = AuthCallback(side, "r")
        results = await asyncio.gather(cb("a.example"), cb("a.example"), cb("b.example"))
        assert results == [Credentials("u", "s")] * 3
        side.close()
        assert await task == ["a.example", "a.example", "b.example"]

    asyncio.run(main())


def test_client_that_ends_the_stream_or_never_answers() -> None:
    async def main() -> None:
        side = SideStream("auth-3")
        task = client(side, lambda r: None)
        cb = AuthCallback(side, "r")
        assert await cb("a.example") is None
        assert await cb("b.example") is None  # not asked: the client has nothing more to say
        side.close()
        assert await task == ["a.example"]

        silent = SideStream("auth-4")
        with pytest.raises(DeadlineExceeded, match=r"no answer about a\.example"):
            await AuthCallback(silent, "r", timeout=0.2)("a.example")

    asyncio.run(main())
