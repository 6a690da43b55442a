"""The ``io.containerd.content.v1.content`` plugin: the namespaced store over the local blobs."""

from __future__ import annotations

from pyctr.daemon import plugin
from pyctr.daemon.content.local import LocalStore
from pyctr.daemon.content.store import ContentStore


async def _init(ic: plugin.InitContext) -> ContentStore:
    ic.exports["root"] = ic.root
    return ContentStore(ic.get(plugin.METADATA), LocalStore(ic.root))


REGISTRATION = plugin.Registration(type=plugin.CONTENT, id="content", init=_init, requires=(plugin.METADATA,))
