"""`xplan report PLAN [--html FILE] [--json]`: where the memory and the time go, what binds, the
alternatives and what separates each; with --html, one offline file with the figures."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import JSON_OPTION, app, console, console_err, print_json


def render_report(r: dict) -> None:
    """The report's terminal tables (memory, step time, binding, alternatives, 3D when priced)."""
    from xplan.app.report_explain import TIME_KIND, TIME_WORDS

    est, mem, t = r["estimate"], r["memory"], r["time"]
    verdict = "[green]fits[/]" if mem["fits"] else "[bold red]does not fit[/]"
    console.print(f"[bold]{escape(r['title'])}[/], seq {r['seq_len']}, global batch {r['global_batch']}: {verdict}; "
                  f"{est['tokens_per_s_per_device']:,.0f} tokens/s/device, MFU {est['mfu']:.1%}, "
                  f"step {est['step_time_s']:.3f} s")
    memory = Table(title="memory per device (GiB, busiest rank)")
    for col, justify in (("component", "left"), ("GiB", "right"), ("share", "right")):
        memory.add_column(col, justify=justify)
    for key, value in mem["device_gib"].items():
        if value:
            memory.add_row(key, f"{value:.2f}", f"{value / mem['total_gib']:.0%}")
    memory.add_row("[bold]allocated (must fit)[/]", f"[bold]{mem['allocated_gib']:.2f}[/]", "")
    memory.add_row("total (device, reserved)", f"{mem['total_gib']:.2f}", "")
    memory.add_section()
    memory.add_row("device memory (HBM)", f"{mem['capacity_gib']:.2f}", "")
    if mem["headroom_gib"]:
        memory.add_row("headroom kept free", f"{mem['headroom_gib']:.2f}", "")
        memory.add_row("usable", f"{mem['usable_gib']:.2f}", "")
    memory.add_row("free at peak", f"{mem['free_gib']:.2f}", f"{mem['free_gib'] / mem['capacity_gib']:.0%}")
    memory.add_section()
    memory.add_row("host: offloaded", f"{mem['host']['offloaded_gib']:.2f}", "")
    memory.add_row("host: memory per device", f"{mem['host']['capacity_gib']:.2f}", "")
    console.print(memory)
    times = Table(title=f"time per step (s, grad accumulation {t['grad_accum']})")
    for col, justify in (("component", "left"), ("kind", "left"), ("s", "right"), ("share", "right")):
        times.add_column(col, justify=justify)
    for key, value in t["components_s"].items():
        times.add_row(TIME_WORDS.get(key, key), TIME_KIND.get(key, "compute"), f"{value:.3f}",
                      f"{value / t['step_time_s']:.0%}")
    times.add_row("[bold]step[/]", "", f"[bold]{t['step_time_s']:.3f}[/]", "")
    console.print(times)
    comm = [f"{k} {v:.3f} s" for k, v in t["exposed_communication_s"].items() if v]
    console.print("exposed communication by kind: " + (", ".join(comm) or "none"), highlight=False)
    console.print("[bold]binding constraint[/]")
    for line in r["binding"]["explanation"]:
        console.print(f"  {line}", highlight=False, markup=False)
    if r["alternatives"]:
        alts = Table(title="alternatives and what separates each from this plan")
        for col, justify in (("plan", "left"), ("tok/s/dev", "right"), ("GiB", "right"), ("changes", "left"),
                             ("what separates it", "left")):
            alts.add_column(col, justify=justify, overflow="fold")
        for a in r["alternatives"]:
            alts.add_row(a["label"], f"{a['estimate']['tokens_per_s_per_device']:,.0f}",
                         f"{a['estimate']['memory_gib']['allocated']:.1f}", ", ".join(a["changes"]) or "-", a["summary"])
        console.print(alts)
    c = r.get("comparison_3d")
    if c and c.get("best_3d"):
        b = c["best_3d"]
        lay = b["layout"]
        console.print(f"best 3D layout (price only): tp {lay['tp']} pp {lay['pp']} vpp {lay['vpp']} ep {lay['ep']} "
                      f"mb {lay['micro_batch']} recompute {lay['recompute']}: {b['tokens_per_s_per_device']:,.0f} "
                      f"tokens/s/device, {b['memory_gib']['allocated']:.1f} GiB ({c['separation']['summary']})",
                      highlight=False, markup=False)
    prov = r.get("provenance") or {}
    if prov.get("profile_changed"):
        console.print(f"note: the hardware profile changed since the plan was written ({prov['created']}); the "
                      "numbers above are priced with today's profile", highlight=False, markup=False)


@app.command("report")
def report(
    plan: Path = typer.Argument(..., help="Plan file written by `xplan search` (or by hand)."),
    html: Path = typer.Option(None, "--html", help="Write one self-contained HTML file (tables and figures: "
                              "memory bars, step-time waterfall, Pareto front, sweeps, imbalance, 3D comparison)."),
    top: int = typer.Option(5, "--top", help="How many alternatives to list."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Where a plan's memory and step time go, what binds it, its alternatives and what separates
    each; with --html also sweeps (sequence length, devices, routing imbalance) and the best 3D
    layout beside it. Priced afresh, as `xplan estimate` prices the plan's layout.

    Examples:
      [bold]xplan report plan.yaml[/]
      [bold]xplan report plan.yaml --html report.html[/]
      [bold]xplan report plan.yaml --json[/]
    """
    from xplan.app.report_data import build_report
    from xplan.plan import load_plan
    from xplan.planner.pricing import Workload

    loaded = load_plan(plan)
    workload = Workload.of_plan(loaded)
    full = html is not None or json_out  # sweeps and the 3D comparison: for the file and the JSON
    kwargs = dict(headroom_gib=loaded.data.headroom_gib, plan=loaded, plan_file=str(plan), alternatives=max(top, 0),
                  sweeps=full)
    if console_err.is_terminal and not json_out:
        with console_err.status(f"pricing {escape(str(plan))}" + (": alternatives, sweeps and the 3D comparison" if full else "")):
            data = build_report(workload, loaded.layout, **kwargs)
    else:
        data = build_report(workload, loaded.layout, **kwargs)
    written = None
    if html is not None:
        from xplan.app.report_html import write_html

        written = write_html(data, html)
        data["html_file"] = written
    if json_out:
        print_json(data)
        return
    render_report(data)
    if written:
        console.print(f"report written to [bold]{escape(written)}[/] (one file, opens offline)")
    else:
        console.print("add --html FILE for the figures, the sweeps and the 3D comparison", highlight=False)
