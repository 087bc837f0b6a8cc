"""The typer app and the output helpers every command shares."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="xplan",
    help="Plan, price and run parallel layouts (FSDP, EP, Ulysses, recompute, offload) for large "
    "dense and MoE transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
console_err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from xplan import __version__

        typer.echo(f"xplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print xplan's version and exit.")) -> None:
    pass

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def print_json(obj: Any) -> None:
    """One JSON object on stdout (nothing else is printed there in --json mode)."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
