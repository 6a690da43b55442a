"""containerd.services.snapshots.v1.Snapshots, over every loaded snapshotter."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.events import SnapshotCommit, SnapshotPrepare, SnapshotRemove
from pyctr.api._pb.containerd.services.snapshots import v1 as pb
from pyctr.api._pb.containerd.types import Mount as PbMount
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.api.mount import Mount
from pyctr.daemon import plugin
from pyctr.daemon.events import Exchange
from pyctr.daemon.snapshots.plugin import Snapshotters
from pyctr.daemon.snapshots.store import SnapshotStore
from pyctr.snapshotter.base import Info, Kind

LIST_BATCH = 100


def mount_messages(mounts: list[Mount]) -> list[PbMount]:
    return [PbMount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def info_message(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=pb.Kind(int(info.kind)),
        created_at=pbutil.timestamp(info.created_at),
        updated_at=pbutil.timestamp(info.updated_at),
        labels=info.labels,
    )


class SnapshotsService(pb.SnapshotsBase):
    def __init__(self, stores: Snapshotters, exchange: Exchange) -> None:
        self.stores = stores
        self.exchange = exchange

    def _store(self, name: str) -> SnapshotStore:
        if not name:
            raise InvalidArgument("snapshotter argument missing")
        store = self.stores.get(name)
        if store is None:
            raise InvalidArgument(f"snapshotter not loaded: {name}")
        return store

    async def prepare(self, message: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:
        ns = namespaces.required()
        store = self._store(message.snapshotter)
        mounts = await store.prepare(
            ns, message.key, message.parent, dict(message.labels), namespaces.lease.get()
        )
        self.exchange.publish(
            ns,
            "/snapshot/prepare",
            SnapshotPrepare(key=message.key, parent=message.parent, snapshotter=message.snapshotter),
        )
        return pb.PrepareSnapshotResponse(mounts=mount_messages(mounts))

    async def view(self, message: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:
        ns = namespaces.required()
        store = self._store(message.snapshotter)
        mounts = await store.view(
            ns, message.key, message.parent, dict(message.labels), namespaces.lease.get()
        )
        return pb.ViewSnapshotResponse(mounts=mount_messages(mounts))

    async def mounts(self, message: pb.MountsRequest) -> pb.MountsResponse:
        ns = namespaces.required()
        mounts = await self._store(message.snapshotter).mounts(ns, message.key)
        return pb.MountsResponse(mounts=mount_messages(mounts))

    async def commit(self, message: pb.CommitSnapshotRequest) -> Empty:
        ns = namespaces.required()
        store = self._store(message.snapshotter)
        await store.commit(ns, message.name, message.key, dict(message.labels), namespaces.lease.get())
        self.exchange.publish(
            ns,
            "/snapshot/commit",
            SnapshotCommit(key=message.key, name=message.name, snapshotter=message.snapshotter),
        )
        return Empty()

    async def remove(self, message: pb.RemoveSnapshotRequest) -> Empty:
        ns = namespaces.required()
        await self._store(message.snapshotter).remove(ns, message.key)
        self.exchange.publish(
            ns, "/snapshot/remove", SnapshotRemove(key=message.key, snapshotter=message.snapshotter)
        )
        return Empty()

    async def stat(self, message: pb.StatSnapshotRequest) -> pb.StatSnapshotResponse:
        ns = namespaces.required()
        info = await self._store(message.snapshotter).stat(ns, message.key)
        return pb.StatSnapshotResponse(info=info_message(info))

    async def update(self, message: pb.UpdateSnapshotRequest) -> pb.UpdateSnapshotResponse:
        ns = namespaces.required()
        if message.info is None:
            raise InvalidArgument("info must be set")
        paths = list(message.update_mask.paths) if message.update_mask else []
        info = Info(name=message.info.name, parent="", kind=Kind.UNKNOWN, labels=dict(message.info.labels))
        updated = await self._store(message.snapshotter).update(ns, info, paths)
        return pb.UpdateSnapshotResponse(info=info_message(updated))

    async def list(self, message: pb.ListSnapshotsRequest) -> AsyncIterator[pb.ListSnapshotsResponse]:
        ns = namespaces.required()
        infos = await self._store(message.snapshotter).walk(ns, message.filters)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_message(x) for x in infos[i : i + LIST_BATCH]])

    async def usage(self, message: pb.UsageRequest) -> pb.UsageResponse:
        ns = namespaces.required()
        u = await self._store(message.snapshotter).usage(ns, message.key)
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    async def cleanup(self, message: pb.CleanupRequest) -> Empty:
        await self._store(message.snapshotter).cleanup()
        return Empty()


def service(ic: plugin.InitContext) -> SnapshotsService:
    return SnapshotsService(ic.get_by_id(plugin.SERVICE, "snapshots-service"), ic.get(plugin.EVENT))
