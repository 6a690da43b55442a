"""containerd.services.diff.v1.Diff: apply layers onto mounts, and write diffs into content."""

from __future__ import annotations

from pyctr.api import namespaces
from pyctr.api._pb.containerd.services.diff import v1 as pb
from pyctr.api._pb.containerd.types import Descriptor as PbDescriptor
from pyctr.api._pb.containerd.types import Mount as PbMount
from pyctr.api.errdefs import InvalidArgument
from pyctr.api.mount import Mount
from pyctr.daemon import plugin
from pyctr.daemon.diff.differ import Descriptor, Differ


def mounts_from(msgs: list[PbMount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, target=m.target, options=tuple(m.options)) for m in msgs]


def descriptor_message(d: Descriptor) -> PbDescriptor:
    return PbDescriptor(media_type=d.media_type, digest=d.digest, size=d.size, annotations=d.annotations)


class DiffService(pb.DiffBase):
    def __init__(self, differ: Differ) -> None:
        self.differ = differ

    async def apply(self, message: pb.ApplyRequest) -> pb.ApplyResponse:
        ns = namespaces.required()
        if message.diff is None:
            raise InvalidArgument("diff descriptor must be set")
        d = message.diff
        desc = Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))
        applied = await self.differ.apply(ns, desc, mounts_from(message.mounts))
        return pb.ApplyResponse(applied=descriptor_message(applied))

    async def diff(self, message: pb.DiffRequest) -> pb.DiffResponse:
        ns = namespaces.required()
        made = await self.differ.diff(
            ns,
            mounts_from(message.left),
            mounts_from(message.right),
            message.media_type,
            dict(message.labels),
            namespaces.lease.get(),
        )
        return pb.DiffResponse(diff=descriptor_message(made))


def service(ic: plugin.InitContext) -> DiffService:
    return DiffService(ic.get(plugin.DIFF))
