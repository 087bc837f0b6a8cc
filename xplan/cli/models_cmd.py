"""`xplan models`: the shipped model presets."""

from __future__ import annotations

from rich.table import Table

from .app import JSON_OPTION, app, console, human_count, print_json


def preset_rows() -> list[dict]:
    # Configs and counts come from the cache after the first run (no torch, no transformers).
    from xplan.planner.trace.configs import load_model_config, parameter_counts
    from xplan.runtime.models.config import preset_names

    rows = []
    for name in preset_names():
        config = load_model_config(name)
        counts = parameter_counts(config)
        rows.append({
            "name": name, "model_type": config.model_type, "num_layers": config.num_layers,
            "hidden_size": config.hidden_size, "num_experts": config.num_experts, "top_k": config.top_k,
            "params_total": counts.total, "params_active": counts.active,
        })
    return rows


@app.command("models")
def models(json_out: bool = JSON_OPTION) -> None:
    """List the model presets (Hugging Face config.json contents shipped with xplan).

    Any directory holding a config.json of a supported family works wherever a preset does.

    Example: [bold]xplan models --json[/]
    """
    rows = preset_rows()
    if json_out:
        print_json({"models": rows})
        return
    table = Table(title="model presets")
    for col in ("name", "model_type", "layers", "hidden", "experts (top-k)", "params", "active"):
        table.add_column(col, justify="left" if col in ("name", "model_type") else "right", no_wrap=col == "name")
    for r in rows:
        experts = f"{r['num_experts']} ({r['top_k']})" if r["num_experts"] else "-"
        table.add_row(r["name"], r["model_type"], str(r["num_layers"]), str(r["hidden_size"]), experts,
                      human_count(r["params_total"]), human_count(r["params_active"]))
    console.print(table)
