"""The report's figures: matplotlib drawn straight to SVG text for inlining in one HTML file.

Why matplotlib and inline SVG: the report must open offline, years later, in any browser, with no
network and no JavaScript. matplotlib writes static vector graphics itself (no browser-side
library, no CDN), and inline SVG keeps text as text (searchable, sharp at any zoom) inside the one
file. Only the object-oriented API is used (`matplotlib.figure.Figure`), so no pyplot state or GUI
backend is touched.

Each function takes the report dict (`report_data.build_report`) and returns an SVG string, or
None when the figure does not apply (e.g. routing imbalance on a dense model).
"""

from __future__ import annotations

import io
import re
from typing import Any

from .report_explain import COMM_KINDS, MEMORY_COMPONENTS, TIME_KIND, TIME_WORDS

COLORS = {  # memory components, then time kinds
    "parameters": "#4e79a7", "gradients": "#a0cbe8", "optimizer": "#f28e2b", "gathered_parameters": "#ffbe7d",
    "activations": "#59a14f", "logits_loss": "#8cd17d", "temporaries": "#b6992d", "overhead": "#bab0ac",
    "compute": "#4e79a7", "communication": "#e15759", "idle": "#bab0ac",
}
CHOSEN, OTHER, FRONT, THREE_D = "#d62728", "#9e9e9e", "#1f77b4", "#9467bd"


