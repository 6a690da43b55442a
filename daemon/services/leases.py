"""containerd.services.leases.v1.Leases."""

from __future__ import annotations

from grpclib.const import Handler

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.services.leases import v1 as pb
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon import plugin
from pyctr.daemon.gc.scheduler import Scheduler
from pyctr.daemon.metadata import leases as store
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.services import replies

LIST_PATH = "/containerd.services.leases.v1.Leases/List"


def lease_message(lease: store.Lease) -> pb.Lease:
    return pb.Lease(id=lease.id, created_at=pbutil.timestamp(lease.created_at), labels=lease.labels)


def _resource(r: pb.Resource | None) -> store.Resource:
    if r is None:
        raise InvalidArgument("resource must be set")
    return store.Resource(id=r.id, type=r.type)


class LeasesService(pb.LeasesBase):
    def __init__(self, db: DB, gc: Scheduler | None = None) -> None:
        self.db = db
        self.gc = gc

    async def create(self, message: pb.CreateRequest) -> pb.CreateResponse:
        ns = namespaces.required()
        lease_id = message.id or store.random_id()
        lease = await self.db.update(lambda c: store.create(c, ns, lease_id, dict(message.labels)))
        return pb.CreateResponse(lease=lease_message(lease))

    async def delete(self, message: pb.DeleteRequest) -> Empty:
        ns = namespaces.required()
        await self.db.update(lambda c: store.delete(c, ns, message.id))
        if self.gc is not None:
            if message.sync:
                await self.gc.collect_now()
            else:
                self.gc.deleted()
        return Empty()

    def __mapping__(self) -> dict[str, Handler]:
        """The generated routes, with List answered by bytes encoded from the records (replies.py)."""
        mapping = super().__mapping__()
        replies.list_route(mapping, LIST_PATH, lambda: self.db, store.list_leases, replies.lease)
        return mapping

    async def list(self, message: pb.ListRequest) -> pb.ListResponse:
        ns = namespaces.required()
        found = await self.db.view(lambda c: store.list_leases(c, ns, message.filters))
        return pb.ListResponse(leases=[lease_message(lease) for lease in found])

    async def add_resource(self, message: pb.AddResourceRequest) -> Empty:
        ns = namespaces.required()
        r = _resource(message.resource)
        await self.db.update(lambda c: store.add_resource(c, ns, message.id, r))
        return Empty()

    async def delete_resource(self, message: pb.DeleteResourceRequest) -> Empty:
        ns = namespaces.required()
        r = _resource(message.resource)
        await self.db.update(lambda c: store.delete_resource(c, ns, message.id, r))
        return Empty()

    async def list_resources(self, message: pb.ListResourcesRequest) -> pb.ListResourcesResponse:
        ns = namespaces.required()
        found = await self.db.view(lambda c: store.list_resources(c, ns, message.id))
        return pb.ListResourcesResponse(resources=[pb.Resource(id=r.id, type=r.type) for r in found])


def service(ic: plugin.InitContext) -> LeasesService:
    try:
        gc = ic.get(plugin.GC)
    except plugin.PluginNotFound:
        gc = None  # without a collector nothing is ever reclaimed; sync has nothing to wait for
    return LeasesService(ic.get(plugin.METADATA), gc)
