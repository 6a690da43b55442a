"""Run figures: gate on pyctrd's capabilities, warm up, then alternate A/B/A/B and summarise."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeVar

from bench import clients, proc
from bench.figures import Context, Figure, Metric
from bench.harness import PYCTR, Kind, Side
from bench.stats import Summary, goal_met, ratio

Status = Literal["ok", "skipped", "failed"]
T = TypeVar("T")


@dataclass
class MetricResult:
    metric: Metric
    samples: dict[Kind, list[float]]

    def summary(self, kind: Kind) -> Summary | None:
        values = self.samples.get(kind)
        return Summary.of(values) if values else None

    @property
    def ratio(self) -> float | None:
        return ratio(self.summary("pyctrd"), self.summary("containerd"))

    @property
    def goal_met(self) -> bool | None:
        return goal_met(self.ratio, self.metric.better)


@dataclass
class FigureResult:
    figure: Figure
    status: Status
    reason: str = ""
    metrics: list[MetricResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load: float = 0.0  # 1-minute load average when the figure started: other tenants show up here
    unavailable: dict[Kind, str] = field(default_factory=dict)  # daemons that cannot run the figure


class _Capabilities:
    """Each daemon's answers to the RPC probes (asked once per method and daemon per run), and
    whether the pyctr client has the commands a figure runs."""

    def __init__(self) -> None:
        self._rpc: dict[tuple[str, str], bool] = {}
        self._cli: dict[str, bool] = {}

    def unimplemented(self, fig: Figure, address: str) -> list[str]:
        absent = []
        for r in fig.needs:
            if (address, r.path) not in self._rpc:
                probe = clients.is_unimplemented(address, r.path, r.cardinality, r.probe)
                self._rpc[address, r.path] = clients.run(probe)
            if self._rpc[address, r.path]:
                absent.append(r.short)
        return absent

    def missing_commands(self, fig: Figure) -> str:
        for cmd in fig.needs_pyctr:
            if cmd not in self._cli:
                res = proc.run([PYCTR, *cmd.split(), "--help"], check=False, timeout=60)
                self._cli[cmd] = res.returncode == 0
            if not self._cli[cmd]:
                return f"not implemented yet: the pyctr client has no `{cmd}`"
        return ""


class Runner:
    def __init__(self, ctx: Context, sides: list[Side], runs: int) -> None:
        self.ctx = ctx
        self.sides = sides
        self.runs = runs
        self.caps = _Capabilities()

    def run(self, fig: Figure) -> FigureResult:
        t0, load = time.monotonic(), os.getloadavg()[0]
        # A shared daemon that died in the previous figure would fail this one for no reason of its own.
        revived = [s.kind for s in self.sides if not s.daemon.running and s.daemon.revive()]
        res = self._run(fig)
        res.notes += [
            f"{kind} had exited after the previous figure and was started again" for kind in revived
        ]
        res.seconds, res.load = time.monotonic() - t0, load
        return res

    def _gate(self, fig: Figure) -> tuple[str, list[Side], dict[Kind, str]]:
        """Why the figure is skipped (pyctrd lacks an RPC, pyctr a command), else the daemons to
        measure. containerd lacking an RPC (1.6 predates the Transfer API, say) only drops
        containerd from that figure, with the reason kept for the report."""
        sides, unavailable = [], {}
        for side in self.sides:
            absent = self.caps.unimplemented(fig, side.daemon.address)
            if absent and side.kind == "pyctrd":
                return f"not implemented yet: pyctrd answers UNIMPLEMENTED to {', '.join(absent)}", [], {}
            if absent:
                unavailable[side.kind] = f"{side.kind} answers UNIMPLEMENTED to {', '.join(absent)}"
            else:
                sides.append(side)
        return self.caps.missing_commands(fig), sides, unavailable

    def _run(self, fig: Figure) -> FigureResult:
        host = fig.host_unsupported()
        if host:
            return FigureResult(fig, "skipped", f"this host cannot: {host}")
        reason, sides, unavailable = self._gate(fig)
        if reason:
            return FigureResult(fig, "skipped", reason)
        if not sides:
            return FigureResult(fig, "skipped", "; ".join(unavailable.values()), unavailable=unavailable)
        self.ctx.notes = []
        samples: dict[str, dict[Kind, list[float]]] = {m.key: {} for m in fig.metrics}
        # A daemon that fails drops out of the figure; the other one is still measured, so that the
        # table keeps containerd's reference number next to pyctrd's error.
        failed: dict[Kind, str] = {}
        ready: list[Side] = []

        def attempt(side: Side, step: Callable[[], T]) -> T | None:
            if side.kind in failed:
                return None
            try:
                return step()
            except Exception as exc:
                traceback.print_exc()
                if isinstance(exc, proc.CommandError):
                    print(exc.stderr.strip()[-3000:], file=sys.stderr)
                failed[side.kind] = _one_line(exc)
                return None

        try:
            for name in fig.fixtures:
                self.ctx.fixtures.image(name)
            fig.prepare(self.ctx)
            for side in sides:
                ready.append(side)
                attempt(side, partial(fig.setup, self.ctx, side))
            # The warm-up pays for first-call costs (page cache, connection set-up) on both sides.
            for side in sides:
                attempt(side, partial(fig.measure, self.ctx, side, "w"))
            for i in range(self.runs):
                # A/B/A/B, so a slow drift of the machine (another tenant) hits both daemons alike.
                for side in sides:
                    values = attempt(side, partial(fig.measure, self.ctx, side, str(i)))
                    if values is None:
                        continue
                    for m in fig.metrics:
                        samples[m.key].setdefault(side.kind, []).append(values[m.key])
                    self.ctx.log(f"  {side.kind:<10} #{i}: {_fmt_values(fig, values)}")
        except Exception as exc:  # fixtures or prepare: nothing was measured
            traceback.print_exc()
            return FigureResult(fig, "failed", _one_line(exc), notes=list(self.ctx.notes))
        finally:
            for side in reversed(ready):
                _quietly(fig.teardown, self.ctx, side)
            _quietly(fig.finish, self.ctx)
        metrics = [MetricResult(m, samples[m.key]) for m in fig.metrics]
        if failed:
            reason = "; ".join(f"{kind} failed: {why}" for kind, why in failed.items())
            return FigureResult(fig, "failed", reason, metrics, list(self.ctx.notes), unavailable=unavailable)
        return FigureResult(fig, "ok", metrics=metrics, notes=list(self.ctx.notes), unavailable=unavailable)


def _one_line(exc: Exception, limit: int = 400) -> str:
    """An error as one short line for the report (the full traceback went to the terminal)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_values(fig: Figure, values: dict[str, float]) -> str:
    return ", ".join(f"{m.key}={values[m.key]:.4g} {m.unit}" for m in fig.metrics)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Clean-up steps run even after a failure, and one failing must not hide the first error."""
    try:
        fn(*args)
    except Exception:
        traceback.print_exc()
