"""When to collect: soon after deletions (debounced), and on demand for ``sync`` deletes.

Mirrors containerd's ``io.containerd.gc.v1.scheduler``: a deletion schedules a collection after
``schedule_delay``; many deletions in that window share one run; mutations count towards
``mutation_threshold``. One collection clears what a crash left: pyctrd runs it while starting,
after every plugin is loaded and before the socket accepts calls (:meth:`collect_at_startup`), so
it never races a client's first writes; ``startup_delay`` only applies when nobody did.
"""

from __future__ import annotations

import asyncio
import contextlib

from pyctr.api.log import get_logger
from pyctr.daemon.gc.collector import Collector, Stats

log = get_logger("pyctrd.gc")


def _seconds(value: object) -> float:
    """A Go duration (``100ms``, ``1s``, ``0s``) or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)] or 0) * scale
    return float(text or 0)


DEFAULTS: dict[str, object] = {
    "pause_threshold": 0.02,
    "deletion_threshold": 0,
    "mutation_threshold": 100,
    "schedule_delay": "0s",
    "startup_delay": "100ms",
}


class Scheduler:
    def __init__(self, collector: Collector, config: dict[str, object] | None = None) -> None:
        cfg = dict(DEFAULTS)
        cfg.update(config or {})
        self.collector = collector
        self.schedule_delay = _seconds(cfg["schedule_delay"])
        self.startup_delay = _seconds(cfg["startup_delay"])
        self.deletion_threshold = int(cfg["deletion_threshold"])  # type: ignore[call-overload]
        self.mutation_threshold = int(cfg["mutation_threshold"])  # type: ignore[call-overload]
        self._deletions = 0
        self._mutations = 0
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[Stats]] = []
        self._task: asyncio.Task[None] | None = None
        self.last: Stats | None = None
        self.runs = 0
        self._started = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def deleted(self) -> None:
        self._deletions += 1
        if self._deletions > self.deletion_threshold:
            self._wake.set()

    def mutated(self) -> None:
        self._mutations += 1
        if self._mutations > self.mutation_threshold:
            self._wake.set()

    async def collect_now(self) -> Stats:
        """Run a collection that starts after this call, and return its result."""
        fut: asyncio.Future[Stats] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        if self._task is None:  # not started (tests build components by hand)
            await self._run_once()
        return await fut

    async def _run_once(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._deletions = self._mutations = 0
        try:
            stats = await self.collector.collect()
        except Exception as exc:
            log.error("garbage collection failed", error=str(exc))
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
            return
        self.last = stats
        self.runs += 1
        for w in waiters:
            if not w.done():
                w.set_result(stats)

    async def collect_at_startup(self) -> None:
        """The first collection, run before the daemon serves; the loop then skips its own."""
        await self._run_once()
        self._started = True

    async def _loop(self) -> None:
        await asyncio.sleep(self.startup_delay)
        if not self._started:
            await self._run_once()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiters and self.schedule_delay:
                await asyncio.sleep(self.schedule_delay)
            await self._run_once()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
