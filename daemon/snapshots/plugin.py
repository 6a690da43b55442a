"""Snapshotter plugins (overlayfs, native) and the namespaced snapshot service over them."""

from __future__ import annotations

import asyncio

from pyctr.daemon import plugin
from pyctr.daemon.gc.scheduler import Scheduler
from pyctr.daemon.snapshots.store import SnapshotStore
from pyctr.snapshotter import native, overlay


async def _init_overlay(ic: plugin.InitContext) -> overlay.OverlaySnapshotter:
    import os

    os.makedirs(ic.root, mode=0o700, exist_ok=True)
    try:
        await asyncio.to_thread(overlay.check_supported, ic.root)
    except Exception as exc:
        raise plugin.SkipPlugin(str(exc)) from exc
    ic.exports["root"] = ic.root
    ic.set_platform()
    sn = await overlay.OverlaySnapshotter.create(ic.root)
    assert isinstance(sn, overlay.OverlaySnapshotter)
    return sn


async def _init_native(ic: plugin.InitContext) -> native.NativeSnapshotter:
    ic.exports["root"] = ic.root
    ic.set_platform()
    sn = await native.NativeSnapshotter.create(ic.root)
    assert isinstance(sn, native.NativeSnapshotter)
    return sn


OVERLAY_REGISTRATION = plugin.Registration(type=plugin.SNAPSHOT, id=overlay.PLUGIN_ID, init=_init_overlay)
NATIVE_REGISTRATION = plugin.Registration(type=plugin.SNAPSHOT, id=native.PLUGIN_ID, init=_init_native)


class Snapshotters(dict[str, SnapshotStore]):
    """Every loaded snapshotter, by name, wrapped for namespaces.

    No ``close``: the backends belong to their own plugins, which the registry closes after this
    service (closing them here too made every shutdown log "failed to close plugin").
    """


async def _init_service(ic: plugin.InitContext) -> Snapshotters:
    db = ic.get(plugin.METADATA)
    gc: Scheduler = ic.get(plugin.GC)
    stores = Snapshotters()
    for name, backend in ic.get_all(plugin.SNAPSHOT).items():
        store = SnapshotStore(name, backend, db)
        store.on_delete = lambda ns, key: gc.deleted()
        gc.collector.backend_sweeps[f"snapshotter {name}"] = store.sweep_backend
        stores[name] = store
    return stores


SERVICE_REGISTRATION = plugin.Registration(
    type=plugin.SERVICE,
    id="snapshots-service",
    init=_init_service,
    requires=(plugin.METADATA, plugin.GC, plugin.SNAPSHOT),
)