def _figure(width: float = 8.0, height: float = 3.8, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def to_svg(fig, name: str) -> str:
    """The figure as an inline <svg> element: no XML prolog or DTD (which name URLs), no namespace
    declarations (HTML parses inline SVG without them), ids prefixed with `name` so several figures
    share one document, and a width that follows the page."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"xplan-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r'(xlink:href|href)="#([^"]+)"', rf'\1="#{name}-\2"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", svg)
    svg = re.sub(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"',
                 r'<svg role="img" style="width:100%;max-width:\1pt;height:auto"', svg, count=1)
    return svg


def _stack_bars(ax, labels: list[str], stacks: list[dict[str, float]], keys, colors, horizontal=False):
    import numpy as np

    base = np.zeros(len(labels))
    for key in keys:
        values = np.array([s.get(key, 0.0) for s in stacks])
        if not values.any():
            continue
        if horizontal:
            ax.barh(labels, values, left=base, color=colors.get(key), label=TIME_WORDS.get(key, key), height=0.6)
        else:
            ax.bar(labels, values, bottom=base, color=colors.get(key), label=key, width=0.6)
        base += values
    return base


def memory_bars(report: dict[str, Any]) -> str:
    """Stacked memory per device for the chosen layout, its alternatives and the 3D one, with HBM."""
    entries = [("chosen", report["estimate"])]
    entries += [(a["label"], a["estimate"]) for a in report["alternatives"][:4]]
    best3d = (report.get("comparison_3d") or {}).get("best_3d")
    if best3d:
        entries.append(("best 3D", best3d))
    fig, ax = _figure(8.0, 4.2)
    stacks = [{k: e["memory_gib"][k] for k in MEMORY_COMPONENTS} for _, e in entries]
    tops = _stack_bars(ax, [n for n, _ in entries], stacks, MEMORY_COMPONENTS, COLORS)
    mem = report["memory"]
    ax.axhline(mem["capacity_gib"], color="black", lw=1.2, ls="-", label=f"HBM {mem['capacity_gib']:.0f} GiB")
    if mem["headroom_gib"]:
        ax.axhline(mem["usable_gib"], color="black", lw=1, ls="--", label=f"usable {mem['usable_gib']:.0f} GiB")
    for i, (_, e) in enumerate(entries):
        host = e["memory_gib"]["offloaded_to_host"]
        ax.text(i, tops[i], f"{tops[i]:.1f}" + (f"\n+{host:.0f} host" if host else ""), ha="center", va="bottom",
                fontsize=7)
    ax.set_ylabel("GiB per device (busiest rank)")
    ax.set_xlim(-0.6, len(entries) - 0.4)
    ax.set_ylim(0, max(mem["capacity_gib"], float(tops.max())) * 1.2)
    ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("Memory per device by component, against device memory")
    return to_svg(fig, "memory")


def waterfall(report: dict[str, Any]) -> str:
    """Step time built up component by component (compute, exposed communication, idle)."""
    parts = report["time"]["components_s"]
    fig, ax = _figure(8.0, 1.2 + 0.32 * (len(parts) + 1))
    left = 0.0
    names = list(parts)
    for i, key in enumerate(names):
        ax.barh(i, parts[key], left=left, color=COLORS[TIME_KIND.get(key, "compute")], height=0.6)
        ax.text(left + parts[key], i, f" {parts[key]:.2f} s", va="center", fontsize=7)
        left += parts[key]
    ax.barh(len(names), left, color="#333333", height=0.6)
    ax.text(left, len(names), f" {left:.2f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(names) + 1), [TIME_WORDS.get(k, k) for k in names] + ["step"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, left * 1.15)
    ax.set_xlabel("seconds per optimizer step")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in ("compute", "communication", "idle")], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.35), ncols=3, frameon=False)
    ax.set_title(f"Step time waterfall (grad accumulation {report['time']['grad_accum']})")
    return to_svg(fig, "waterfall")


def pareto(report: dict[str, Any]) -> str:
    """Throughput vs peak memory: the search's listed plans, its Pareto front, the chosen plan."""
    fig, ax = _figure(8.0, 4.0)
    plans, front = report["search"]["plans"], report["search"]["pareto"]
    if plans:
        ax.scatter([p["peak_gib"] for p in plans], [p["tokens_per_s_per_device"] for p in plans], s=14, color=OTHER,
                   label="fastest fitting layouts")
    if front:
        ax.plot([p["peak_gib"] for p in front], [p["tokens_per_s_per_device"] for p in front], marker="o", ms=4,
                color=FRONT, label="Pareto front", drawstyle="steps-post")
    est = report["estimate"]
    ax.scatter([est["memory_gib"]["allocated"]], [est["tokens_per_s_per_device"]], marker="*", s=180, color=CHOSEN,
               zorder=5, label="chosen")
    best3d = (report.get("comparison_3d") or {}).get("best_3d")
    if best3d:
        ax.scatter([best3d["memory_gib"]["allocated"]], [best3d["tokens_per_s_per_device"]], marker="D", s=40,
                   color=THREE_D, zorder=5, label="best 3D (price only)")
    mem = report["memory"]
    ax.axvline(mem["capacity_gib"], color="black", lw=1)
    if mem["headroom_gib"]:
        ax.axvline(mem["usable_gib"], color="black", lw=1, ls="--")
    ax.set_xlabel("peak memory per device, GiB")
    ax.set_ylabel("tokens/s/device")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Search: {report['search']['candidates_evaluated']:,} candidates priced")
    return to_svg(fig, "pareto")


def _sweep_axes(points: list[dict[str, Any]], xlabel: str, title: str, name: str, capacity: float,
                usable: float, log2: bool, current, others: list[tuple[str, list[dict[str, Any]]]] = ()) -> str | None:
    ok = [p for p in points if "error" not in p]
    if len(ok) < 2:
        return None
    fig, (left, right) = _figure(8.0, 3.2, ncols=2)
    xs = [p["x"] for p in ok]
    series = [("chosen", ok, FRONT)] + [(label, [p for p in pts if "error" not in p], THREE_D) for label, pts in others]
    for ax, key, label in ((left, "tokens_per_s_per_device", "tokens/s/device"), (right, "peak_gib", "peak GiB")):
        for name_, pts, color in series:
            ax.plot([p["x"] for p in pts], [p[key] for p in pts], color=color, lw=1, label=name_)
            for p in pts:
                ax.scatter([p["x"]], [p[key]], color=color if p["fits"] else "white", edgecolor=color, s=24, zorder=3)
        ax.axvline(current, color=CHOSEN, lw=0.8, ls=":")
        if log2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs], fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(p[key] for _, pts, _ in series for p in pts) * 1.12)
    right.axhline(capacity, color="black", lw=1)
    right.set_ylim(0, max(right.get_ylim()[1], capacity * 1.12))
    if usable != capacity:
        right.axhline(usable, color="black", lw=1, ls="--")
    if len(series) > 1:
        left.legend(fontsize=7, loc="lower left")
    fig.suptitle(title + " (hollow: does not fit)", fontsize=9)
    return to_svg(fig, name)


