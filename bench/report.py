"""Results out: the JSON record, the generated part of docs/benchmarks.md, and the ratio chart.

The JSON document is the source of truth; the Markdown and the PNG are rendered from it alone,
so ``python -m bench report bench/results/<file>.json`` re-renders an old run.

JSON layout (schema 1):
    {"schema": 1, "mode": "full"|"quick"|"custom", "runs": 5, "seconds": 312.4,
     "machine": {"date", "nproc", "cpu", "memory", "kernel", "python", "pyctrd", ...},
     "figures": [{"id", "title", "status": "ok"|"skipped"|"failed", "reason", "seconds", "load", "notes",
                  "unavailable": {daemon: why it cannot run the figure},
                  "metrics": [{"key", "label", "unit", "better": "lower"|"higher",
                               "pyctrd": {"median", "min", "max", "n", "values"} | null,
                               "containerd": {...} | null, "ratio", "goal_met"}]}]}
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from bench.harness import KINDS
from bench.runner import FigureResult

BEGIN = "<!-- BEGIN GENERATED: python -m bench; edits between these markers are overwritten -->"
END = "<!-- END GENERATED -->"

SKELETON = f"""# Benchmarks: pyctrd next to containerd

{BEGIN}
{END}
"""


def to_json(
    results: list[FigureResult], machine: dict[str, str], mode: str, runs: int, seconds: float
) -> Any:
    figures = []
    for r in results:
        metrics = []
        for m in r.metrics:
            per: dict[str, Any] = {}
            for kind in KINDS:
                s = m.summary(kind)
                per[kind] = None if s is None else {**s.__dict__, "values": m.samples[kind]}
            metrics.append(
                {
                    "key": m.metric.key,
                    "label": m.metric.label,
                    "unit": m.metric.unit,
                    "better": m.metric.better,
                    **per,
                    "ratio": m.ratio,
                    "goal_met": m.goal_met,
                }
            )
        figures.append(
            {
                "id": r.figure.id,
                "title": r.figure.title,
                "quick": r.figure.quick,
                "status": r.status,
                "reason": r.reason,
                "seconds": round(r.seconds, 1),
                "load": round(r.load, 2),
                "notes": r.notes,
                "unavailable": r.unavailable,
                "metrics": metrics,
            }
        )
    return {
        "schema": 1,
        "mode": mode,
        "runs": runs,
        "seconds": round(seconds, 1),
        "machine": machine,
        "figures": figures,
    }


def write_json(doc: Any, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = os.path.join(directory, f"{stamp}-{doc['mode']}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path


# -- Markdown -------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Three significant digits, thousands grouped: 0.0123, 1.23, 123, 1 234."""
    if x >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(r: float) -> str:
    """Two decimals, three near parity, so that a missed goal never prints as "1.00"."""
    return f"{r:.3f}" if abs(r - 1.0) < 0.005 else f"{r:.2f}"


def _cell(s: dict[str, Any] | None, missing: str = "-") -> str:
    if s is None:
        return missing
    return f"**{_num(s['median'])}** ({_num(s['min'])}-{_num(s['max'])})"


def _goal_text(m: dict[str, Any]) -> str:
    r, better = m["ratio"], m["better"]
    if r is None:
        return "no ratio (one daemon only)"
    want = "≤ 1.0" if better == "lower" else "≥ 1.0"
    if m["goal_met"]:
        return f"**met** (ratio {_ratio(r)}, goal {want})"
    if better == "lower":
        how = f"pyctrd needs {r:.1f}x containerd's {'memory' if 'MiB' in m['unit'] else 'time'}"
    else:
        how = f"pyctrd reaches {r:.0%} of containerd's rate"
    return f"**not met**: {how} (goal {want})"


