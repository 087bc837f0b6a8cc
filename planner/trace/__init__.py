"""Tracer and graph IR: the planner sees the model the runtime will run.

`trace_model(config, seq_len, ...)` runs the runtime's own modules forward and backward on fake
tensors under a dispatch-mode recorder and returns a `ModelTrace`: the `networkx.DiGraph` (see
`graph`), per-block-kind summaries (FLOPs, parameters by role, saved bytes per recompute policy,
expected tokens per expert) and model totals. `inspect_fields` is what `xplan inspect --json` adds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import code_version, default_cache_dir
from .flops import attention_fraction
from .graph import export_graphml, graphml_ready
from .tracer import LOSS_KERNELS, ROLES, BlockSummary, ModelTrace, trace_model, training_loss


def inspect_fields(config, seq_len: int, graph_path: str | Path | None = None, *, micro_batch: int = 1,
                   recompute: str = "none", dtype: torch.dtype = torch.bfloat16, loss: str = "full",
                   cache_dir: str | Path | None = None) -> dict:
    """The fields `xplan inspect MODEL --seq-len S --json` adds to its output.

    - `flops_per_token`: training FLOPs per token (forward + backward, causal attention at half,
      recompute excluded) at `seq_len`;
    - `flops_per_token_forward`: the forward part;
    - `activation_bytes_per_token`: {group: {policy: bytes}}, groups `embedding`, each block kind
      (per layer: multiply by `layers[kind]`), `head` (final norm, LM head and loss); policies
      none / selective / full; bytes kept for backward per token of a micro-batch;
    - `layers`: {block kind: number of layers};
    - `trace`: details (seq_len, micro_batch, dtype, params_total/active, per-group FLOPs).
    With `graph_path`, the graph is also written there as GraphML.
    """
    trace = trace_model(config, seq_len, micro_batch=micro_batch, recompute=recompute, dtype=dtype,
                        cache_dir=cache_dir, loss=loss)
    if graph_path is not None:
        export_graphml(trace.graph, graph_path)
    return trace.to_summary()


__all__ = [
    "LOSS_KERNELS",
    "ROLES",
    "BlockSummary",
    "ModelTrace",
    "attention_fraction",
    "code_version",
    "default_cache_dir",
    "export_graphml",
    "graphml_ready",
    "inspect_fields",
    "trace_model",
    "training_loss",
]
