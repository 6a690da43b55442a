"""containerd.services.containers.v1.Containers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.events import (
    ContainerCreate,
    ContainerCreateRuntime,
    ContainerDelete,
    ContainerUpdate,
)
from pyctr.api._pb.containerd.services.containers import v1 as pb
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon import plugin
from pyctr.daemon.events import Exchange
from pyctr.daemon.gc.scheduler import Scheduler
from pyctr.daemon.metadata import containers as store
from pyctr.daemon.metadata.db import DB


def _any(value: store.AnyValue | None) -> PbAny | None:
    return None if value is None else PbAny(type_url=value[0], value=value[1])


def _value(msg: PbAny | None) -> store.AnyValue | None:
    return None if msg is None else (msg.type_url, msg.value)


def container_message(c: store.Container) -> pb.Container:
    return pb.Container(
        id=c.id,
        labels=c.labels,
        image=c.image,
        runtime=pb.ContainerRuntime(name=c.runtime_name, options=_any(c.runtime_options)),
        spec=_any(c.spec),
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        created_at=pbutil.timestamp(c.created_at),
        updated_at=pbutil.timestamp(c.updated_at),
        extensions={k: PbAny(type_url=t, value=v) for k, (t, v) in c.extensions.items()},
        sandbox=c.sandbox,
    )


def container_from(msg: pb.Container | None) -> store.Container:
    if msg is None:
        raise InvalidArgument("container must be set")
    runtime = msg.runtime or pb.ContainerRuntime()
    return store.Container(
        id=msg.id,
        runtime_name=runtime.name,
        runtime_options=_value(runtime.options),
        spec=_value(msg.spec),
        labels=dict(msg.labels),
        image=msg.image,
        snapshotter=msg.snapshotter,
        snapshot_key=msg.snapshot_key,
        extensions={k: (v.type_url, v.value) for k, v in msg.extensions.items()},
        sandbox=msg.sandbox,
    )


class ContainersService(pb.ContainersBase):
    def __init__(self, db: DB, exchange: Exchange, gc: Scheduler | None) -> None:
        self.db = db
        self.exchange = exchange
        self.gc = gc

    async def get(self, message: pb.GetContainerRequest) -> pb.GetContainerResponse:
        ns = namespaces.required()
        c = await self.db.view(lambda conn: store.get(conn, ns, message.id))
        return pb.GetContainerResponse(container=container_message(c))

    async def list(self, message: pb.ListContainersRequest) -> pb.ListContainersResponse:
        ns = namespaces.required()
        found = await self.db.view(lambda conn: store.list_containers(conn, ns, message.filters))
        return pb.ListContainersResponse(containers=[container_message(c) for c in found])

    async def list_stream(self, message: pb.ListContainersRequest) -> AsyncIterator[pb.ListContainerMessage]:
        ns = namespaces.required()
        found = await self.db.view(lambda conn: store.list_containers(conn, ns, message.filters))
        for c in found:
            yield pb.ListContainerMessage(container=container_message(c))

    async def create(self, message: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        ns = namespaces.required()
        c = container_from(message.container)
        created = await self.db.update(lambda conn: store.create(conn, ns, c))
        self.exchange.publish(
            ns,
            "/containers/create",
            ContainerCreate(
                id=created.id,
                image=created.image,
                runtime=ContainerCreateRuntime(
                    name=created.runtime_name, options=_any(created.runtime_options)
                ),
            ),
        )
        return pb.CreateContainerResponse(container=container_message(created))

    async def update(self, message: pb.UpdateContainerRequest) -> pb.UpdateContainerResponse:
        ns = namespaces.required()
        c = container_from(message.container)
        paths = list(message.update_mask.paths) if message.update_mask else []
        updated = await self.db.update(lambda conn: store.update(conn, ns, c, paths))
        self.exchange.publish(
            ns,
            "/containers/update",
            ContainerUpdate(
                id=updated.id, image=updated.image, labels=updated.labels, snapshot_key=updated.snapshot_key
            ),
        )
        if self.gc is not None:
            self.gc.mutated()
        return pb.UpdateContainerResponse(container=container_message(updated))

    async def delete(self, message: pb.DeleteContainerRequest) -> Empty:
        ns = namespaces.required()
        await self.db.update(lambda conn: store.delete(conn, ns, message.id))
        self.exchange.publish(ns, "/containers/delete", ContainerDelete(id=message.id))
        if self.gc is not None:
            self.gc.deleted()
        return Empty()


def service(ic: plugin.InitContext) -> ContainersService:
    try:
        gc = ic.get(plugin.GC)
    except plugin.PluginNotFound:
        gc = None
    return ContainersService(ic.get(plugin.METADATA), ic.get(plugin.EVENT), gc)
