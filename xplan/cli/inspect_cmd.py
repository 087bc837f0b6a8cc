"""`xplan inspect MODEL`: what the model is, counted from the runtime's own modules."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import JSON_OPTION, app, console, human_count, print_json


def inspect_summary(model_ref: str, seq_len: int) -> dict:
    from xplan.errors import InputError
    from xplan.runtime import build_model, load_config
    from xplan.runtime.models.counting import count_parameters

    if seq_len < 1:
        raise InputError(f"--seq-len must be a positive integer, got {seq_len}.")
    config = load_config(model_ref)
    counts = count_parameters(build_model(config, device="meta"))
    return {
        "model": config.name,
        "model_type": config.model_type,
        "seq_len": seq_len,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_routed_experts": counts.routed_experts,
        "num_layers": config.num_layers,
        "layers": counts.layers_by_kind,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "num_experts": config.num_experts,
        "top_k": config.top_k,
    }


@app.command("inspect")
def inspect(
    model: str = typer.Argument(..., help="Preset name (see `xplan models`) or a directory with config.json."),
    seq_len: int = typer.Option(4096, "--seq-len", help="Sequence length for per-token figures."),
    graph: Path = typer.Option(None, "--graph", help="Write the traced graph to this .graphml file."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Summarise a model: parameters (total and active per token), layers by kind.

    Examples:
      [bold]xplan inspect qwen3-30b-a3b[/]
      [bold]xplan inspect ./my-model-dir --seq-len 8192 --json[/]
    """
    summary = inspect_summary(model, seq_len)
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"{summary['model']} ({summary['model_type']})", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", human_count(summary["params_total"]))
    table.add_row("parameters (active per token)", human_count(summary["params_active"]))
    table.add_row("layers", ", ".join(f"{n} {kind}" for kind, n in summary["layers"].items()))
    table.add_row("hidden / heads / kv heads",
                  f"{summary['hidden_size']} / {summary['num_heads']} / {summary['num_kv_heads']}")
    if summary["num_experts"]:
        table.add_row("experts (top-k)", f"{summary['num_experts']} ({summary['top_k']})")
    console.print(table)
