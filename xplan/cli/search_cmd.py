"""`xplan search MODEL HW --devices N [-o plan.yaml]`: find the best layouts, write the best."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from . import options as opt
from .app import JSON_OPTION, app, console, console_err, print_json


def layout_summary(d: dict) -> str:
    lay = d["layout"]
    parts = [f"{lay['dp_mode']}{lay['fsdp']}" if lay["dp_mode"] in ("fsdp", "hsdp") else lay["dp_mode"]]
    for key in ("ep", "sp", "tp", "pp"):
        if lay[key] > 1:
            parts.append(f"{key}{lay[key]}")
    parts.append(f"mb{lay['micro_batch']}")
    parts.append(f"rc={lay['recompute']}")
    if lay["offload"]:
        parts.append("off=" + "+".join(lay["offload"]))
    parts.append(f"loss={lay['kernels']['loss']}")
    return " ".join(parts)


def plan_table(title: str, estimates, refusals: dict | None = None) -> Table:
    """`refusals` (id(estimate) -> reasons) marks layouts the runtime does not execute with *."""
    table = Table(title=escape(title))
    for col in ("#", "tok/s/dev", "MFU", "step s", "GiB", "layout", "binding"):
        table.add_column(col, justify="left" if col in ("layout", "binding") else "right")
    for i, est in enumerate(estimates, 1):
        d = est.to_dict()
        mark = "*" if refusals and refusals.get(id(est)) else ""
        table.add_row(f"{i}{mark}", f"{d['tokens_per_s_per_device']:,.0f}", f"{d['mfu']:.1%}", f"{d['step_time_s']:.2f}",
                      f"{d['memory_gib']['total']:.1f}", layout_summary(d), d["binding"])
    return table


@app.command("search")
@opt.layout_options
def search_cmd(
    model: str = typer.Argument(..., help="Preset name or directory with config.json."),
    hardware: str = typer.Argument(..., help="Hardware profile name (see `xplan hw`) or YAML path."),
    seq_len: int = opt.SEQ_LEN,
    global_batch: int = typer.Option(None, "--global-batch",
                                     help="Sequences per optimizer step (default: one per device)."),
    imbalance: float = opt.IMBALANCE,
    allow_3d: bool = typer.Option(False, "--allow-3d", help="Also price tensor and pipeline parallelism "
                                  "(listed for comparison; the runtime does not execute them)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Price the whole space without pruning."),
    top: int = typer.Option(10, "--top", help="How many plans to list."),
    steps: int = typer.Option(10, "--steps", help="Training steps written into the plan."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the best plan the runtime executes "
                                "to this YAML file."),
    json_out: bool = JSON_OPTION,
    layout_flags: dict = None,
) -> None:
    """Find the fastest layouts that fit; layout flags pin those decisions.

    Examples:
      [bold]xplan search qwen3-235b-a22b h800 --devices 256 --global-batch 2048 -o plan.yaml[/]
      [bold]xplan search deepseek-v3 h800 --devices 2048 --global-batch 15360 --json[/]
      [bold]xplan search ./tiny-moe cpu --devices 4 --seq-len 64 --global-batch 8 --precision fp32 -o plan.yaml[/]
    """
    from xplan.errors import InputError
    from xplan.layout import parse_knob, runtime_refusals
    from xplan.plan import make_plan, save_plan
    from xplan.planner.pricing import Workload, load_hw
    from xplan.planner.search import explain_nothing_fits, search

    devices = parse_knob("devices", layout_flags.pop("devices"))
    pinned = {name: parse_knob(name, value) for name, value in layout_flags.items() if value is not None}
    if global_batch is None:
        global_batch = devices
    workload = Workload(model, hardware, seq_len, global_batch, imbalance)
    if json_out:
        result = search(workload, devices, pinned, allow_3d=allow_3d, exhaustive=exhaustive, top=top)
    else:
        with Progress(console=console_err, transient=True) as bar:
            task = bar.add_task("pricing layouts", total=None)
            result = search(workload, devices, pinned, allow_3d=allow_3d, exhaustive=exhaustive, top=top,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not result.plans:
        raise InputError(explain_nothing_fits(result, workload, devices))
    refusals = {id(e): runtime_refusals(e.layout, result.device_type) for e in result.plans}
    best = result.best_runnable
    if not json_out:
        console.print(plan_table(f"best layouts: {model} on {devices} × {hardware}, seq {seq_len}, "
                                 f"global batch {global_batch}", result.plans, refusals))
        console.print(plan_table("Pareto front (throughput vs peak memory)", result.pareto))
        console.print(f"{result.candidates_evaluated} candidates priced in {result.search_time_s:.2f} s"
                      + ("; * = priced for comparison, not executed by the runtime"
                         if any(refusals.values()) else ""))
    written = None
    if output is not None:
        if best is None:
            raise InputError(f"no plan written: no fitting layout is executed by the runtime on {result.device_type} "
                             f"(the fastest: {'; '.join(refusals[id(result.plans[0])])}). Fitting layouts are listed "
                             "for comparison; unpin those decisions to get a plan `xplan run` executes.")
        training = {"seq_len": seq_len, "global_batch": global_batch, "steps": steps}
        predictions = {k: v for k, v in best.to_dict().items() if k in (
            "memory_gib", "step_time_s", "tokens_per_s_per_device", "mfu", "time_s", "binding")}
        first_level = load_hw(hardware).levels[0].devices
        plan = make_plan(model, hardware, best.layout, training, predictions, devices_per_node=first_level,
                         notes=f"written by xplan search ({result.candidates_evaluated} candidates)")
        written = str(save_plan(plan, output))
    if json_out:
        print_json({"model": model, "hardware": hardware, "devices": devices, "seq_len": seq_len,
                    "global_batch": global_batch,
                    # runtime_refusals: why `xplan run` would not execute a layout (empty: it does)
                    "plans": [{**e.to_dict(), "runtime_refusals": refusals[id(e)]} for e in result.plans],
                    "pareto": [e.to_dict() for e in result.pareto], "search_time_s": result.search_time_s,
                    "candidates_evaluated": result.candidates_evaluated, "plan_file": written})
    elif written:
        note = "" if best is result.plans[0] else " (the fastest layout the runtime executes)"
        console.print(f"best plan written to [bold]{escape(written)}[/]{note} — run it with `xplan run {escape(written)}`")