def markdown(doc: Any, json_path: str = "", chart: str = "") -> str:
    mach = doc["machine"]
    figs = doc["figures"]
    lines = [
        f"_Generated {mach['date']} by `python -m bench run` ({doc['mode']} mode: warm-up + "
        f"{doc['runs']} runs per daemon, alternating pyctrd/containerd; {doc['seconds']:.0f} s in all)._"
        + (f" Raw numbers: `{json_path}` (git-ignored)." if json_path else ""),
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs (`nproc`) | {mach['nproc']} x {mach['cpu']} |",
        f"| memory | {mach['memory']} |",
        f"| kernel | {mach['kernel']} |",
        f"| Python | {mach['python']} |",
        f"| pyctrd | {mach['pyctrd']} |",
        f"| containerd | {mach['containerd']} |",
        f"| ctr / runc | {mach['ctr']} / {mach['runc']} |",
        f"| commit | `{mach['commit'][:12]}`{mach['commit'][40:]} |",
    ]
    loads = [f["load"] for f in figs if f["status"] == "ok" and "load" in f]
    if loads:
        lines.append(f"| load average (1 min) as figures started | {min(loads):.1f}-{max(loads):.1f} |")
    lines.append("")
    if loads and max(loads) > float(mach["nproc"]):
        lines += [
            f"**The machine was busy during this run** (load up to {max(loads):.1f} on {mach['nproc']} CPUs, "
            "from other work): expect more spread than usual, and trust ratios near 1.0 less.",
            "",
        ]
    if chart:
        lines += [f"![pyctrd/containerd ratio per figure]({chart})", ""]
    lines += [
        "Median (min-max) per daemon; ratio = pyctrd median / containerd median. "
        "Goal: ratio ≤ 1.0 for times and memory, ≥ 1.0 for throughput (↑).",
        "",
        "| figure | unit | pyctrd | containerd | pyctrd/containerd | goal |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for f in figs:
        if f["status"] == "skipped":
            continue
        # A failed figure still shows what the other daemon measured; its missing side reads "failed".
        unavailable = f.get("unavailable", {})
        missing = {
            k: "n/a" if k in unavailable else "failed" if f["status"] == "failed" else "-" for k in KINDS
        }
        for m in f["metrics"]:
            if m["pyctrd"] is None and m["containerd"] is None:
                continue
            arrow = " ↑" if m["better"] == "higher" else ""
            ratio = "-" if m["ratio"] is None else _ratio(m["ratio"])
            mark = {True: "✅", False: "❌", None: "-"}[m["goal_met"]]
            lines.append(
                f"| {m['label']}{arrow} | {m['unit']} | {_cell(m['pyctrd'], missing['pyctrd'])} "
                f"| {_cell(m['containerd'], missing['containerd'])} | {ratio} | {mark} |"
            )
    lines += ["", "Goal per figure:", ""]
    for f in figs:
        if f["status"] == "ok":
            for m in f["metrics"]:
                why = "; ".join(f.get("unavailable", {}).values())
                lines.append(f"- {m['label']}: {f'no ratio: {why}' if why else _goal_text(m)}.")
        elif f["status"] == "skipped":
            lines.append(f"- {f['title']} (`{f['id']}`): skipped, {f['reason']}.")
        else:
            lines.append(f"- {f['title']} (`{f['id']}`): **failed**: {f['reason']}")
    notes = [(f["id"], n) for f in figs for n in f["notes"]]
    if notes:
        lines += ["", "Notes from the run:", ""]
        lines += [f"- `{fid}`: {n}" for fid, n in notes]
    lines += ["", "What each figure measures:", ""]
    lines += [f"- `{f['id']}`: {f['title']}." for f in figs]
    return "\n".join(lines) + "\n"


def update_docs(path: str, generated: str) -> None:
    """Replace what lies between the markers; hand-written text around them stays as it is."""
    text = SKELETON
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{generated}{END}{tail}")


# -- chart ----------------------------------------------------------------------------------------


def chart(doc: Any, path: str) -> bool:
    """One horizontal bar per metric: the ratio on a log axis, growing from parity (1.0), green if
    the goal is met. Figures not measured (skipped, failed) keep a grey row, so the chart always
    has the whole list. Returns False (drawing nothing) if matplotlib is missing: a dev extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on the bench machines
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        return False
    rows: list[tuple[str, float | None, str]] = []  # label, ratio, colour or grey text
    for f in doc["figures"]:
        if f["status"] == "ok":
            for m in f["metrics"]:
                label = m["label"].replace("`", "") + (" ↑" if m["better"] == "higher" else "")
                if m["ratio"] is not None:
                    rows.append((label, m["ratio"], "#2e7d32" if m["goal_met"] else "#c62828"))
                else:
                    absent = ", ".join(f.get("unavailable", {})) or "one daemon"
                    rows.append((label, None, f"no ratio: {absent} cannot run it"))
        else:
            text = "not implemented yet" if f["status"] == "skipped" else "failed"
            rows.append((f["id"], None, text))
    if not any(r[1] is not None for r in rows):
        return False
    rows.reverse()  # barh draws the first row at the bottom; keep the table's order top-down
    ratios = [r[1] for r in rows if r[1] is not None]
    lo, hi = min([*ratios, 0.5]) / 1.8, max([*ratios, 2.0]) * 2.0
    fig, ax = plt.subplots(figsize=(9, 0.36 * len(rows) + 1.6))
    for y, (_, r, style) in enumerate(rows):
        if r is None:
            ax.text(1.0, y, f"  {style}", va="center", fontsize=8, color="#888888", style="italic")
            continue
        # Bars grow from parity (1.0) to the ratio, so worse and better point in opposite directions.
        ax.barh(y, r - 1.0, left=1.0, color=style, height=0.7)
        ax.text(r * 1.06 if r >= 1 else r / 1.06, y, _ratio(r), va="center", ha="left" if r >= 1 else "right")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row[1] is None:
            tick.set_color("#888888")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [2.0**k for k in range(-6, 7) if lo <= 2.0**k <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.axvline(1.0, color="black", linewidth=1)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("pyctrd / containerd, medians (log scale; 1 = parity)")
    ax.set_title("pyctrd / containerd: green = goal met (≤ 1 time and memory, ≥ 1 throughput ↑)", fontsize=10)
    mach = doc["machine"]
    foot = f"{mach['date']}, {mach['nproc']} CPUs, kernel {mach['kernel']}, {doc['runs']} runs per daemon"
    fig.text(0.01, 0.01, foot, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(doc: Any, json_path: str, docs_path: str) -> None:
    """Chart next to the docs file, then the Markdown between the markers."""
    png = os.path.splitext(docs_path)[0] + ".png"
    drawn = chart(doc, png)
    update_docs(docs_path, markdown(doc, json_path, os.path.basename(png) if drawn else ""))
