"""The daemon object: plugins, the gRPC server on the socket and the ttrpc server beside it."""

from __future__ import annotations

import os
from typing import Any

from pyctr.api import ttrpc
from pyctr.api.log import get_logger
from pyctr.daemon import plugin, sdnotify
from pyctr.daemon.builtins import BUILTINS
from pyctr.daemon.config import Config
from pyctr.daemon.runtime import bundle
from pyctr.daemon.server import GRPCServer, LazyService, SocketInUse, prepare_socket
from pyctr.daemon.services import import_in_background

log = get_logger("pyctrd")


class StartError(RuntimeError):
    pass


# What the diff service's first Apply imports (tarfile, isal, zstandard with it).
LAYER_MODULES = ("pyctr.snapshotter.layer.apply", "pyctr.snapshotter.layer.compression")


class Daemon:
    def __init__(self, config: Config, registrations: list[plugin.Registration] | None = None) -> None:
        self.config = config
        self.registry = plugin.Registry(BUILTINS if registrations is None else registrations, config)
        self.grpc: GRPCServer | None = None
        self.ttrpc: ttrpc.Server | None = None

    async def start(self) -> None:
        cfg = self.config
        # Root is private; state holds sockets other users may be given access to.
        os.makedirs(cfg.root, mode=0o700, exist_ok=True)
        os.makedirs(cfg.state, mode=0o711, exist_ok=True)
        try:
            # Claim the socket before loading plugins, so a second daemon stops before touching state.
            grpc_sock = prepare_socket(cfg.grpc.address, cfg.grpc.uid, cfg.grpc.gid)
            ttrpc_sock = prepare_socket(cfg.ttrpc_address, cfg.ttrpc.uid, cfg.ttrpc.gid)
        except SocketInUse as exc:
            raise StartError(str(exc)) from None
        # A thread imports the service modules and the layer code, which start-up itself does not
        # need, so the first pull or run finds them loaded (see import_in_background). On a fresh
        # start it runs while the plugins initialise. On a restart with tasks to reconnect it waits
        # until the daemon serves: every shim's reply then needs the GIL back from the importing
        # thread (up to a 5 ms switch interval each), which made 50 reconnects take ~75 ms
        # instead of ~27 ms.
        services = [p.registration.id for p in self.registry.plugins if p.registration.type == plugin.GRPC]
        reconnecting = bundle.any_left(os.path.join(cfg.state, bundle.STATE_DIR))
        if not reconnecting:
            import_in_background(services, LAYER_MODULES)
        try:
            await self.registry.init_all()
        except RuntimeError as exc:
            grpc_sock.close()
            ttrpc_sock.close()
            raise StartError(str(exc)) from None

        # The start-up collection runs before the socket serves: it clears what a crash left
        # without racing the first client's (still unreferenced) writes.
        for gc in self.registry.instances(plugin.GC):
            await gc.collect_at_startup()

        handlers: list[Any] = []
        for instance in self.registry.instances(plugin.GRPC):
            handlers.extend(instance if isinstance(instance, list | tuple) else [instance])
        self.grpc = GRPCServer(
            [s for s in handlers if isinstance(s, LazyService) or hasattr(s, "__mapping__")],
            max_recv=cfg.grpc.max_recv_message_size,
            max_send=cfg.grpc.max_send_message_size,
        )
        self.grpc.path = cfg.grpc.address
        await self.grpc.server.start(sock=grpc_sock)

        self.ttrpc = ttrpc.Server()
        for instance in self.registry.instances(plugin.TTRPC):
            instance.register_ttrpc(self.ttrpc)
        await self.ttrpc.serve_socket(ttrpc_sock)
        self._ttrpc_path = cfg.ttrpc_address
        sdnotify.notify("READY=1")
        if reconnecting:
            import_in_background(services, LAYER_MODULES)

    async def stop(self, grace: float = 10.0) -> None:
        sdnotify.notify("STOPPING=1")
        # Long-lived streams end first, so the drain waits only for real work.
        for exchange in self.registry.instances(plugin.EVENT):
            if exchange is not None:  # None when start-up failed before plugins were loaded
                exchange.close()
        if self.ttrpc is not None:
            self.ttrpc.close()
            await self.ttrpc.wait_closed()
            if os.path.lexists(self._ttrpc_path):
                os.unlink(self._ttrpc_path)
        if self.grpc is not None:
            await self.grpc.stop(grace)
        await self.registry.close_all()
