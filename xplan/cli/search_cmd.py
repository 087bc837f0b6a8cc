"""`xplan search MODEL HW --devices N [-o plan.yaml]`: find the best layouts, write the best."""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from . import options as opt
from .app import JSON_OPTION, app, console, console_err, print_json


def layout_summary(d: dict) -> str:
    """Every layout field of an estimate dict on one line (`knob=value`), nothing left out."""
    from xplan.app.report_explain import LAYOUT_FIELDS, flat_layout, show

    flat = flat_layout(d["layout"])
    return " ".join(f"{k}={show(k, flat[k])}" for k in LAYOUT_FIELDS)


def plan_table(title: str, estimates: list[dict], labels: list[str], refused: set[int] | None = None,
               front: set[int] | None = None, sections: tuple[int, ...] = (), width: int = 80) -> tuple[Table, str]:
    """One table of estimate dicts: the numbers, then one column per layout field that differs
    between them (abbreviated headers, cells never cut: long values wrap). Returns the table and
    a caption naming the fields common to all rows and the abbreviations.
    `refused`: row indices the runtime does not execute (marked *); `front`: row indices on the
    Pareto front (marked ●); `sections`: row indices that start a new section; `width`: the
    console's, above which the differing fields share one wrapping column."""
    from xplan.app.report_explain import LEGEND, SHORT, common_fields, differing_fields, flat_layout, show

    layouts = [d["layout"] for d in estimates]
    differ = differing_fields(layouts)
    bindings = {d["binding"] for d in estimates}
    flats = [flat_layout(lay) for lay in layouts]

    def build(one_column: bool) -> Table:
        table = Table(title=escape(title), box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
        for name in ("#", "tok/s", "MFU", "step s", "GiB"):  # numbers never wrap
            table.add_column(name, justify="right", no_wrap=True)
        if one_column:  # too many differing fields for a column each: one wrapping column of key=value
            table.add_column("layout (fields that differ)", ratio=3)
        for name in ([] if one_column else differ):  # long values wrap (fold), never cut
            table.add_column(SHORT.get(name, name), overflow="fold")
        if len(bindings) > 1:
            table.add_column("binding", overflow="fold", ratio=1 if one_column else None)
        for i, d in enumerate(estimates):
            if i in sections:
                table.add_section()
            flat = flats[i]
            mark = ("*" if refused and i in refused else "") + ("●" if front and i in front else "")
            cells = [labels[i] + mark, f"{d['tokens_per_s_per_device']:,.0f}",
                     f"{d['mfu']:.1%}", f"{d['step_time_s']:.2f}", f"{d['memory_gib']['allocated']:.1f}"]
            if one_column:
                cells.append(" ".join(f"{SHORT.get(name, name)}={show(name, flat[name], True)}" for name in differ))
            else:
                cells += [show(name, flat[name], short=True) for name in differ]
            if len(bindings) > 1:
                cells.append(d["binding"].replace("_", " "))
            table.add_row(*cells)
        return table

    table = build(one_column=False)
    if _min_width(table) > width:
        table = build(one_column=True)
    common = common_fields(layouts)
    caption = "all rows: " + " ".join(f"{k}={show(k, v)}" for k, v in common.items())
    if len(bindings) == 1:
        caption += f" binding={next(iter(bindings))}"
    per_die = any(d["layout"].get("ranks_per_device", 1) > 1 for d in estimates)
    caption += (f"\ntok/s = tokens/s/device, GiB = allocated peak per {'rank (one die)' if per_die else 'device'}"
                " (what must fit)")
    if front:
        caption += ", ● = on the Pareto front (throughput vs memory)"
    if refused:
        caption += ", * = priced for comparison, not executed by the runtime"
    if any(k in SHORT for k in differ):
        caption += f"; {LEGEND}"
    return table, caption


def _min_width(table: Table) -> int:
    """The narrowest the table renders without cutting a word or a number."""
    from rich.console import Console

    return Console(width=10_000).measure(table).minimum


def parse_headroom(text: str | None, hbm_gib: float) -> float:
    """--headroom as GiB: '8' or '8GiB' (GiB), '10%' or '0.1' (a fraction of the device memory)."""
    from xplan.errors import InputError

    if text is None or str(text).strip() in ("", "0"):
        return 0.0
    raw = str(text).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(%|gib|g|gb)?", raw, re.IGNORECASE)
    if not match:
        raise InputError(f"--headroom takes GiB ('8', '8GiB') or a fraction of the device memory ('0.1', '10%'), "
                         f"got {raw!r}.")
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    gib = value / 100 * hbm_gib if unit == "%" else value * hbm_gib if not unit and value < 1 else value
    if gib >= hbm_gib:
        raise InputError(f"--headroom {raw} keeps {gib:.1f} GiB free, all of the device's {hbm_gib:.0f} GiB; "
                         "give less.")
    return gib


def command_line(model: str, hardware: str, devices: int, seq_len: int, global_batch: int, imbalance: float,
                 pinned: dict, allow_3d: bool, exhaustive: bool, headroom: str | None, steps: int,
                 output: Path | None, image_tokens: int = 0, image_fraction: float = 1.0) -> list[str]:
    """The search as a command line that repeats it (what the plan records as `command`)."""
    from xplan.layout import knobs

    args = ["xplan", "search", model, hardware, "--devices", str(devices), "--seq-len", str(seq_len),
            "--global-batch", str(global_batch)]
    for info in knobs():
        if info.name in pinned:
            value = pinned[info.name]
            text = (",".join(value) or "none") if isinstance(value, tuple) else "none" if value is None else str(value)
            args += [info.flag, text]
    if imbalance is not None:
        args += ["--imbalance", str(imbalance)]
    if image_tokens:
        args += ["--image-tokens", str(image_tokens)]
    if image_fraction != 1:
        args += ["--image-fraction", str(image_fraction)]
    args += ["--allow-3d"] * allow_3d + ["--exhaustive"] * exhaustive
    if headroom:
        args += ["--headroom", str(headroom)]
    if steps != 10:
        args += ["--steps", str(steps)]
    return args + (["-o", str(output)] if output is not None else [])


def _rows(result, top: int):
    """(estimates, labels, Pareto indices, first Pareto-only row) for the one table: the top plans,
    then the Pareto front's members beyond them (lower memory), at most `top` of each."""
    plans = list(result.plans[:top])
    ids = {id(e) for e in plans}
    same = {e.layout for e in plans}
    extra = [e for e in result.pareto if id(e) not in ids and e.layout not in same]
    if len(extra) > top:  # spread over the front: fastest, lightest, and evenly between
        step = (len(extra) - 1) / max(1, top - 1)
        extra = [extra[round(i * step)] for i in range(top)]
    on_front = {e.layout for e in result.pareto}
    rows = plans + extra
    front = {i for i, e in enumerate(rows) if e.layout in on_front}
    labels = [str(i + 1) for i in range(len(plans))] + [f"P{i + 1}" for i in range(len(extra))]
    return rows, labels, front, len(plans)


@app.command("search")
@opt.layout_options
def search_cmd(
    model: str = typer.Argument(..., help="Preset name or directory with config.json."),
    hardware: str = typer.Argument(..., help="Hardware profile name (see `xplan hw`) or YAML path."),
    seq_len: int = opt.SEQ_LEN,
    global_batch: int = typer.Option(None, "--global-batch",
                                     help="Sequences per optimizer step (default: one per device)."),
    imbalance: float | None = opt.IMBALANCE,
    image_tokens: int = opt.IMAGE_TOKENS,
    images: int | None = opt.IMAGES,
    image_fraction: float = opt.IMAGE_FRACTION,
    allow_3d: bool = typer.Option(False, "--allow-3d", help="Also price tensor and pipeline parallelism "
                                  "(listed for comparison; the runtime does not execute them)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Price the whole space without pruning."),
    top: int = typer.Option(10, "--top", help="How many plans to list (and at most as many more from the Pareto "
                            "front)."),
    headroom: str = typer.Option(None, "--headroom", help="Device memory to keep free: GiB ('8', '8GiB') or a "
                                 "fraction of it ('0.1', '10%'). A layout fits when its peak is within the rest; "
                                 "stored in the plan."),
    steps: int = typer.Option(10, "--steps", help="Training steps written into the plan."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the best plan the runtime executes "
                                "to this YAML file."),
    report: Path = typer.Option(None, "--report", help="Also write the HTML report of the best plan here."),
    json_out: bool = JSON_OPTION,
    layout_flags: dict = None,
) -> None:
    """Find the fastest layouts that fit; layout flags pin those decisions.

    Examples:
      [bold]xplan search qwen3-235b-a22b h800 --devices 256 --global-batch 2048 -o plan.yaml[/]
      [bold]xplan search qwen3-235b-a22b h800 --devices 256 --global-batch 2048 --headroom 8 --report r.html[/]
      [bold]xplan search deepseek-v3 h800 --devices 2048 --global-batch 15360 --json[/]
      [bold]xplan search ./tiny-moe cpu --devices 4 --seq-len 64 --global-batch 8 --precision fp32 -o plan.yaml[/]
    """
    from xplan.errors import InputError
    from xplan.layout import parse_knob
    from xplan.plan import make_plan, provenance, save_plan
    from xplan.planner.levers import explain_levers
    from xplan.planner.pricing import Workload, image_tokens_of, load_hw, run_refusals
    from xplan.planner.search import explain_nothing_fits, search

    started = time.perf_counter()
    devices = parse_knob("devices", layout_flags.pop("devices"))
    pinned = {name: parse_knob(name, value) for name, value in layout_flags.items() if value is not None}
    profile = load_hw(hardware)
    if global_batch is None:  # one sequence per rank (a3: two ranks per device)
        global_batch = devices * profile.device.ranks_per_device
    headroom_gib = parse_headroom(headroom, profile.hbm_bytes() / 2**30)
    image_tokens = image_tokens_of(model, image_tokens, images)
    workload = Workload(model, hardware, seq_len, global_batch, imbalance, image_tokens, image_fraction)
    kwargs = dict(allow_3d=allow_3d, exhaustive=exhaustive, top=max(top, 1), headroom_bytes=headroom_gib * 2**30)
    if json_out or not console_err.is_terminal:
        result = search(workload, devices, pinned, **kwargs)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console_err, transient=True) as bar:
            task = bar.add_task(f"tracing {escape(model)} at seq {seq_len} (cached after the first time)", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description="pricing layouts (core layouts)")

            result = search(workload, devices, pinned, progress=progress, **kwargs)
    elapsed = time.perf_counter() - started
    if not result.plans:
        message = explain_nothing_fits(result, workload, devices)
        if headroom_gib:
            message += f" (--headroom {headroom_gib:.1f} GiB was kept free: lower it to admit more.)"
        raise InputError(message)
    refusals = {id(e): run_refusals(workload, e.layout) for e in (*result.plans, *result.pareto)}  # the table's rows
    best = result.best_runnable
    chosen = best if (output is not None or report is not None) and best is not None else result.plans[0]
    # Why the plan uses recompute / offload / keep_gathered / tile_tokens: each lever priced away.
    levers = explain_levers(best or result.plans[0], workload)
    plan = None
    if best is not None:
        training = {"seq_len": seq_len, "global_batch": global_batch, "steps": steps}
        if image_tokens:
            training["image_tokens"] = image_tokens
        if image_fraction != 1:
            training["image_fraction"] = image_fraction
        predictions = {k: v for k, v in best.to_dict().items() if k in (
            "memory_gib", "step_time_s", "tokens_per_s_per_device", "mfu", "time_s", "binding", "imbalance")}
        plan = make_plan(model, hardware, best.layout, training, predictions,
                         devices_per_node=profile.levels[0].devices, headroom_gib=headroom_gib,
                         notes=f"written by xplan search ({result.candidates_evaluated} candidates)",
                         **provenance(hardware, command_line(model, hardware, devices, seq_len, global_batch,
                                                             imbalance, pinned, allow_3d, exhaustive, headroom,
                                                             steps, output, image_tokens, image_fraction)))
    if not json_out:
        rows, labels, front, first_extra = _rows(result, top)
        dicts = [e.to_dict() for e in rows]
        refused = {i for i, e in enumerate(rows) if refusals[id(e)]}
        title = (f"best layouts: {model} on {devices} × {hardware}, seq {seq_len}, global batch {global_batch}"
                 + (f", {headroom_gib:.1f} GiB headroom" if headroom_gib else ""))
        table, caption = plan_table(title, dicts, labels, refused, front,
                                    sections=(first_extra,) if first_extra < len(rows) else (), width=console.width)
        console.print(table)
        console.print(caption, highlight=False, markup=False)
        if first_extra < len(rows):
            console.print(f"P1.. = the Pareto front beyond the top {top} (less memory, slower)", highlight=False)
        from xplan.app.report_explain import explain_choice

        for line in explain_choice([e.to_dict() for e in result.plans], headroom_gib):
            console.print(line, highlight=False, markup=False)
        number = result.plans.index(best) + 1 if best in result.plans else 1
        console.print(f"Levers of #{number}" + (": none (no recompute, offload or kept blocks)." if not levers
                                                else ", each against the same layout without it:"),
                      highlight=False, markup=False)
        for lever in levers:
            console.print(f"  {lever.describe()}", highlight=False, markup=False)
        console.print(f"searched in {elapsed:.1f} s: {result.trace_time_s:.1f} s loading the model, profile and traces "
                      f"(tracing when not cached), {result.search_time_s:.2f} s pricing "
                      f"{result.candidates_evaluated:,} candidates", highlight=False)
    written = None
    if output is not None:
        if best is None:
            raise InputError(f"no plan written: no fitting layout is executed by the runtime on {result.device_type} "
                             f"(the fastest: {'; '.join(refusals[id(result.plans[0])])}). Fitting layouts are listed "
                             "for comparison; unpin those decisions to get a plan `xplan run` executes.")
        written = str(save_plan(plan, output))
    report_file = None
    if report is not None:
        from xplan.app.report_data import build_report
        from xplan.app.report_html import write_html

        data = build_report(workload, chosen.layout, headroom_gib=headroom_gib, search_result=result,
                            plan=plan if chosen is best else None, plan_file=written)
        report_file = write_html(data, report)
    if json_out:
        print_json({"model": model, "hardware": hardware, "devices": devices, "seq_len": seq_len,
                    "global_batch": global_batch, "headroom_gib": headroom_gib, **workload.images(),
                    # runtime_refusals: why `xplan run` would not execute a layout (empty: it does)
                    "plans": [{**e.to_dict(), "runtime_refusals": refusals[id(e)]} for e in result.plans[:top]],
                    "pareto": [e.to_dict() for e in result.pareto], "search_time_s": result.search_time_s,
                    "trace_time_s": result.trace_time_s, "elapsed_s": elapsed,
                    "candidates_evaluated": result.candidates_evaluated, "plan_file": written,
                    "written_plan": best.to_dict() if written else None,
                    "report_file": report_file,
                    # the best runnable plan's recompute / offload / keep_gathered / tile_tokens, each priced away
                    "levers": [lever.to_dict() for lever in levers]})
        return
    if written:
        note = "" if best is result.plans[0] else (
            f" (the fastest layout the runtime executes: {best.tokens_per_s_per_device:,.0f} tokens/s/device, "
            f"{best.memory.allocated / 2**30:.1f} GiB allocated; {escape(layout_summary(best.to_dict()))})")
        console.print(f"best plan written to [bold]{escape(written)}[/]{note} — run it with `xplan run {escape(written)}`")
    if report_file:
        console.print(f"report written to [bold]{escape(report_file)}[/]")
