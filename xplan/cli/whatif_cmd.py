"""`xplan whatif PLAN --set key=value ...`: re-price a plan with changes, side by side."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import JSON_OPTION, app, console, print_json

WORKLOAD_KEYS = ("seq_len", "global_batch", "hardware", "hw", "model", "imbalance", "image_tokens", "images",
                 "image_fraction")


def whatif_keys() -> list[str]:
    """Workload keys and every declared layout knob (xplan.layout)."""
    from xplan.layout import knobs

    return list(WORKLOAD_KEYS) + [info.name for info in knobs()]


def parse_sets(items: list[str]) -> dict[str, str]:
    from xplan.errors import InputError

    keys = whatif_keys()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise InputError(f"--set expects key=value, got {item!r}.")
        if key not in keys:
            raise InputError(f"--set {key}: unknown key; use one of {', '.join(keys)}.")
        out[key] = value.strip()
    return out


def measured_imbalance(path: Path) -> float:
    """The busiest EP rank's routed load over the mean that `xplan run` measured (metrics.jsonl
    `ep_imbalance`, median over its steps): from a metrics file or a run directory holding one."""
    import json
    import statistics

    from xplan.errors import InputError

    metrics = path / "metrics.jsonl" if path.is_dir() else path
    try:
        lines = metrics.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"--set imbalance: cannot read {metrics}: {exc.strerror or exc}.") from None
    values = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("ep_imbalance"), (int, float)):
            values.append(float(record["ep_imbalance"]))
    if not values:
        raise InputError(f"--set imbalance: {metrics} holds no ep_imbalance (a run with expert parallelism writes "
                         "one per step).")
    return statistics.median(values)


def parse_imbalance(value: str) -> float:
    """`--set imbalance=`: a number, or a run's metrics.jsonl / run directory (its measured value)."""
    from xplan.errors import InputError

    try:
        number = float(value)
    except ValueError:
        path = Path(value)
        if not path.exists():
            raise InputError(f"--set imbalance needs a number or a run's metrics.jsonl (or its folder), got "
                             f"{value!r}.") from None
        number = measured_imbalance(path)
    if not number >= 1.0:
        raise InputError(f"--set imbalance is the busiest rank's load over the mean and must be >= 1, got {number}.")
    return number


# Changing these re-derives the FSDP group of an fsdp-mode plan (all data-parallel ranks) unless
# fsdp itself is set.
_RESIZING = ("devices", "tp", "pp", "dp_mode")


def apply_changes(workload, layout, changes: dict[str, str]):
    from xplan.errors import InputError
    from xplan.layout import flat_to_nested, knob_value, knobs, layout_from_dict, parse_knob

    w = {"model": workload.model, "hardware": workload.hardware, "seq_len": workload.seq_len,
         "global_batch": workload.global_batch, "imbalance": workload.imbalance,
         "image_tokens": workload.image_tokens, "image_fraction": workload.image_fraction}
    flat = {info.name: knob_value(layout, info) for info in knobs()}
    for key, value in changes.items():
        if key in ("hardware", "hw"):
            w["hardware"] = value
        elif key == "model":
            w["model"] = value
        elif key == "imbalance":
            w["imbalance"] = parse_imbalance(value)
        elif key == "images":  # image tokens as whole images of the (possibly new) model
            from xplan.planner.pricing import image_tokens_of

            try:
                count = int(value)
            except ValueError:
                raise InputError(f"--set images needs an integer, got {value!r}.") from None
            w["image_tokens"] = image_tokens_of(changes.get("model", w["model"]), 0, count)
        elif key == "image_fraction":
            try:
                w[key] = float(value)
            except ValueError:
                raise InputError(f"--set image_fraction needs a number in (0, 1], got {value!r}.") from None
        elif key in ("seq_len", "global_batch", "image_tokens"):
            try:
                w[key] = int(value)
            except ValueError:
                raise InputError(f"--set {key} needs an integer, got {value!r}.") from None
        else:
            flat[key] = parse_knob(key, value)
    # A hardware fact, not a knob: the plan's ranks per device, or the new hardware's (a3: 2).
    ranks_per_device = layout.ranks_per_device
    if w["hardware"] != workload.hardware:
        from xplan.planner.pricing import load_hw

        ranks_per_device = load_hw(w["hardware"]).device.ranks_per_device
    resized = any(k in changes for k in _RESIZING) or ranks_per_device != layout.ranks_per_device
    if "fsdp" not in changes and resized and layout.dp_mode != "hsdp":
        flat["fsdp"] = None
        if "dp_mode" not in changes:
            flat["dp_mode"] = None
    return replace(workload, **w), layout_from_dict({**flat_to_nested(flat), "ranks_per_device": ranks_per_device})


