"""`xplan run PLAN`: execute a plan (train loop, checkpoints, measured vs predicted)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import JSON_OPTION, app, console, print_json


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@app.command("run")
def run(
    plan: Path = typer.Argument(..., help="Plan file written by `xplan search` (or by hand)."),
    steps: int = typer.Option(None, "--steps", help="Run until this many optimizer steps are done "
                              "(default: the plan's training.steps; the LR schedule always spans the plan's)."),
    checkpoint_dir: Path = typer.Option(None, "--checkpoint-dir", help="Save sharded checkpoints here (and "
                                        "the final model in Hugging Face layout under <dir>/hf)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every K steps (0: only at "
                                         "the end of the run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in "
                                "--checkpoint-dir (exact: model, optimizer, LR schedule, data position, RNG)."),
    device: str = typer.Option(None, "--device", help="cpu | cuda | npu (default: from the plan's hardware)."),
    metrics: Path = typer.Option(None, "--metrics", help="JSON-lines file with one record per step (default: "
                                 "<checkpoint-dir>/metrics.jsonl, else next to the plan as <plan>.metrics.jsonl)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds before a stuck collective fails the run."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Execute a plan: FSDP2 / expert / sequence parallelism as laid out, on synthetic or local data.

    On one machine the plan's device count is spawned here (gloo on CPU); under torchrun each
    process reads its rank from the environment.

    Examples:
      [bold]xplan run plan.yaml --steps 20[/]
      [bold]xplan run plan.yaml --checkpoint-dir ckpt --checkpoint-every 100[/]
      [bold]xplan run plan.yaml --checkpoint-dir ckpt --resume --json[/]
    """
    from xplan.planner.plan import load_plan
    from xplan.runtime.train import RunOptions, device_type_for, run_plan

    loaded = load_plan(plan)
    if metrics is None:
        metrics = (checkpoint_dir / "metrics.jsonl") if checkpoint_dir else plan.with_suffix(".metrics.jsonl")
    options = RunOptions(
        steps=steps,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        device_type=device_type_for(loaded.hardware, device),
        metrics_path=str(metrics),
        live=not json_out,
        timeout_s=timeout,
    )
    summary = run_plan(plan, options)
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return
    if json_out:
        print_json(summary)
        return
    table = Table(title="run summary", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    losses = summary["losses"]
    table.add_row("steps", f"{summary['start_step'] + 1}..{summary['end_step']}" if losses else "none to run")
    if losses:
        table.add_row("loss (first → last)", f"{losses[0]:.4f} → {losses[-1]:.4f}")
    table.add_row("step time (median)", _fmt(summary["step_time_s"], ".3f") + " s")
    table.add_row("tokens/s/device", _fmt(summary["tokens_per_s_per_device"], ",.0f"))
    table.add_row(f"peak memory ({summary['peak_memory_kind']})", _fmt(summary["peak_memory_gib"], ".2f") + " GiB")
    if summary["predicted_step_time_s"] is not None:
        table.add_row("step time / predicted", _fmt(summary["step_time_ratio"], ".2f"))
    if summary["predicted_peak_gib"] is not None:
        table.add_row("peak memory / predicted", _fmt(summary["peak_memory_ratio"], ".2f"))
    for key, label in (("checkpoint", "checkpoint"), ("hf_export", "Hugging Face export"),
                       ("metrics_file", "metrics")):
        if summary.get(key):
            table.add_row(label, summary[key])
    console.print(table)
