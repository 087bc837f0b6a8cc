"""`xplan search MODEL HW --devices N [-o plan.yaml]`: find the best layouts, write the best."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from . import options as opt
from .app import JSON_OPTION, app, console, console_err, print_json


def layout_summary(d: dict) -> str:
    lay = d["layout"]
    parts = [f"fsdp{lay['fsdp']}"]
    for key in ("ep", "sp", "tp", "pp"):
        if lay[key] > 1:
            parts.append(f"{key}{lay[key]}")
    parts.append(f"mb{lay['micro_batch']}")
    parts.append(f"rc={lay['recompute']}")
    if lay["offload"]:
        parts.append("off=" + "+".join(lay["offload"]))
    parts.append(f"loss={lay['kernels']['loss']}")
    return " ".join(parts)


def plan_table(title: str, estimates) -> Table:
    table = Table(title=title)
    for col in ("#", "tok/s/dev", "MFU", "step s", "GiB", "layout", "binding"):
        table.add_column(col, justify="left" if col in ("layout", "binding") else "right")
    for i, est in enumerate(estimates, 1):
        d = est.to_dict()
        table.add_row(str(i), f"{d['tokens_per_s_per_device']:,.0f}", f"{d['mfu']:.1%}", f"{d['step_time_s']:.2f}",
                      f"{d['memory_gib']['total']:.1f}", layout_summary(d), d["binding"])
    return table


@app.command("search")
def search_cmd(
    model: str = typer.Argument(..., help="Preset name or directory with config.json."),
    hardware: str = typer.Argument(..., help="Hardware profile name (see `xplan hw`) or YAML path."),
    devices: int = opt.DEVICES,
    seq_len: int = opt.SEQ_LEN,
    global_batch: int = opt.GLOBAL_BATCH,
    micro_batch: int = opt.MICRO_BATCH,
    fsdp: int = opt.FSDP,
    ep: int = opt.EP,
    sp: int = opt.SP,
    tp: int = opt.TP,
    pp: int = opt.PP,
    vpp: int = opt.VPP,
    recompute: str = opt.RECOMPUTE,
    offload: str = opt.OFFLOAD,
    precision: str = opt.PRECISION,
    loss: str = opt.LOSS,
    imbalance: float = opt.IMBALANCE,
    allow_3d: bool = typer.Option(False, "--allow-3d", help="Also explore tensor and pipeline parallelism."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Price the whole space without pruning."),
    top: int = typer.Option(10, "--top", help="How many plans to list."),
    steps: int = typer.Option(10, "--steps", help="Training steps written into the plan."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the best plan to this YAML file."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Find the fastest layouts that fit; layout flags pin those decisions.

    Examples:
      [bold]xplan search qwen3-235b-a22b h800 --devices 256 --global-batch 2048 -o plan.yaml[/]
      [bold]xplan search deepseek-v3 h800 --devices 2048 --global-batch 15360 --json[/]
      [bold]xplan search ./tiny-moe cpu --devices 4 --seq-len 64 --global-batch 8 --precision fp32 -o plan.yaml[/]
    """
    from xplan.errors import InputError
    from xplan.layout import parse_offload, parse_recompute
    from xplan.plan import make_plan, save_plan
    from xplan.planner.pricing import Workload
    from xplan.planner.search import explain_nothing_fits, search

    if devices < 1:
        raise InputError(f"--devices must be a positive integer, got {devices}.")
    pinned = {k: v for k, v in dict(fsdp=fsdp, ep=ep, sp=sp, tp=tp, pp=pp, vpp=vpp, micro_batch=micro_batch,
                                    precision=precision, loss=loss).items() if v is not None}
    for key in ("fsdp", "ep", "sp", "tp", "pp", "vpp", "micro_batch"):
        if key in pinned and pinned[key] < 1:
            raise InputError(f"--{key.replace('_', '-')} must be a positive integer, got {pinned[key]}.")
    if precision is not None and precision not in ("fp32", "bf16", "fp8"):
        raise InputError(f"--precision must be fp32, bf16 or fp8, got {precision!r}.")
    if loss is not None and loss not in ("full", "chunked"):
        raise InputError(f"--loss must be full or chunked, got {loss!r}.")
    if recompute is not None:
        pinned["recompute"] = parse_recompute(recompute)
    if offload is not None:
        pinned["offload"] = parse_offload(offload)
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
    best = result.plans[0]
    written = None
    if output is not None:
        training = {"seq_len": seq_len, "global_batch": global_batch, "steps": steps}
        predictions = {k: v for k, v in best.to_dict().items() if k in (
            "memory_gib", "step_time_s", "tokens_per_s_per_device", "mfu", "time_s", "binding")}
        from xplan.planner.pricing import load_hw

        first_level = load_hw(hardware).levels[0].devices
        plan = make_plan(model, hardware, best.layout, training, predictions, devices_per_node=first_level,
                         notes=f"written by xplan search ({result.candidates_evaluated} candidates)")
        written = str(save_plan(plan, output))
    if json_out:
        print_json({"model": model, "hardware": hardware, "devices": devices, "seq_len": seq_len,
                    "global_batch": global_batch, "plans": [e.to_dict() for e in result.plans],
                    "pareto": [e.to_dict() for e in result.pareto], "search_time_s": result.search_time_s,
                    "candidates_evaluated": result.candidates_evaluated, "plan_file": written})
        return
    console.print(plan_table(f"best layouts: {model} on {devices} × {hardware}, seq {seq_len}, "
                             f"global batch {global_batch}", result.plans))
    console.print(plan_table("Pareto front (throughput vs peak memory)", result.pareto))
    console.print(f"{result.candidates_evaluated} candidates priced in {result.search_time_s:.2f} s")
    if written:
        console.print(f"best plan written to [bold]{written}[/] — run it with `xplan run {written}`")
