"""Loggers that load structlog only when they first write a line.

Importing structlog costs about 20 ms on a 2-core machine (its package imports every submodule:
the console renderer, the testing helpers, uuid and platform through threadlocal). That was a
tenth of a restart. A :class:`Logger` drops a call below the configured level with one comparison
and hands the others to a structlog logger of the same name, imported and configured on the
first line written. A daemon at ``warn`` therefore starts without structlog at all.

Until :func:`set_level` is called (unit tests, tools), every call goes to structlog with its own
defaults, exactly as ``structlog.get_logger(name)`` would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# The standard library's numbers, which structlog's filtering loggers also use.
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

_threshold = 0
_setup: Callable[[], None] | None = None
_lock = threading.Lock()
_ready = False


def set_level(level: int, setup: Callable[[], None] | None = None) -> None:
    """Drop calls below ``level``; ``setup`` configures structlog before the first line."""
    global _threshold, _setup, _ready
    with _lock:
        _threshold = level
        _setup = setup
        _ready = False


def _structlog_logger(name: str) -> Any:
    global _ready
    with _lock:
        if not _ready:
            if _setup is not None:
                _setup()
            _ready = True
    import structlog

    return structlog.get_logger(name)


class Logger:
    """The subset of structlog's bound logger the daemon uses: one method per level."""

    __slots__ = ("_bound", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._bound: Any = None

    def _emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        bound = self._bound
        if bound is None or not _ready:
            bound = self._bound = _structlog_logger(self.name)
        getattr(bound, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        if _threshold <= DEBUG:
            self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if _threshold <= INFO:
            self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        if _threshold <= WARNING:
            self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        if _threshold <= ERROR:
            self._emit("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """An error with the exception being handled (call it from an ``except`` block)."""
        if _threshold <= ERROR:
            kw.setdefault("exc_info", True)
            self._emit("error", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)
