"""containerd.services.images.v1.Images: image records, their events, and GC on delete."""

from __future__ import annotations

from grpclib.const import Handler

from pyctr.api import namespaces, pbutil
from pyctr.api._pb.containerd.services.images import v1 as pb
from pyctr.api._pb.containerd.types import Descriptor as PbDescriptor
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.errdefs import InvalidArgument
from pyctr.daemon import plugin
from pyctr.daemon.events import Exchange
from pyctr.daemon.gc.scheduler import Scheduler
from pyctr.daemon.metadata import images as store
from pyctr.daemon.metadata.db import DB
from pyctr.daemon.services import replies

LIST_PATH = "/containerd.services.images.v1.Images/List"


def image_message(img: store.Image) -> pb.Image:
    t = img.target
    return pb.Image(
        name=img.name,
        labels=img.labels,
        target=PbDescriptor(media_type=t.media_type, digest=t.digest, size=t.size, annotations=t.annotations),
        created_at=pbutil.timestamp(img.created_at),
        updated_at=pbutil.timestamp(img.updated_at),
    )


def image_from(msg: pb.Image | None) -> store.Image:
    if msg is None:
        raise InvalidArgument("image must be set")
    t = msg.target or PbDescriptor()
    return store.Image(
        name=msg.name,
        target=store.Descriptor(t.media_type, t.digest, t.size, dict(t.annotations)),
        labels=dict(msg.labels),
    )


class ImagesService(pb.ImagesBase):
    def __init__(self, db: DB, exchange: Exchange, gc: Scheduler | None) -> None:
        self.db = db
        self.exchange = exchange
        self.gc = gc

    async def get(self, message: pb.GetImageRequest) -> pb.GetImageResponse:
        ns = namespaces.required()
        img = await self.db.view(lambda c: store.get(c, ns, message.name))
        return pb.GetImageResponse(image=image_message(img))

    def __mapping__(self) -> dict[str, Handler]:
        """The generated routes, with List answered by bytes encoded from the records (replies.py)."""
        mapping = super().__mapping__()
        replies.list_route(mapping, LIST_PATH, lambda: self.db, store.list_images, replies.image)
        return mapping

    async def list(self, message: pb.ListImagesRequest) -> pb.ListImagesResponse:
        ns = namespaces.required()
        imgs = await self.db.view(lambda c: store.list_images(c, ns, message.filters))
        return pb.ListImagesResponse(images=[image_message(i) for i in imgs])

    async def create(self, message: pb.CreateImageRequest) -> pb.CreateImageResponse:
        ns = namespaces.required()
        img = image_from(message.image)
        created = await self.db.update(lambda c: store.create(c, ns, img))
        self.exchange.publish(ns, "/images/create", pb.ImageCreate(name=created.name, labels=created.labels))
        return pb.CreateImageResponse(image=image_message(created))

    async def update(self, message: pb.UpdateImageRequest) -> pb.UpdateImageResponse:
        ns = namespaces.required()
        img = image_from(message.image)
        paths = list(message.update_mask.paths) if message.update_mask else []
        updated = await self.db.update(lambda c: store.update(c, ns, img, paths))
        self.exchange.publish(ns, "/images/update", pb.ImageUpdate(name=updated.name, labels=updated.labels))
        if self.gc is not None:
            self.gc.mutated()
        return pb.UpdateImageResponse(image=image_message(updated))

    async def delete(self, message: pb.DeleteImageRequest) -> Empty:
        ns = namespaces.required()
        await self.db.update(lambda c: store.delete(c, ns, message.name))
        self.exchange.publish(ns, "/images/delete", pb.ImageDelete(name=message.name))
        if self.gc is not None:
            if message.sync:
                await self.gc.collect_now()
            else:
                self.gc.deleted()
        return Empty()


def service(ic: plugin.InitContext) -> ImagesService:
    try:
        gc = ic.get(plugin.GC)
    except plugin.PluginNotFound:
        gc = None
    return ImagesService(ic.get(plugin.METADATA), ic.get(plugin.EVENT), gc)
