"""``python -m bench``: run the side-by-side benchmark, list figures, re-render a report.

python -m bench run            every figure; writes bench/results/<stamp>-full.json, the tables
                               in docs/benchmarks.md and docs/benchmarks.png
python -m bench run --quick    start-up, idle memory, `ctr version`, unary latency (< 2 min);
                               JSON and terminal only, unless --docs
python -m bench run --only unary-latency --daemons containerd   one figure, one daemon
python -m bench list           the registered figures and what each needs
python -m bench report FILE    re-render docs/benchmarks.{md,png} from a results file
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from bench import machine, report
from bench.figures import Context, Figure, all_figures
from bench.fixtures import Fixtures
from bench.harness import KINDS, Kind, Session
from bench.runner import FigureResult, Runner

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
MIN_RUNS = 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="pyctrd vs containerd, side by side")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure (root: mounts a loop filesystem, starts both daemons)")
    r.add_argument("--quick", action="store_true", help="only the quick subset (make bench-quick)")
    r.add_argument("--runs", type=int, default=MIN_RUNS, help=f"measured runs per daemon (>= {MIN_RUNS})")
    r.add_argument("--only", nargs="+", metavar="ID", help="run these figures only")
    r.add_argument(
        "--daemons",
        default=",".join(KINDS),
        help="comma-separated subset of pyctrd,containerd (one daemon: harness debugging, no ratios)",
    )
    docs = r.add_mutually_exclusive_group()
    docs.add_argument("--docs", action="store_true", help="write docs/benchmarks.{md,png} whatever the mode")
    docs.add_argument("--no-docs", action="store_true", help="never write docs/benchmarks.{md,png}")
    sub.add_parser("list", help="list the registered figures")
    rep = sub.add_parser("report", help="re-render docs/benchmarks.{md,png} from a results JSON file")
    rep.add_argument("path")
    return p


def _select(figs: list[Figure], args: argparse.Namespace) -> list[Figure]:
    if args.only:
        unknown = set(args.only) - {f.id for f in figs}
        if unknown:
            raise SystemExit(f"unknown figure(s): {', '.join(sorted(unknown))} (see `python -m bench list`)")
        return [f for f in figs if f.id in args.only]
    return [f for f in figs if f.quick] if args.quick else figs


def _on_signal(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench: needs root (loop mount, containerd, runc)", file=sys.stderr)
        return 2
    if args.runs < MIN_RUNS:
        print(f"bench: warning: {args.runs} runs is below the {MIN_RUNS} the reports assume", file=sys.stderr)
    kinds: list[Kind] = []
    for name in args.daemons.split(","):
        if name not in KINDS:
            raise SystemExit(f"unknown daemon {name!r}: choose from {', '.join(KINDS)}")
        kinds.append(cast(Kind, name))
    figs = _select(all_figures(), args)
    full = not args.quick and not args.only and len(kinds) == len(KINDS)
    mode = "full" if full else "quick" if args.quick and not args.only else "custom"
    write_docs = args.docs or (full and not args.no_docs)

    # Ctrl-C, SIGTERM and a closed terminal all unwind through the session's cleanup. SIGINT is set
    # explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    t0 = time.monotonic()
    results: list[FigureResult] = []
    mach = machine.describe()
    with Session(tuple(kinds)) as session:
        fixtures = Fixtures(session.workdir)
        session.on_close(fixtures.close)
        print(f"bench: {mode} run, {len(figs)} figure(s), loop fs at {session.fs.mountpoint}", flush=True)
        ctx = Context(session, fixtures, args.runs, log=lambda s: print(s, flush=True))
        runner = Runner(ctx, session.sides, args.runs)
        for fig in figs:
            print(f"== {fig.id}: {fig.title}", flush=True)
            res = runner.run(fig)
            results.append(res)
            if res.status != "ok":
                print(f"   {res.status}: {res.reason}", flush=True)
    doc = report.to_json(results, mach, mode, args.runs, time.monotonic() - t0)
    path = report.write_json(doc, RESULTS)
    rel = os.path.relpath(path, os.path.dirname(HERE))
    print()
    print(report.markdown(doc, rel))
    if write_docs:
        report.render(doc, rel, DOCS)
        print(f"bench: wrote {rel}, {os.path.relpath(DOCS, os.path.dirname(HERE))} and its chart")
    else:
        print(f"bench: wrote {rel} (docs untouched; --docs writes them)")
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_list() -> int:
    for f in all_figures():
        flags = "quick " if f.quick else ""
        needs = ", ".join(r.short for r in f.needs) or "-"
        print(f"{f.id:<20} {flags:<6}{f.title}\n{'':<27}needs: {needs}")
    return 0


def cmd_report(path: str) -> int:
    with open(path) as f:
        doc = json.load(f)
    report.render(doc, os.path.relpath(path, os.path.dirname(HERE)), DOCS)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        try:
            return cmd_run(args)
        except KeyboardInterrupt:
            print("bench: interrupted; cleaned up", file=sys.stderr)
            return 130
    if args.command == "list":
        return cmd_list()
    return cmd_report(args.path)


if __name__ == "__main__":
    sys.exit(main())
