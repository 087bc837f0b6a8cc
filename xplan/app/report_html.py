"""The report as one self-contained HTML file: tables, inline SVG figures, the data as JSON.

No network at view time and no JavaScript: styles are inline, figures are inline SVG
(`report_plots`), and the report's numbers travel inside as `<script type="application/json"
id="xplan-report-data">` (data, never executed) for scripts that want them back.
"""

from __future__ import annotations

import html
import json
from typing import Any

from .report_explain import LAYOUT_FIELDS, TIME_WORDS, flat_layout, show

SECTIONS = (("summary", "Summary"), ("memory", "Memory per device"), ("time", "Step time"),
            ("binding", "Binding constraint"), ("alternatives", "Alternatives"), ("pareto", "Pareto front"),
            ("sweeps", "Sweeps"), ("imbalance", "Routing imbalance"), ("comparison-3d", "FSDP/EP vs 3D parallel"),
            ("provenance", "Provenance"))

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:980px;
padding:1.2em 1.5em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{padding:.25em .6em;border-bottom:1px solid #eee;
text-align:right;vertical-align:top}th{background:#f6f6f6}td.l,th.l{text-align:left}
.sub{color:#666;font-size:.9em}.ok{color:#2a7d2a;font-weight:600}.bad{color:#c0392b;font-weight:600}
figure{margin:.8em 0}figcaption{color:#555;font-size:.85em}nav a{margin-right:.8em;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.6em}.card{border:1px solid #ddd;border-radius:6px;padding:.4em .8em}
.card b{display:block;font-size:1.3em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], left: int | set[int] = 1) -> str:
    """Cells are HTML (escape text before); `left`: the first n columns, or a set of columns, align left."""
    lefts = set(range(left)) if isinstance(left, int) else left
    head = "".join(f'<th class="{"l" if i in lefts else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i in lefts else ""}">{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(figs: dict[str, str], key: str, caption: str) -> str:
    if key not in figs:
        return ""
    return f'<figure id="fig-{key}">{figs[key]}<figcaption>{_e(caption)}</figcaption></figure>'


def _layout_text(layout: dict[str, Any]) -> str:
    flat = flat_layout(layout)
    return " ".join(f"{k}={show(k, flat[k])}" for k in LAYOUT_FIELDS)


def _summary(r: dict[str, Any]) -> str:
    est, mem = r["estimate"], r["memory"]
    fits = '<span class="ok">fits</span>' if mem["fits"] else '<span class="bad">does not fit</span>'
    cards = [("tokens/s/device", f"{est['tokens_per_s_per_device']:,.0f}"), ("MFU", f"{est['mfu']:.1%}"),
             ("step time", f"{est['step_time_s']:.3f} s"),
             ("peak memory", f"{mem['allocated_gib']:.1f} allocated / {mem['capacity_gib']:.0f} GiB"), ("binding", est["binding"])]
    out = '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards) + "</div>"
    out += (f"<p>{fits}. {_e(r['model'])} on {r['devices']} × {_e(r['hardware'])}, sequence length {r['seq_len']}, "
            f"global batch {r['global_batch']} sequences (grad accumulation {est['grad_accum']}).</p>")
    out += f'<p class="sub">layout: <code>{_e(_layout_text(est["layout"]))}</code></p>'
    refusals = r.get("runtime_refusals") or []
    if not refusals:
        return out + '<p class="sub"><code>xplan run</code> executes this layout.</p>'
    return out + ('<p><span class="bad"><code>xplan run</code> refuses this layout</span> (priced for comparison):</p>'
                  "<ul>" + "".join(f"<li>{_e(reason)}</li>" for reason in refusals) + "</ul>")


def _memory(r: dict[str, Any], figs: dict[str, str]) -> str:
    mem = r["memory"]
    rows = [[_e(k), f"{v:.2f}", f"{v / mem['total_gib']:.0%}" if mem["total_gib"] else "-"]
            for k, v in mem["device_gib"].items() if v]
    rows.append(["<b>allocated (must fit)</b>", f"<b>{mem['allocated_gib']:.2f}</b>", ""])
    rows.append(["total (device, reserved)", f"{mem['total_gib']:.2f}", ""])
    out = _table(["component", "GiB", "share"], rows)
    cap = [["HBM capacity", f"{mem['capacity_gib']:.2f}"], ["headroom kept free", f"{mem['headroom_gib']:.2f}"],
           ["usable", f"{mem['usable_gib']:.2f}"], ["free at peak", f"{mem['free_gib']:.2f}"],
           ["host: offloaded per device", f"{mem['host']['offloaded_gib']:.2f}"],
           ["host: memory per device", f"{mem['host']['capacity_gib']:.2f}"]]
    out += _table(["capacity", "GiB"], cap)
    return out + _figure(figs, "memory", "Stacked per-device memory of the chosen layout, the alternatives below "
                         "and the best 3D layout; the line is the device memory (dashed: less the headroom).")


def _time(r: dict[str, Any], figs: dict[str, str]) -> str:
    t = r["time"]
    step = t["step_time_s"]
    rows = [[_e(TIME_WORDS.get(k, k)), _e(k), f"{v:.3f}", f"{v / step:.0%}"] for k, v in t["components_s"].items()]
    rows.append(["<b>step</b>", "", f"<b>{step:.3f}</b>", "100%"])
    out = _table(["component", "key", "s", "share"], rows, left=2)
    comm = [[_e(k), f"{v:.3f}", f"{v / step:.0%}"] for k, v in t["exposed_communication_s"].items()]
    out += "<p>Exposed communication by kind (what compute does not hide):</p>" + _table(["kind", "s", "share"], comm)
    return out + _figure(figs, "time", "Each component's seconds per step, stacked to the step time; blue compute, "
                         "red exposed communication, grey idle (pipeline bubble, host-bound launches).")


def _binding(r: dict[str, Any]) -> str:
    b = r["binding"]
    out = "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in b["explanation"]) + "</ul>"
    if b["levers"]:
        rows = [[_e(lv["change"]), '<span class="ok">yes</span>' if lv["fits"] else '<span class="bad">no</span>',
                 f"{lv['peak_gib']:.1f}", f"{lv['tokens_per_s_per_device']:,.0f}"] for lv in b["levers"]]
        out += "<p>The lighter settings, priced:</p>" + _table(["change", "fits", "peak GiB", "tokens/s/device"], rows)
    return out


def _alternatives(r: dict[str, Any]) -> str:
    if not r["alternatives"]:
        return "<p>No other fitting layout was found.</p>"
    rows = [[_e(a["label"]), f"{a['estimate']['tokens_per_s_per_device']:,.0f}", f"{a['tokens_per_s_change']:+.1%}",
             f"{a['estimate']['memory_gib']['allocated']:.1f}", f"{a['peak_gib_change']:+.1f}",
             _e(", ".join(a["changes"]) or "-"), _e(a["summary"])] for a in r["alternatives"]]
    return ("<p>Each alternative against the chosen layout: what it changes and what separates it.</p>"
            + _table(["plan", "tok/s/dev", "Δ", "peak GiB", "Δ GiB", "changes", "what separates it"], rows,
                     left={0, 5, 6}))


def _points_table(points: list[dict[str, Any]], xname: str) -> str:
    rows = []
    for p in points:
        if "error" in p:
            rows.append([_e(p["x"]), "-", "-", "-", f'<span class="sub">{_e(p["error"])}</span>'])
        else:
            rows.append([_e(p["x"]), f"{p['tokens_per_s_per_device']:,.0f}", f"{p['peak_gib']:.1f}",
                         f"{p['step_time_s']:.2f}", "fits" if p["fits"] else '<span class="bad">does not fit</span>'])
    return _table([xname, "tokens/s/device", "peak GiB", "step s", ""], rows)


def _sweeps(r: dict[str, Any], figs: dict[str, str]) -> str:
    s = r["sweeps"]
    return (f"<h3>Sequence length</h3><p class='sub'>{_e(s['seq_len']['note'])}.</p>"
            + _figure(figs, "seq", "Tokens/s/device and peak memory against sequence length (dotted: the plan's).")
            + _points_table(s["seq_len"]["points"], "seq_len")
            + f"<h3>Device count</h3><p class='sub'>{_e(s['devices']['note'])}.</p>"
            + _figure(figs, "devices", "Tokens/s/device and peak memory against devices (dotted: the plan's).")
            + _points_table(s["devices"]["points"], "devices"))


def _imbalance(r: dict[str, Any], figs: dict[str, str]) -> str:
    section = r.get("imbalance_sensitivity")
    if not section:
        return "<p>A dense model: there is no routing to be imbalanced.</p>"
    return (f"<p class='sub'>{_e(section['note'])}.</p>"
            + _figure(figs, "imbalance", "Tokens/s/device and peak memory against routing imbalance"
                      + (f" (purple: the {section['compare_label']})." if section.get("compare_points") else "."))
            + _points_table(section["points"], "imbalance")
            + (f"<p>The {_e(section['compare_label'])}:</p>" + _points_table(section["compare_points"], "imbalance")
               if section.get("compare_points") else ""))


def _compare_3d(r: dict[str, Any], figs: dict[str, str]) -> str:
    c = r["comparison_3d"]
    out = f"<p class='sub'>{_e(c['note'])}.</p>"
    best = c.get("best_3d")
    if not best:
        return out + f"<p>{_e(c.get('reason') or 'no 3D layout fits')}.</p>"
    rows = []
    for name, key in (("tokens/s/device", "tokens_per_s_per_device"), ("step time s", "step_time_s"), ("MFU", "mfu")):
        fmt = "{:.1%}" if key == "mfu" else "{:,.3f}" if key == "step_time_s" else "{:,.0f}"
        rows.append([name, fmt.format(c["chosen"][key]), fmt.format(best[key])])
    rows.append(["peak GiB", f"{c['chosen']['memory_gib']['allocated']:.1f}", f"{best['memory_gib']['allocated']:.1f}"])
    rows.append(["binding", _e(c["chosen"]["binding"]), _e(best["binding"])])
    rows.append(["layout", f"<code>{_e(_layout_text(c['chosen']['layout']))}</code>",
                 f"<code>{_e(_layout_text(best['layout']))}</code>"])
    out += _table(["", "chosen (FSDP/EP)", "best 3D (price only)"], rows, left={0, 1, 2})
    out += f"<p>{_e(c['separation']['summary'])} ({c['candidates_evaluated']:,} 3D candidates priced).</p>"
    return out + _figure(figs, "versus3d", "Step time by kind and memory by component, chosen vs best 3D.")


def _provenance(r: dict[str, Any]) -> str:
    p = r.get("provenance") or {}
    rows = [[k, f"<code>{_e(p[k])}</code>"] for k in ("xplan_version", "created", "command", "profile_sha256",
                                                       "profile_sha256_now") if p.get(k)]
    if p.get("profile_changed"):
        rows.append(["note", '<span class="bad">the hardware profile changed since the plan was written</span>'])
    rows.append(["plan file", _e(r.get("plan_file") or "-")])
    rows.append(["report built in", f"{sum(r.get('timings_s', {}).values()):.1f} s"])
    return _table(["", ""], rows)


def render_html(report: dict[str, Any], figs: dict[str, str] | None = None) -> str:
    """The whole report as one HTML document (figures drawn unless given)."""
    if figs is None:
        from .report_plots import figures

        figs = figures(report)
    body = {
        "summary": _summary(report), "memory": _memory(report, figs), "time": _time(report, figs),
        "binding": _binding(report), "alternatives": _alternatives(report),
        "pareto": _figure(figs, "pareto", "Throughput against peak memory: the fastest fitting layouts (grey), the "
                          "Pareto front (blue), the chosen plan (star) and the best 3D layout (diamond)."),
        "sweeps": _sweeps(report, figs) if "sweeps" in report else "",
        "imbalance": _imbalance(report, figs) if "sweeps" in report else "",
        "comparison-3d": _compare_3d(report, figs) if "comparison_3d" in report else "",
        "provenance": _provenance(report),
    }
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{body[key]}</section>' for key, title in SECTIONS)
    data = json.dumps(report, default=str).replace("</", "<\\/")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>xplan report: {_e(report["title"])}</title>'
            f"<style>{CSS}</style></head><body><h1>xplan report: {_e(report['title'])}</h1>"
            f"<nav>{nav}</nav>{sections}"
            f'<script type="application/json" id="xplan-report-data">{data}</script></body></html>\n')


def write_html(report: dict[str, Any], path) -> str:
    """Render and write atomically; returns the path written."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(path)
    return str(path)
