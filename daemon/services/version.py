"""containerd.services.version.v1.Version."""

from __future__ import annotations

from pyctr.api._pb.containerd.services.version.v1 import VersionBase, VersionResponse
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api.version import REVISION, VERSION
from pyctr.daemon import plugin


class VersionService(VersionBase):
    async def version(self, message: Empty) -> VersionResponse:
        return VersionResponse(version=VERSION, revision=REVISION)


def service(ic: plugin.InitContext) -> VersionService:
    return VersionService()
