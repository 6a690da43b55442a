"""The metadata plugin: the sqlite database under ``<root>/io.containerd.metadata.v1.sqlite``."""

from __future__ import annotations

import os

from pyctr.daemon import plugin
from pyctr.daemon.metadata.db import DB


async def _init(ic: plugin.InitContext) -> DB:
    path = os.path.join(ic.root, "meta.db")
    ic.exports["path"] = path
    return await DB.open(path)


REGISTRATION = plugin.Registration(type=plugin.METADATA, id="sqlite", init=_init)