# Command-line flags in messages from the layers below, as whatif spells them.
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def as_set_keys(message: str) -> str:
    """A message from pricing or the layout rules, with each flag named as the `--set` key whatif
    takes (`--micro-batch` -> `--set micro_batch=…`) and 'the global batch or the micro-batch' made
    concrete."""
    keys = set(whatif_keys())

    def key(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return f"--set {name}=…" if name in keys else match.group(0)

    message = _FLAG.sub(key, message)
    return message.replace("change the global batch or the micro-batch",
                           "change --set global_batch=… or --set micro_batch=…")


def check_batch(workload, layout) -> None:
    """The global batch against data-parallel ranks × micro-batch, with the --set values that work."""
    from xplan.errors import InputError

    per_step = layout.data_parallel * layout.micro_batch
    if workload.global_batch % per_step == 0:
        return
    dp = layout.data_parallel
    near = sorted({max(per_step, workload.global_batch // per_step * per_step),
                   (workload.global_batch // per_step + 1) * per_step})
    micro = [m for m in range(1, 65) if workload.global_batch % (dp * m) == 0][-4:]
    fix = (f", or --set micro_batch=M with {dp} × M dividing {workload.global_batch} (M = {', '.join(map(str, micro))})"
           if micro else f" ({workload.global_batch} sequences do not split evenly over {dp} data-parallel ranks at any "
           "micro-batch)")
    raise InputError(
        f"global batch {workload.global_batch} is not a multiple of data-parallel ranks ({dp}) × micro-batch "
        f"({layout.micro_batch}) = {per_step}: use --set global_batch=N with N a multiple of {per_step} "
        f"(e.g. {' or '.join(map(str, near))}){fix}.")


def _pp(value: float) -> str:
    return f"{value * 100:+.1f} pp"


@app.command("whatif")
def whatif(
    plan: Path = typer.Argument(..., help="Plan file written by `xplan search`."),
    sets: list[str] = typer.Option([], "--set", help="key=value to change (repeatable): seq_len, global_batch, "
                                   "image_tokens, images, image_fraction, hardware, model, imbalance (a number, or a run's "
                                   "metrics.jsonl or folder: its measured ep_imbalance), or any layout knob (the "
                                   "--flags of `xplan estimate`, with _ for -: devices, dp_mode, fsdp, ep, "
                                   "micro_batch, loss, ...)."),
    report: Path = typer.Option(None, "--report", help="Also write the HTML report of the what-if layout here "
                                "(the plan as written shown beside it)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Re-price a plan with changes and show old vs new side by side with deltas (MFU in
    percentage points).

    Examples:
      [bold]xplan whatif plan.yaml --set seq_len=32768 --set recompute=full[/]
      [bold]xplan whatif plan.yaml --set hardware=a3 --json[/]
      [bold]xplan whatif plan.yaml --set devices=512 --report whatif.html[/]
    """
    from xplan.errors import InputError
    from xplan.plan import load_plan, profile_sha256
    from xplan.planner.pricing import Workload, price, run_refusals

    loaded = load_plan(plan)
    planned = loaded.data.predictions.get("imbalance") if isinstance(loaded.data.predictions, dict) else None
    workload = Workload.of_plan(loaded, float(planned) if isinstance(planned, (int, float)) and planned >= 1 else None)
    before = price(workload, loaded.layout)
    changes = parse_sets(sets)
    try:
        new_workload, new_layout = apply_changes(workload, loaded.layout, changes)
        check_batch(new_workload, new_layout)
        after = price(new_workload, new_layout)
    except InputError as exc:
        raise InputError(as_set_keys(str(exc))) from None
    b, a = before.to_dict(), after.to_dict()
    rows = [("fits", b["fits"], a["fits"]), ("routing imbalance", b["imbalance"], a["imbalance"]),
            ("tokens/s/device", b["tokens_per_s_per_device"],
                                             a["tokens_per_s_per_device"]),
            ("step time s", b["step_time_s"], a["step_time_s"]), ("MFU", b["mfu"], a["mfu"]),
            ("peak memory GiB", b["memory_gib"]["total"], a["memory_gib"]["total"])]
    rows += [(f"  memory {k}", b["memory_gib"][k], a["memory_gib"][k]) for k in b["memory_gib"]
             if k not in ("total", "capacity", "host_capacity")]
    rows += [(f"  time {k}", b["time_s"][k], a["time_s"][k]) for k in b["time_s"] if b["time_s"][k] or a["time_s"][k]]
    refusals = run_refusals(new_workload, new_layout)
    notes = [f"xplan run refuses the what-if layout: {reason}" for reason in refusals]
    recorded = loaded.data.profile_sha256
    if recorded and profile_sha256(loaded.hardware) not in (None, recorded):
        notes.append(f"the hardware profile {loaded.hardware} changed since the plan was written: the plan's "
                     "predictions and this 'plan' column may differ")
    report_file = None
    if report is not None:
        from xplan.app.report_data import build_report
        from xplan.app.report_html import write_html

        data = build_report(new_workload, new_layout, headroom_gib=loaded.data.headroom_gib, plan=loaded,
                            plan_file=str(plan), before=b, title=f"what if {', '.join(sets) or 'no change'}: "
                            f"{new_workload.model} on {new_layout.devices} × {new_workload.hardware}")
        report_file = write_html(data, report)
    if json_out:
        print_json({"plan": str(plan), "changes": changes, "before": b, "after": a,
                    "delta": {name: (new - old if isinstance(old, (int, float)) and not isinstance(old, bool)
                                     else None) for name, old, new in rows},
                    "notes": notes, "runtime_refusals": refusals, "report_file": report_file})
        return
    table = Table(title=escape(f"what if: {', '.join(sets) or 'no change'}"))
    for col in ("", "plan", "what-if", "delta"):
        table.add_column(col, justify="left" if not col else "right")
    host = None
    for name, old, new in rows:
        if isinstance(old, bool):
            table.add_row(name, str(old), str(new), "")
            continue
        if name == "  memory offloaded_to_host":  # host memory: not part of the device peak above
            host = (old, new)
            continue
        if not old and not new:
            continue
        delta = new - old
        if name == "MFU":
            table.add_row(name, f"{old:.1%}", f"{new:.1%}", _pp(delta))
            continue
        rel = f" ({delta / old:+.0%})" if old else ""
        table.add_row(name, f"{old:,.2f}", f"{new:,.2f}", f"{delta:+,.2f}{rel}")
    table.add_section()
    cap_b, cap_a = b["memory_gib"]["capacity"], a["memory_gib"]["capacity"]
    table.add_row("device memory GiB", f"{cap_b:,.0f}", f"{cap_a:,.0f}", f"{cap_a - cap_b:+,.0f}" if cap_a != cap_b else "")
    if host and (host[0] or host[1]):
        table.add_row("host: offloaded GiB", f"{host[0]:,.2f}", f"{host[1]:,.2f}", f"{host[1] - host[0]:+,.2f}")
        table.add_row("host: memory GiB", f"{b['memory_gib']['host_capacity']:,.0f}",
                      f"{a['memory_gib']['host_capacity']:,.0f}", "")
    console.print(table)
    console.print(f"binding: {b['binding']} → {a['binding']}", highlight=False, markup=False)
    for note in notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if report_file:
        console.print(f"report written to [bold]{escape(report_file)}[/]")
