"""Type URLs for ``google.protobuf.Any``, as containerd's typeurl package writes them.

containerd 1.6 uses the bare full proto name (``containerd.events.TaskExit``) and cannot decode the
``type.googleapis.com/`` form; 1.7 reads both. We always write the bare name and read both. The
generated code's message pool knows every generated message under the prefixed URL.
"""

from __future__ import annotations

import importlib
from typing import Any

from betterproto2 import Message

_PREFIX = "type.googleapis.com/"


_loaded = False


def _pool() -> Any:
    """The generated code's message pool, with every generated module imported once."""
    global _loaded
    from pyctr.api import _pb
    from pyctr.api._pb.message_pool import default_message_pool

    if not _loaded:
        import pkgutil  # here: only the first lookup of an unknown type needs it

        for mod in pkgutil.walk_packages(_pb.__path__, _pb.__name__ + "."):
            importlib.import_module(mod.name)
        _loaded = True
    return default_message_pool


def type_url(message: Message | type[Message]) -> str:
    from pyctr.api._pb.message_pool import default_message_pool

    cls = message if isinstance(message, type) else type(message)
    # A generated class registered itself when its module ran: no need to import all the others.
    url = default_message_pool.type_to_url.get(cls) or _pool().type_to_url.get(cls)
    if url is None:
        raise KeyError(f"{cls.__qualname__} is not a registered protobuf message")
    return str(url).removeprefix(_PREFIX)


def marshal(message: Message) -> tuple[str, bytes]:
    """The (type_url, value) pair of an Any holding ``message``."""
    return type_url(message), bytes(message)


def lookup(url: str) -> type[Message] | None:
    from pyctr.api._pb.message_pool import default_message_pool

    key = _PREFIX + url.removeprefix(_PREFIX)
    # Usually the type's module is loaded already; only an unknown URL makes us import them all.
    cls: type[Message] | None = default_message_pool.url_to_type.get(key) or _pool().url_to_type.get(key)
    return cls


def unmarshal(url: str, value: bytes) -> Message:
    cls = lookup(url)
    if cls is None:
        raise KeyError(f"type with url {url}: not found")
    return cls.parse(value)
