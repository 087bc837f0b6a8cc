"""`xplan run PLAN`: execute a plan (train loop, checkpoints, measured vs predicted), or `--dry-run` it:
the same runtime code at full scale under fake tensors, peak memory per device against the prediction."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import JSON_OPTION, app, console, console_err, print_json


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
    overwrite: bool = typer.Option(False, "--overwrite", help="Start fresh in a --checkpoint-dir that holds "
                                   "another run's checkpoints, removing them (without it that is an error)."),
    accept_plan_changes: bool = typer.Option(False, "--accept-plan-changes", help="--resume even though the plan's "
                                             "training settings (learning rate, schedule, ...) differ from the "
                                             "checkpoint's; the plan's values apply from the resumed step."),
    max_nonfinite_skips: int = typer.Option(0, "--max-nonfinite-skips", help="Skip up to this many steps whose "
                                            "gradients are not finite (weights untouched) before stopping; "
                                            "0: stop at the first."),
    device: str = typer.Option(None, "--device", help="cpu | cuda | npu (default: from the plan's hardware)."),
    metrics: Path = typer.Option(None, "--metrics", help="JSON-lines file with one record per step (default: "
                                 "<checkpoint-dir>/metrics.jsonl, else next to the plan as <plan>.metrics.jsonl)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds before a stuck collective fails the run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run the plan's training step at its full world size "
                                 "and model size on this CPU under fake tensors and a fake process group, and "
                                 "report the largest rank's peak memory against the plan's prediction."),
    layers: int = typer.Option(None, "--layers", help="Dry run: keep this many (>= 3; and, in one more run per "
                               "segment, one more) copies of each repeated block pattern and extrapolate linearly, "
                               "~10x faster (default: every layer)."),
    imbalance: float = typer.Option(None, "--imbalance", help="Dry run: busiest expert-parallel rank's routed "
                                    "load over the mean (default: the plan's predictions.imbalance, else 1)."),
    reprice: bool = typer.Option(False, "--reprice", help="Dry run: compare with the cost model's prediction "
                                 "now instead of the one recorded in the plan."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Execute a plan: FSDP2 / expert / sequence parallelism as laid out, on synthetic or local data.

    On one machine the plan's device count is spawned here (gloo on CPU); under torchrun each
    process reads its rank from the environment.

    Examples:
      [bold]xplan run plan.yaml --steps 20[/]
      [bold]xplan run plan.yaml --checkpoint-dir ckpt --checkpoint-every 100[/]
      [bold]xplan run plan.yaml --checkpoint-dir ckpt --resume --json[/]
      [bold]xplan run plan.yaml --dry-run[/]   (peak memory per device, measured vs predicted)
    """
    from xplan.errors import InputError
    from xplan.plan import load_plan

    loaded = load_plan(plan)
    if not dry_run and (layers is not None or imbalance is not None or reprice):
        raise InputError("--layers, --imbalance and --reprice apply to --dry-run only; add --dry-run or drop them.")
    if dry_run:
        _dry_run(loaded, layers, imbalance, reprice, json_out)
        return
    from xplan.runtime.train import RunOptions, device_type_for, run_plan

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
        overwrite=overwrite,
        accept_plan_changes=accept_plan_changes,
        max_nonfinite_skips=max_nonfinite_skips,
    )
    summary = run_plan(plan, options)
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return
    if json_out:
        print_json(summary)
        return
    render_summary(summary)


