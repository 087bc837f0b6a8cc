"""`xplan inspect MODEL`: what the model is, counted from the runtime's own modules."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import options as opt
from .app import JSON_OPTION, app, console, human_count, print_json


def inspect_summary(model_ref: str, seq_len: int, graph: Path | None = None, image_tokens: int = 0) -> dict:
    from xplan.planner.pricing import check_seq_len
    from xplan.planner.trace import inspect_fields
    from xplan.planner.trace.configs import load_model_config, parameter_counts

    check_seq_len(seq_len)
    config = load_model_config(model_ref)
    counts = parameter_counts(config)

    traced = inspect_fields(config, seq_len, graph_path=graph, image_tokens=image_tokens)
    return {
        "model": config.name,
        "model_type": config.model_type,
        "seq_len": seq_len,
        **({"image_tokens": image_tokens} if image_tokens else {}),
        "params_total": counts.total,
        "params_active": counts.active,
        "params_routed_experts": counts.routed_experts,
        "params_vision": counts.vision,
        "params_language_active": counts.active - counts.vision,
        "num_layers": config.num_layers,
        "layers": counts.layers_by_kind,
        "flops_per_token": traced["flops_per_token"],
        "flops_per_token_forward": traced["flops_per_token_forward"],
        "activation_bytes_per_token": traced["activation_bytes_per_token"],
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "vision": _vision_summary(config),
    }


def _vision_summary(config) -> dict | None:
    if not config.is_vlm:
        return None
    spec = config.vision_spec
    return {"num_layers": spec.num_layers, "hidden_size": spec.hidden_size, "num_heads": spec.num_heads,
            "image_size": list(spec.image_size), "patches_per_image": spec.patches_per_image,
            "image_tokens_per_image": spec.tokens_per_image}


def _selective_note(model: str, seq_len: int, activation_bytes: dict, image_tokens: int = 0) -> str | None:
    """Why selective recompute keeps more than none, when it does (names the largest outputs)."""
    from xplan.app.report_explain import selective_note

    if selective_note(activation_bytes) is None:
        return None
    from xplan.planner.trace import trace_model

    trace = trace_model(model, seq_len, micro_batch=1, loss="full", image_tokens=image_tokens)  # cached: just read
    return selective_note(activation_bytes, trace)


@app.command("inspect")
def inspect(
    model: str = typer.Argument(..., help="Preset name (see `xplan models`) or a directory with config.json."),
    seq_len: int = typer.Option(4096, "--seq-len", help="Sequence length for per-token figures."),
    graph: Path = typer.Option(None, "--graph", help="Write the traced graph to this .graphml file."),
    image_tokens: int = opt.IMAGE_TOKENS,
    images: int | None = opt.IMAGES,
    json_out: bool = JSON_OPTION,
) -> None:
    """Summarise a model from a trace of the runtime's own code: parameters (total and active per
    token), layers by kind, training FLOPs per token and activation bytes per recompute policy.

    Examples:
      [bold]xplan inspect qwen3-30b-a3b[/]
      [bold]xplan inspect ./my-model-dir --seq-len 8192 --json[/]
      [bold]xplan inspect intern-s1 --images 4[/]
    """
    from xplan.planner.pricing import image_tokens_of

    image_tokens = image_tokens_of(model, image_tokens, images)
    summary = inspect_summary(model, seq_len, graph, image_tokens)
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"{summary['model']} ({summary['model_type']})", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", human_count(summary["params_total"]))
    table.add_row("parameters (active per token)", human_count(summary["params_active"]))
    if summary["params_vision"]:
        table.add_row("  vision tower + projector", human_count(summary["params_vision"]))
        table.add_row("  language model (active per token)", human_count(summary["params_language_active"]))
        v = summary["vision"]
        table.add_row("vision tower", f"{v['num_layers']} layers, hidden {v['hidden_size']}, {v['num_heads']} heads; "
                      f"{v['image_tokens_per_image']} image tokens per {v['image_size'][0]}x{v['image_size'][1]} image")
    table.add_row("layers", ", ".join(f"{n} {kind}" for kind, n in summary["layers"].items()))
    table.add_row("hidden / heads / kv heads",
                  f"{summary['hidden_size']} / {summary['num_heads']} / {summary['num_kv_heads']}")
    if summary["num_experts"]:
        table.add_row("experts (top-k)", f"{summary['num_experts']} ({summary['top_k']})")
    table.add_row(f"training FLOPs/token at seq {seq_len}", f"{summary['flops_per_token'] / 1e9:.2f} G")
    console.print(table)
    acts = Table(title="activation bytes kept for backward, per token (per layer for blocks)")
    acts.add_column("group")
    for policy in ("none", "selective", "full"):
        acts.add_column(f"recompute={policy}", justify="right")
    for group, by_policy in summary["activation_bytes_per_token"].items():
        if group == "vision" and not image_tokens:
            continue  # the tower runs only on images (--image-tokens / --images)
        label = f"vision (whole tower, {image_tokens} image tokens)" if group == "vision" else group
        acts.add_row(label, *(f"{by_policy[p] / 1024:.1f} KiB" for p in ("none", "selective", "full")))
    console.print(acts)
    note = _selective_note(model, seq_len, summary["activation_bytes_per_token"], image_tokens)
    if note:
        console.print(f"note: {note}", highlight=False)
    if graph is not None:
        console.print(f"graph written to {graph}")