def seq_sweep(report: dict[str, Any]) -> str | None:
    mem = report["memory"]
    return _sweep_axes(report["sweeps"]["seq_len"]["points"], "sequence length", "Against sequence length",
                       "seq", mem["capacity_gib"], mem["usable_gib"], True, report["seq_len"])


def device_sweep(report: dict[str, Any]) -> str | None:
    mem = report["memory"]
    return _sweep_axes(report["sweeps"]["devices"]["points"], "devices", "Against device count", "devices",
                       mem["capacity_gib"], mem["usable_gib"], True, report["devices"])


def imbalance(report: dict[str, Any]) -> str | None:
    section = report.get("imbalance_sensitivity")
    if not section:
        return None
    mem = report["memory"]
    others = [(section["compare_label"], section["compare_points"])] if section.get("compare_points") else []
    return _sweep_axes(section["points"], "imbalance (busiest EP rank / mean)", "Sensitivity to routing imbalance",
                       "imbalance", mem["capacity_gib"], mem["usable_gib"], False, report["imbalance"], others)


def versus_3d(report: dict[str, Any]) -> str | None:
    """The chosen FSDP/EP layout beside the best 3D layout: step time by kind and memory by component."""
    section = report.get("comparison_3d") or {}
    best = section.get("best_3d")
    if not best:
        return None
    entries = [("chosen", report["estimate"]), ("best 3D", best)]
    fig, (left, right) = _figure(8.0, 3.2, ncols=2)
    time_stacks = []
    for _, e in entries:
        by_kind: dict[str, float] = {}
        for k, v in e["time_s"].items():
            by_kind[TIME_KIND.get(k, "compute")] = by_kind.get(TIME_KIND.get(k, "compute"), 0.0) + v
        time_stacks.append(by_kind)
    _stack_bars(left, [n for n, _ in entries], time_stacks, ("compute", "communication", "idle"), COLORS)
    left.set_ylabel("seconds per step")
    left.legend(fontsize=7)
    for i, (_, e) in enumerate(entries):
        left.text(i, e["step_time_s"], f"{e['tokens_per_s_per_device']:,.0f}\ntok/s/dev", ha="center", va="bottom",
                  fontsize=7)
    left.set_ylim(0, max(e["step_time_s"] for _, e in entries) * 1.3)
    tops = _stack_bars(right, [n for n, _ in entries], [{k: e["memory_gib"][k] for k in MEMORY_COMPONENTS}
                                                        for _, e in entries], MEMORY_COMPONENTS, COLORS)
    right.axhline(report["memory"]["capacity_gib"], color="black", lw=1)
    right.set_ylabel("GiB per device")
    right.set_ylim(0, max(report["memory"]["capacity_gib"], float(tops.max())) * 1.1)
    lay = best["layout"]
    fig.suptitle(f"Chosen vs best 3D (tp {lay['tp']}, pp {lay['pp']}, vpp {lay['vpp']}, ep {lay['ep']}; price only)",
                 fontsize=9)
    return to_svg(fig, "versus3d")


FIGURES = (
    ("memory", "Memory per device", memory_bars),
    ("time", "Step time", waterfall),
    ("pareto", "Pareto front", pareto),
    ("seq", "Sequence-length sweep", seq_sweep),
    ("devices", "Device-count sweep", device_sweep),
    ("imbalance", "Routing imbalance", imbalance),
    ("versus3d", "FSDP/EP vs 3D", versus_3d),
)


def figures(report: dict[str, Any]) -> dict[str, str]:
    """Figure id -> inline SVG, for every figure that applies."""
    out = {}
    for key, _, draw in FIGURES:
        svg = draw(report)
        if svg:
            out[key] = svg
    return out


__all__ = ["COMM_KINDS", "FIGURES", "figures", "to_svg"]
