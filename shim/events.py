"""Task events: the type URL a worker puts on each event it reports (the keeper's Publisher sends them
to the daemon, see keeper.py)."""

from __future__ import annotations

import betterproto2

from pyctr.api._pb.message_pool import default_message_pool


def type_url(message: betterproto2.Message) -> str:
    """The bare type URL containerd 1.6 expects (``containerd.events.TaskExit``)."""
    # The generated module registered the class on import; no need to load every other module.
    url = default_message_pool.type_to_url[type(message)]
    return str(url).removeprefix("type.googleapis.com/")
