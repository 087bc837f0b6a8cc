"""`xplan validate`: the estimator's predictions against the published-results set."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .app import JSON_OPTION, app, console, console_err, print_json

WIDE_TABLE = 150  # columns from which each field of a case gets a column of its own
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
    loso: bool = typer.Option(False, "--loso", help="Also score each source's rows with every constant fitted on "
                              "them refitted without them (leave one source out)."),
    table: bool = typer.Option(False, "--table", help="Print the markdown per-row table (with --loso), the format "
                               "of cost_models/validation_table.md."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Predicted vs published throughput and memory for every expressible published result.

    Each row of the published-results set (cost_models/published_results.yaml) is mapped onto the
    estimator by cost_models/validation_cases.yaml, or listed with the reason it cannot be.
    error = predicted / published - 1; the summary gives the median and max absolute error of the
    throughput rows (tokens/s, TFLOPS, MFU) and of the memory rows separately, for all rows, the
    held-out ones (no profile constant fitted on them) and the calibration ones. Every priced run is
    fit-checked (allocated peak within the device memory, within 10% of a published peak).

    Examples:
      [bold]xplan validate[/]
      [bold]xplan validate --loso[/]
      [bold]xplan validate --only tt_ --json[/]
      [bold]xplan validate --published cost_models/extended/ascend_910b.yaml --cases cost_models/extended/ascend_910b.yaml[/]
    """
    from xplan.app.validation import run_validation

    paths = {"published_path": published, "cases_path": cases}

    if json_out:
        report = run_validation(only=only, loso=loso, **paths)
        print_json(report.to_dict(details=details))
        return
    if table:
        from xplan.app.validation_table import render

        print(render(run_validation(only=only, loso=True, **paths)), end="")
        return

    with Progress(TextColumn("tracing {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console_err, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        report = run_validation(only=only, progress=progress, loso=loso, **paths)

    # Narrow terminals (CI logs, 80 columns): a row's id, model, hardware and layout stacked in one
    # cell, so the numbers keep one line each instead of every cell folding.
    stacked = console.width < WIDE_TABLE
    table = Table(title="xplan validate: predicted vs published (error = predicted / published - 1)")
    labels = (("case: id, model on hw, layout", "left"),) if stacked else (
        ("id", "left"), ("model", "left"), ("hw", "left"), ("layout", "left"))
    for header, justify in (*labels, ("metric", "left"), ("published", "right"), ("predicted", "right"),
                            ("error", "right"), ("set", "left")):
        if not stacked:
            table.add_column(header, justify=justify, overflow="fold")
        elif header == "set":  # "held-out (known gap)" on two lines
            table.add_column(header, justify=justify, overflow="fold", max_width=11)
        else:  # the case takes what the numbers leave
            table.add_column(header, justify=justify, overflow="fold", no_wrap=header != labels[0][0],
                             ratio=1 if header == labels[0][0] else None)
    for r in report.rows:
        err = f"{r.error:+.1%}"
        if abs(r.error) > 0.25:
            err = f"[red]{err}[/]"
        elif abs(r.error) > 0.10:
            err = f"[yellow]{err}[/]"
        role = "excluded" if r.excluded else "calibration" if r.calibration else "held-out"
        if r.known_gap and not r.excluded:
            role += " (known gap)"
        case = (f"[bold]{escape(r.id)}[/]\n{escape(r.model)} on {escape(r.hardware)}\n{escape(r.layout)}",) if stacked \
            else (r.id, r.model, r.hardware, r.layout)
        table.add_row(*case, _UNITS.get(r.metric, r.metric), _fmt(r.metric, r.published),
                      _fmt(r.metric, r.predicted), err, role, end_section=stacked)
    console.print(table)
    s = report.summary

    def line(label: str, st: dict) -> None:
        if st["count"]:
            console.print(f"{label}: {st['count']} rows, median |error| {_pct(st['median_abs_error'])}, "
                          f"max |error| {_pct(st['max_abs_error'])} ({st['max_id']})", highlight=False)
        else:
            console.print(f"{label}: no rows", highlight=False)

    for kind, label in (("throughput", "throughput (tok/s, TFLOPS, MFU)"), ("memory", "memory")):
        line(label, s[kind])
        line(f"  held-out {kind}", s[kind]["held_out"])
        line(f"  calibration {kind}", s[kind]["calibration"])
    line("throughput without known gaps", s["throughput"]["without_known_gaps"])
    if report.loso is not None:
        console.print(f"leave-one-source-out: {report.loso['note']}", highlight=False, markup=False)
        line("  LOSO throughput", report.loso["summary"]["throughput"])
        line("  LOSO memory", report.loso["summary"]["memory"])
    fits = s["fit_check"]
    console.print(f"fit check: {fits['fit']} of {fits['runs']} priced runs fit"
                  + (f"; misses: {', '.join(fits['misses'])}" if fits["misses"] else "")
                  + (f"; off the published peak: {', '.join(fits['off_published'])}" if fits["off_published"] else ""),
                  highlight=False, markup=False)
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