def render_summary(summary: dict) -> None:
    """The run summary table (rank 0); on CPU the RSS and the prediction side by side, labelled."""
    table = Table(title="run summary", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    losses = summary["losses"]
    table.add_row("steps", f"{summary['start_step'] + 1}..{summary['end_step']}" if losses else "none to run")
    if losses:
        table.add_row("loss (first → last)", f"{losses[0]:.4f} → {losses[-1]:.4f}")
    table.add_row("step time (median)", _fmt(summary["step_time_s"], ".3f") + " s")
    table.add_row("tokens/s/device", _fmt(summary["tokens_per_s_per_device"], ",.0f"))
    rss = summary["peak_memory_kind"] == "rss_peak"
    if summary["predicted_step_time_s"] is not None:
        table.add_row("step time / predicted", _fmt(summary["step_time_ratio"], ".2f"))
    if rss:  # the process's resident set against model bytes: shown side by side, not as a ratio
        table.add_row("process RSS (Python, torch, model)", _fmt(summary["peak_memory_gib"], ".2f") + " GiB")
        if summary["predicted_peak_gib"] is not None:
            table.add_row("predicted model state + activations", _fmt(summary["predicted_peak_gib"], ".3f") + " GiB")
    else:
        table.add_row(f"peak memory ({summary['peak_memory_kind']})", _fmt(summary["peak_memory_gib"], ".2f") + " GiB")
        if summary["predicted_peak_gib"] is not None:
            table.add_row("peak memory / predicted", _fmt(summary["peak_memory_ratio"], ".2f"))
    for slot, ran in summary.get("kernels_executed", {}).items():
        table.add_row(f"kernel: {slot}", ran)
    for note in summary.get("skipped_checkpoints", []) + [f"plan change: {c}" for c in summary.get("plan_changes", [])]:
        console.print(f"note: {note}", highlight=False, markup=False)
    for key, label in (("resumed_from", "resumed from"), ("checkpoint", "checkpoint"),
                       ("hf_export", "Hugging Face export"),
                       ("metrics_file", "metrics")):
        if summary.get(key):
            table.add_row(label, summary[key])
    console.print(table)
    if rss and summary["predicted_peak_gib"] is not None:
        console.print("note: on CPU the measured memory is the process's resident set, which includes the Python "
                      "interpreter and torch; it is not comparable with the predicted device memory. "
                      "`xplan run --dry-run` checks the prediction like with like.", highlight=False)


def _dry_run(loaded, layers: int | None, imbalance: float | None, reprice: bool, json_out: bool) -> None:
    from xplan.app.dryrun_compare import compare_dry_run
    from xplan.runtime.dryrun import COMPONENTS

    if json_out or not console_err.is_terminal:
        result = compare_dry_run(loaded, layers=layers, imbalance=imbalance, reprice=reprice).to_dict()
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        lay = loaded.layout
        what = "every layer" if layers is None else f"{layers} copies of each block pattern, extrapolated"
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console_err,
                      transient=True) as bar:
            bar.add_task(f"dry run: {escape(loaded.model)} at {lay.devices} ranks under fake tensors ({what}): build, "
                         "parallelize, one training step", total=None)
            result = compare_dry_run(loaded, layers=layers, imbalance=imbalance, reprice=reprice).to_dict()
    if json_out:
        print_json(result)
        return
    lay = result["layout"]
    ranks = f"{result['world_size']} ranks"
    if result["ranks_per_device"] > 1:
        ranks += f" ({result['devices']} devices × {result['ranks_per_device']})"
    title = (f"dry run: {result['model']} on {ranks} (fsdp {lay['fsdp']}, ep {lay['ep']}, "
             f"sp {lay['sp']}, recompute {lay['recompute']}"
             + (f", tile_tokens {lay['tile_tokens']}" if lay.get("tile_tokens") else "")
             + f"), seq {result['seq_len']}, "
             f"micro-batch {lay['micro_batch']} — rank {result['rank']}")
    table = Table(title=title)
    table.add_column("component")
    table.add_column("measured GiB", justify="right")
    table.add_column("predicted GiB", justify="right")
    table.add_column("measured / predicted", justify="right")
    for name in COMPONENTS:
        c = result["components"][name]
        if not c["measured"] and not c["predicted"]:
            continue
        ratio = c["measured"] / c["predicted"] if c["predicted"] else None
        table.add_row(name, f"{c['measured']:.3f}", f"{c['predicted']:.3f}", _fmt(ratio, ".3f"))
    table.add_row("[bold]device peak[/]", f"[bold]{result['measured_peak_gib']:.3f}[/]",
                  f"[bold]{result['predicted_peak_gib']:.3f}[/]", f"[bold]{_fmt(result['ratio'], '.3f')}[/]")
    if result["measured_host_gib"] or result["predicted_host_gib"]:
        for name, c in result["host_components"].items():
            if c["measured"] or c["predicted"]:
                ratio = c["measured"] / c["predicted"] if c["predicted"] else None
                table.add_row(f"host: {name}", f"{c['measured']:.3f}", f"{c['predicted']:.3f}", _fmt(ratio, ".3f"))
        table.add_row("[bold]host peak[/]", f"[bold]{result['measured_host_gib']:.3f}[/]",
                      f"[bold]{result['predicted_host_gib']:.3f}[/]", f"[bold]{_fmt(result['host_ratio'], '.3f')}[/]")
    console.print(table)
    if result["rank_memory_budget_gib"]:
        per = " (per die)" if result["ranks_per_device"] > 1 else ""
        console.print(f"rank memory budget{per}: {result['rank_memory_budget_gib']:.1f} GiB; measured peak "
                      f"{result['measured_over_budget']:.0%} of it", highlight=False)
    console.print(f"peak in {result['peak_phase']} at {result['peak_where']}; phase peaks: "
                  + ", ".join(f"{p} {v['peak_gib']:.2f} GiB" for p, v in result["phases"].items()), highlight=False)
    console.print(f"prediction: {'the plan' if result['predicted_source'] == 'plan' else 'priced now'} "
                  f"(overhead excluded); {result['layers_run']} of {result['layers_total']} layers run"
                  f"{', extrapolated' if result['extrapolated'] else ''}; {result['micro_batches_run']} micro-batch(es) "
                  f"of {result['grad_accum']}; {result['elapsed_s']:.1f} s", highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
