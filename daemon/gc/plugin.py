"""The ``io.containerd.gc.v1.scheduler`` plugin: one collector over the metadata and content."""

from __future__ import annotations

from pyctr.daemon import plugin
from pyctr.daemon.content.store import ContentStore
from pyctr.daemon.gc.collector import Collector
from pyctr.daemon.gc.scheduler import DEFAULTS, Scheduler


async def _init(ic: plugin.InitContext) -> Scheduler:
    content: ContentStore = ic.get(plugin.CONTENT)
    db = ic.get(plugin.METADATA)
    collector = Collector(db, content.local, db.gc_lock)
    scheduler = Scheduler(collector, ic.plugin_config)
    content.on_delete = lambda ns, dgst: scheduler.deleted()
    scheduler.start()
    return scheduler


REGISTRATION = plugin.Registration(
    type=plugin.GC, id="scheduler", init=_init, requires=(plugin.METADATA, plugin.CONTENT), config=DEFAULTS
)
