"""containerd.services.introspection.v1.Introspection: the plugin list and the server's identity."""

from __future__ import annotations

import os
import uuid

from pyctr.api import filters
from pyctr.api._pb.containerd.services.introspection.v1 import (
    IntrospectionBase,
    Plugin,
    PluginsRequest,
    PluginsResponse,
    ServerResponse,
)
from pyctr.api._pb.containerd.types import Platform
from pyctr.api._pb.google.protobuf import Empty
from pyctr.api._pb.google.rpc import Status
from pyctr.api.errdefs import Code
from pyctr.daemon import plugin


def load_uuid(path: str) -> str:
    """The server's uuid, made once and kept under the plugin's root (atomically written)."""
    try:
        with open(path) as f:
            return str(uuid.UUID(f.read().strip()))
    except FileNotFoundError:
        pass
    value = str(uuid.uuid4())
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return value


def plugin_message(p: plugin.Plugin) -> Plugin:
    reg = p.registration
    msg = Plugin(
        type=reg.type,
        id=reg.id,
        requires=list(reg.requires),
        platforms=[Platform(os=o, architecture=a, variant=v) for o, a, v in p.platforms],
        exports=dict(p.exports),
        capabilities=list(p.capabilities),
    )
    if p.error is not None:
        msg.init_err = Status(code=int(Code.UNKNOWN), message=str(p.error))
    return msg


class IntrospectionService(IntrospectionBase):
    def __init__(self, registry: plugin.Registry, server_uuid: str) -> None:
        self.registry = registry
        self.uuid = server_uuid

    async def plugins(self, message: PluginsRequest) -> PluginsResponse:
        flt = filters.parse_all(message.filters)
        out = []
        for p in self.registry.plugins:
            fields = {"type": p.registration.type, "id": p.registration.id}
            if flt.match(filters.DictAdaptor(fields)):
                out.append(plugin_message(p))
        return PluginsResponse(plugins=out)

    async def server(self, message: Empty) -> ServerResponse:
        return ServerResponse(uuid=self.uuid, pid=os.getpid(), pidns=_pidns())


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def service(ic: plugin.InitContext) -> IntrospectionService:
    return IntrospectionService(ic.registry, load_uuid(os.path.join(ic.root, "uuid")))
