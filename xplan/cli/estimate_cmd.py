"""`xplan estimate MODEL HW --devices N [layout flags]`: price one fixed layout."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from . import options as opt
from .app import JSON_OPTION, app, console, print_json
from .search_cmd import layout_summary


def render_estimate(title: str, est, levers=None, refusals: list[str] | None = None) -> None:
    """Tables of one estimate; `levers` (planner.levers.explain_levers) add a line each;
    `refusals` (planner.pricing.run_refusals): why `xplan run` would not execute the layout."""
    d = est.to_dict()
    mem = d["memory_gib"]
    verdict = "[green]fits[/]" if d["fits"] else "[bold red]does not fit[/]"
    console.print(f"[bold]{escape(title)}[/]  {verdict}  binding: {d['binding']}")
    summary = Table(show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("step time", f"{d['step_time_s']:.3f} s (grad accum {d['grad_accum']})")
    summary.add_row("tokens/s/device", f"{d['tokens_per_s_per_device']:,.0f}")
    summary.add_row("MFU (bf16 peak)", f"{d['mfu']:.1%}")
    per_die = d["layout"].get("ranks_per_device", 1) > 1
    summary.add_row("peak memory", f"{mem['allocated']:.1f} allocated ({mem['total']:.1f} reserved) / "
                                   f"{mem['capacity']:.0f} GiB{' per rank (one die)' if per_die else ''}")
    ranks = f" ranks={d['layout']['ranks']} (one per die)" if per_die else ""
    summary.add_row("layout", f"devices={d['layout']['devices']}{ranks} {layout_summary(d)}")
    lay = d["layout"]
    summary.add_row("data parallel", f"{lay['dp_mode']} over {lay['dp_world']} ranks")
    if refusals is not None:
        summary.add_row("xplan run", "executes it" if not refusals else "[red]refuses it[/] (see below)")
    if lay["ep"] > 1:
        summary.add_row("expert parallel", f"ep {lay['ep']}, all-to-all {lay['ep_overlap']}, routing imbalance "
                                           f"{d['imbalance']:.2f}")
    console.print(summary)
    tables = Table(title=f"memory per {'rank (one die)' if per_die else 'device'} (GiB)", show_header=True)
    tables.add_column("component")
    tables.add_column("GiB", justify="right")
    for key, value in mem.items():  # device components only; capacities and host memory below the table
        if key not in ("total", "capacity", "host_capacity", "offloaded_to_host", "host_activations", "host_states",
                       "allocated"):
            tables.add_row(key, f"{value:.2f}")
    tables.add_row("allocated (must fit)", f"{mem['allocated']:.2f}")
    tables.add_row("[bold]total (device, reserved)[/]", f"[bold]{mem['total']:.2f}[/]")
    console.print(tables)
    free = mem["capacity"] - mem["allocated"]
    margin = f"{free:.2f} GiB free" if free >= 0 else f"{-free:.2f} GiB over"
    console.print(f"device memory (busiest rank): {mem['allocated']:.2f} allocated of {mem['capacity']:.0f} GiB "
                  f"({margin}; {mem['total']:.2f} reserved with the allocator's overhead)", highlight=False)
    if mem["offloaded_to_host"]:
        node = d["host_per_node_gib"]
        console.print(f"host memory: {mem['offloaded_to_host']:.2f} GiB offloaded per rank (activations "
                      f"{mem['host_activations']:.2f}, model states {mem['host_states']:.2f}), of "
                      f"{mem['host_capacity']:.0f} GiB; per node {node['needed']:.1f} of {node['capacity']:.0f} GiB "
                      f"({node['ranks']} ranks)", highlight=False)
    times = Table(title="time per step (s)")
    times.add_column("component")
    times.add_column("s", justify="right")
    times.add_column("share", justify="right")
    for key, value in d["time_s"].items():
        if value:
            times.add_row(key, f"{value:.3f}", f"{value / d['step_time_s']:.0%}")
    console.print(times)
    for reason in refusals or ():
        console.print(f"xplan run refuses it: {reason}", markup=False, highlight=False)
    for note in d["notes"]:
        console.print(f"note: {note}", markup=False)
    for lever in levers or ():
        console.print(f"lever (against the same layout without it): {lever.describe()}", markup=False,
                      highlight=False)


@app.command("estimate")
@opt.layout_options
def estimate_cmd(
    model: str = typer.Argument(..., help="Preset name or directory with config.json."),
    hardware: str = typer.Argument(..., help="Hardware profile name (see `xplan hw`) or YAML path."),
    seq_len: int = opt.SEQ_LEN,
    global_batch: int = typer.Option(None, "--global-batch", help="Sequences per optimizer step (default: one "
                                     "micro-batch per data-parallel rank, no accumulation)."),
    imbalance: float | None = opt.IMBALANCE,
    image_tokens: int = opt.IMAGE_TOKENS,
    images: int | None = opt.IMAGES,
    image_fraction: float = opt.IMAGE_FRACTION,
    json_out: bool = JSON_OPTION,
    layout_flags: dict = None,
) -> None:
    """Price one fixed layout: memory and time breakdowns, tokens/s/device, MFU, fits or not.

    Examples:
      [bold]xplan estimate qwen3-235b-a22b h800 --devices 256 --ep 8 --micro-batch 8 --recompute full[/]
      [bold]xplan estimate llama3-70b h100 --devices 64 --tp 4 --pp 4 --json[/]
    """
    from xplan.planner.levers import explain_levers
    from xplan.planner.pricing import (
        Workload,
        image_tokens_of,
        layout_from_flags,
        load_hw,
        price,
        run_refusals,
    )

    # Sizes count ranks: the hardware's ranks per device (a3: one per die) times --devices.
    layout = layout_from_flags(layout_flags, load_hw(hardware))
    if global_batch is None:
        global_batch = layout.data_parallel * layout.micro_batch
    image_tokens = image_tokens_of(model, image_tokens, images)
    workload = Workload(model, hardware, seq_len, global_batch, imbalance, image_tokens, image_fraction)
    est = price(workload, layout)
    levers = explain_levers(est, workload)
    refusals = run_refusals(workload, layout)
    if json_out:
        print_json({"model": model, "hardware": hardware, **workload.images(), **est.to_dict(),
                    "levers": [v.to_dict() for v in levers], "runtime_refusals": refusals})
        return
    render_estimate(f"{model} on {layout.devices} × {hardware}, seq {seq_len}, global batch {global_batch}", est,
                    levers, refusals)
