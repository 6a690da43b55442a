"""The ``io.containerd.differ.v1.walking`` plugin."""

from __future__ import annotations

from pyctr.daemon import plugin
from pyctr.daemon.diff.differ import Differ


async def _init(ic: plugin.InitContext) -> Differ:
    ic.set_platform()
    return Differ(ic.get(plugin.CONTENT))


REGISTRATION = plugin.Registration(type=plugin.DIFF, id="walking", init=_init, requires=(plugin.CONTENT,))
