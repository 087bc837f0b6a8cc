"""`xplan whatif PLAN --set key=value ...`: re-price a plan with changes, side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import JSON_OPTION, app, console, print_json

WORKLOAD_KEYS = ("seq_len", "global_batch", "hardware", "hw", "model", "imbalance")


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


# Changing these re-derives the FSDP group of an fsdp-mode plan (all data-parallel ranks) unless
# fsdp itself is set.
_RESIZING = ("devices", "tp", "pp", "dp_mode")


def apply_changes(workload, layout, changes: dict[str, str]):
    from xplan.errors import InputError
    from xplan.layout import flat_to_nested, knob_value, knobs, layout_from_dict, parse_knob

    w = {"model": workload.model, "hardware": workload.hardware, "seq_len": workload.seq_len,
         "global_batch": workload.global_batch, "imbalance": workload.imbalance}
    flat = {info.name: knob_value(layout, info) for info in knobs()}
    for key, value in changes.items():
        if key in ("hardware", "hw"):
            w["hardware"] = value
        elif key == "model":
            w["model"] = value
        elif key == "imbalance":
            try:
                w["imbalance"] = float(value)
            except ValueError:
                raise InputError(f"--set imbalance needs a number, got {value!r}.") from None
        elif key in ("seq_len", "global_batch"):
            try:
                w[key] = int(value)
            except ValueError:
                raise InputError(f"--set {key} needs an integer, got {value!r}.") from None
        else:
            flat[key] = parse_knob(key, value)
    if "fsdp" not in changes and any(k in changes for k in _RESIZING) and layout.dp_mode != "hsdp":
        flat["fsdp"] = None
        if "dp_mode" not in changes:
            flat["dp_mode"] = None
    return replace(workload, **w), layout_from_dict(flat_to_nested(flat))


@app.command("whatif")
def whatif(
    plan: Path = typer.Argument(..., help="Plan file written by `xplan search`."),
    sets: list[str] = typer.Option([], "--set", help="key=value to change (repeatable): seq_len, global_batch, "
                                   "hardware, model, imbalance, or any layout knob (the --flags of `xplan "
                                   "estimate`, with _ for -: devices, dp_mode, fsdp, ep, micro_batch, loss, ...)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Re-price a plan with changes and show old vs new side by side with deltas.

    Examples:
      [bold]xplan whatif plan.yaml --set seq_len=32768 --set recompute=full[/]
      [bold]xplan whatif plan.yaml --set hardware=a3 --json[/]
    """
    from xplan.plan import load_plan
    from xplan.planner.pricing import Workload, price

    loaded = load_plan(plan)
    workload = Workload(loaded.model, loaded.hardware, loaded.training.seq_len, loaded.training.global_batch)
    before = price(workload, loaded.layout)
    new_workload, new_layout = apply_changes(workload, loaded.layout, parse_sets(sets))
    after = price(new_workload, new_layout)
    b, a = before.to_dict(), after.to_dict()
    rows = [("fits", b["fits"], a["fits"]), ("tokens/s/device", b["tokens_per_s_per_device"],
                                             a["tokens_per_s_per_device"]),
            ("step time s", b["step_time_s"], a["step_time_s"]), ("MFU", b["mfu"], a["mfu"]),
            ("peak memory GiB", b["memory_gib"]["total"], a["memory_gib"]["total"])]
    rows += [(f"  memory {k}", b["memory_gib"][k], a["memory_gib"][k]) for k in b["memory_gib"]
             if k not in ("total", "capacity", "host_capacity")]
    rows += [(f"  time {k}", b["time_s"][k], a["time_s"][k]) for k in b["time_s"] if b["time_s"][k] or a["time_s"][k]]
    if json_out:
        print_json({"plan": str(plan), "changes": parse_sets(sets), "before": b, "after": a,
                    "delta": {name: (new - old if isinstance(old, (int, float)) and not isinstance(old, bool)
                                     else None) for name, old, new in rows}})
        return
    table = Table(title=escape(f"what if: {', '.join(sets) or 'no change'}"))
    for col in ("", "plan", "what-if", "delta"):
        table.add_column(col, justify="left" if not col else "right")
    for name, old, new in rows:
        if isinstance(old, bool):
            table.add_row(name, str(old), str(new), "")
            continue
        delta = new - old
        rel = f" ({delta / old:+.0%})" if old else ""
        fmt = "{:.1%}" if name == "MFU" else "{:,.2f}"
        table.add_row(name, fmt.format(old), fmt.format(new), f"{delta:+,.2f}{rel}")
    console.print(table)
    console.print(f"binding: {b['binding']} → {a['binding']}")
