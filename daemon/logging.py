"""structlog set-up: JSON lines unless stderr is a terminal, levels as containerd names them.

structlog itself is configured (and imported) when the daemon writes its first line; see
:mod:`pyctr.api.log`.
"""

from __future__ import annotations

import logging
import sys

from pyctr.api import log as logapi

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


def configure(level: str = "info", fmt: str = "") -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    if not fmt:
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in ("json", "console", "text"):
        raise ValueError(f"unknown log format {fmt!r}: use json or console")

    def setup() -> None:
        import structlog

        renderer: structlog.typing.Processor
        if fmt == "json":
            renderer = structlog.processors.JSONRenderer()
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )

    logapi.set_level(LEVELS[level], setup)
    # grpclib and asyncio log through the standard library; keep them at the same level.
    logging.basicConfig(
        level=max(LEVELS[level], logging.INFO), stream=sys.stderr, format="%(name)s: %(message)s"
    )
