"""`xplan validate`: the estimator's predictions against the published-results set."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .app import JSON_OPTION, app, console, console_err, print_json

_UNITS = {"tokens_per_s_per_gpu": "tok/s", "tflops_per_gpu": "TFLOPS", "memory_gib": "GiB", "mfu": "MFU"}


def _fmt(metric: str, value: float) -> str:
    if metric == "mfu":
        return f"{value:.1%}"
    if metric == "memory_gib":
        return f"{value:.1f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


@app.command("validate")
def validate(
    only: str = typer.Option(None, "--only", help="Validate only the rows whose id contains this text."),
    details: bool = typer.Option(False, "--details", help="With --json: include each row's full estimate."),
    published: str = typer.Option(None, "--published", help="A published-results YAML (`results:`) to validate "
                                  "instead of the shipped set, e.g. your own cluster's measurements."),
    cases: str = typer.Option(None, "--cases", help="The cases YAML mapping those rows onto the estimator "
                              "(`models:`, `cases:`; may be the same file as --published)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Predicted vs published throughput and memory for every expressible published result.

    Each row of the published-results set (cost_models/published_results.yaml) is mapped onto the
    estimator by cost_models/validation_cases.yaml, or listed with the reason it cannot be.
    error = predicted / published - 1; the summary gives the median and max absolute error of the
    throughput rows (tokens/s, TFLOPS, MFU) and of the memory rows separately.

    Examples:
      [bold]xplan validate[/]
      [bold]xplan validate --only tt_ --json[/]
      [bold]xplan validate --published cost_models/extended/ascend_910b.yaml --cases cost_models/extended/ascend_910b.yaml[/]
    """
    from xplan.app.validation import run_validation

    paths = {"published_path": published, "cases_path": cases}

    if json_out:
        report = run_validation(only=only, **paths)
        print_json(report.to_dict(details=details))
        return

    with Progress(TextColumn("tracing {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console_err, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        report = run_validation(only=only, progress=progress, **paths)

    table = Table(title="xplan validate: predicted vs published (error = predicted / published - 1)")
    for header, justify in (("id", "left"), ("model", "left"), ("hw", "left"), ("layout", "left"),
                            ("metric", "left"), ("published", "right"), ("predicted", "right"),
                            ("error", "right")):
        table.add_column(header, justify=justify, overflow="fold")
    for r in report.rows:
        err = f"{r.error:+.1%}"
        if abs(r.error) > 0.25:
            err = f"[red]{err}[/]"
        elif abs(r.error) > 0.10:
            err = f"[yellow]{err}[/]"
        table.add_row(r.id, r.model, r.hardware, r.layout, _UNITS.get(r.metric, r.metric),
                      _fmt(r.metric, r.published), _fmt(r.metric, r.predicted), err)
    console.print(table)
    s = report.summary
    for kind, label in (("throughput", "throughput (tok/s, TFLOPS, MFU)"), ("memory", "memory")):
        st = s[kind]
        if st["count"]:
            console.print(f"{label}: {st['count']} rows, median |error| {_pct(st['median_abs_error'])}, "
                          f"max |error| {_pct(st['max_abs_error'])} ({st['max_id']})", highlight=False)
        else:
            console.print(f"{label}: no rows", highlight=False)
    console.print(f"validated in {report.elapsed_s:.1f} s", highlight=False)
    if report.failed:
        console.print("[bold red]cases the estimator rejected:[/]")
        for f in report.failed:
            console.print(f"  {f['id']}: {f['error']}", highlight=False)
    if report.not_expressible:
        ne = Table(title="not expressible")
        ne.add_column("id", overflow="fold")
        ne.add_column("reason", overflow="fold")
        for n in report.not_expressible:
            ne.add_row(n.id, n.reason)
        console.print(ne)
    if report.failed:
        raise typer.Exit(1)
