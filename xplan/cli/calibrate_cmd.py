"""`xplan calibrate [-o profile.yaml]`: measure this machine into a hardware profile.

The command joins two layers: ``xplan.hw_profiles.calibrate`` measures and assembles the
profile, ``xplan.cost_models.fit`` fits its constants with the cost formulas they feed.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from .app import JSON_OPTION, app, console, console_err, print_json


def run_calibration(processes: int = 2, threads: int | None = None, quick: bool = False, device: str | None = None,
                    name: str | None = None, command: str = "xplan calibrate", progress=None, collectives: bool = True,
                    sweep=None):
    """Measure this machine, fit the profile's constants to the measurements and build the
    profile (a ``Calibration``). Options as ``xplan.hw_profiles.calibrate.prepare``; ``progress``
    is called with (done, total, label) after every measurement."""
    from xplan.cost_models.fit import fit_calibration
    from xplan.hw_profiles.calibrate import build_profile, measure, prepare

    setup, profile_name = prepare(processes, threads, quick, device, name, collectives, sweep)
    data = measure(setup, progress)
    return build_profile(data, setup, fit_calibration(data, setup.device == "cpu"), profile_name, command)


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr (stdout stays clean for the YAML or JSON)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]calibrate[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=console_err, transient=True, disable=not enabled)


@app.command("calibrate")
def calibrate(
    output: Path = typer.Option(None, "--output", "-o", help="Write the profile here (default: print the YAML)."),
    processes: int = typer.Option(2, "--processes", help="Ranks the profile is for: that many local processes "
                                  "run the compute sweep at once and the collectives (at least 2 for collectives)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per process (default: cores / processes, "
                                "what `xplan run` gives each rank)."),
    device: str = typer.Option(None, "--device", help="cpu | cuda | npu (default: an accelerator if present)."),
    name: str = typer.Option(None, "--name", help="The profile's name (default: cpu, or the accelerator's model)."),
    quick: bool = typer.Option(False, "--quick", help="A reduced sweep (seconds, for smoke tests; noisier)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure this machine (GEMMs incl. grouped, kernel overhead, memory and host-link bandwidth,
    attention, collectives between local processes) into a hardware profile the estimator uses.

    On CPU one device is one rank of an N-process `xplan run` (--processes N): calibrate with the
    process count you will run. Takes a few minutes; --quick takes seconds.

    Examples:
      [bold]xplan calibrate -o my-cpu.yaml[/]
      [bold]xplan calibrate --processes 1 --name cpu-1rank -o cpu-1rank.yaml[/]
      [bold]xplan estimate MODEL my-cpu.yaml --devices 2[/]
    """
    from xplan.errors import InputError
    from xplan.hw_profiles import save_profile

    if output is not None and (output.is_dir() or not output.parent.exists()):
        raise InputError(f"cannot write the profile to {output}: "
                         f"{'it is a directory' if output.is_dir() else 'its folder does not exist'}; "
                         "pass a file path such as -o my-cpu.yaml")
    command = "xplan calibrate" + "".join(f" {shlex.quote(a)}" for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "calibrate" else "xplan calibrate"
    with _progress_bar(enabled=console_err.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        result = run_calibration(processes=processes, threads=threads, quick=quick, device=device, name=name,
                                 command=command, progress=progress)
    if output is not None:
        try:
            save_profile(result.profile, output, header=result.header)
        except OSError as exc:
            raise InputError(f"cannot write the profile to {output}: {exc.strerror or exc}") from None
    if json_out:
        print_json({"output": str(output) if output is not None else None, "summary": result.summary(),
                    "profile": result.profile.to_dict(), "measurements": result.measurements})
        return
    if output is None:
        typer.echo(result.yaml_text(), nl=False)
        return
    s = result.summary()
    table = Table(title=f"calibrated profile {s['name']!r} → {output}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("device", f"{s['device']} ({s['processes']} process(es) x {s['threads']} thread(s))")
    for dtype, tflops in s["peak_tflops"].items():
        if tflops:
            table.add_row(f"GEMM peak {dtype}", f"{tflops * 1e3:,.1f} GFLOPS")
    table.add_row("per-kernel overhead", f"{s['kernel_overhead_us']:.1f} us")
    table.add_row("memory bandwidth (eager ops)", f"{s['memory_gbps']:.2f} GB/s")
    table.add_row("memory copy (STREAM)", f"{s['copy_gbps']:.2f} GB/s")
    table.add_row("host link", f"{s['host_link_gbps']:.2f} GB/s")
    table.add_row("attention fwd / bwd max fraction",
                  f"{s['attention_fraction']['forward']:.2f} / {s['attention_fraction']['backward']:.2f}")
    for kind, gbps in s["collective_busbw_gbps"].items():
        table.add_row(f"{kind} bus bandwidth", f"{gbps:.3g} GB/s")
    table.add_row("collective latency per step", f"{s['collective_latency_us']:.0f} us")
    console.print(table)
