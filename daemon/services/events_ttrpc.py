"""The ttrpc ``containerd.services.events.ttrpc.v1.Events/Forward`` through which shims report.

Served from start-up (a shim that outlived a restart reports to the new daemon at once); the
message code is imported by the first forwarded event.
"""

from __future__ import annotations

from pyctr.api.ttrpc import Context, Server
from pyctr.daemon import plugin
from pyctr.daemon.events import Exchange

TTRPC_SERVICE = "containerd.services.events.ttrpc.v1.Events"


class ForwardService:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def register_ttrpc(self, server: Server) -> None:
        async def forward(payload: bytes, ctx: Context) -> bytes:
            from pyctr.api._pb.containerd.services.events.ttrpc import v1 as ttrpc_pb
            from pyctr.daemon.services.events import envelope

            req = ttrpc_pb.ForwardRequest.parse(payload)
            self.exchange.forward(envelope(req.envelope))
            return b""

        server.register(TTRPC_SERVICE, {"Forward": forward})


async def _init(ic: plugin.InitContext) -> ForwardService:
    return ForwardService(ic.get(plugin.EVENT))


REGISTRATION = plugin.Registration(type=plugin.TTRPC, id="events", init=_init, requires=(plugin.EVENT,))
