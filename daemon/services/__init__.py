"""The gRPC services, one module per containerd service, each loaded by the service's first call.

Every module here is the thin RPC layer of one service and offers ``service(ic)``, which builds it
from the plugins it uses. Its plugin registration is made by :func:`registration` (listed in
``daemon/builtins.py``): the plugin initialises at start-up like any other, checking the plugins the
service needs, but the module and its generated messages are imported only when the first call
for the service arrives (``daemon.server.LazyService``). Most of start-up was these imports.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pyctr.daemon import plugin
from pyctr.daemon.server import LazyService

if TYPE_CHECKING:
    from pyctr.daemon.transfer.streams import StreamManager


# GRPC plugin id -> (service name, module), as declared; tests check each against its module.
DECLARED: dict[str, tuple[str, str]] = {}


def registration(
    id: str,
    name: str,
    module: str,
    requires: tuple[str, ...] = (),
    needs: tuple[str, ...] | None = None,
    config: Mapping[str, Any] | None = None,
) -> plugin.Registration:
    """A GRPC plugin ``id`` serving ``name`` with ``pyctr.daemon.services.<module>``.

    ``needs`` are the plugin types whose failure fails this plugin at start-up (default: all of
    ``requires``; a service that does without one, such as GC, leaves it out), as an eager init
    that looked them up would.
    """
    path = f"{__name__}.{module}"
    DECLARED[id] = (name, module)

    async def init(ic: plugin.InitContext) -> LazyService:
        for type_ in requires if needs is None else needs:
            ic.get(type_)
        return LazyService((name,), lambda: importlib.import_module(path).service(ic))

    return plugin.Registration(
        type=plugin.GRPC, id=id, init=init, requires=requires, config=dict(config or {})
    )


def import_in_background(ids: Iterable[str], extra: Iterable[str] = ()) -> threading.Thread:
    """Imports the modules of the declared services ``ids`` (GRPC plugin ids) on a thread.

    Started before the plugins initialise: their start-up mostly waits for disk and subprocesses
    (sqlite, the overlay check, the snapshotters), and the imports fill those waits, so the first
    calls find their code loaded without the socket serving any later. Only imports happen on the
    thread; each service is still built on the loop by its first call.
    """
    modules = [f"{__name__}.{DECLARED[id][1]}" for id in ids if id in DECLARED]
    modules += extra

    def work() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # the service's first call reports the same error
                continue

    thread = threading.Thread(target=work, name="service-imports", daemon=True)
    thread.start()
    return thread


class Streams:
    """containerd's io.containerd.internal.v1.streaming: the side streams the Streaming service
    opens and the Transfer service reads. Its manager (and the transfer message code it imports)
    is created when one of the two services first needs it."""

    @functools.cached_property
    def manager(self) -> StreamManager:
        from pyctr.daemon.transfer.streams import StreamManager

        return StreamManager()


async def _init_streams(ic: plugin.InitContext) -> Streams:
    return Streams()


STREAMS_REGISTRATION = plugin.Registration(type=plugin.INTERNAL, id="streaming", init=_init_streams)
