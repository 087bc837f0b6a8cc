"""Tracer and graph IR: the planner sees the model the runtime will run.

`trace_model(config, seq_len, ...)` runs the runtime's own modules forward and backward on fake
tensors under a dispatch-mode recorder and returns a `ModelTrace`: the `networkx.DiGraph` (see
`graph`), per-block-kind summaries (FLOPs, parameters by role, saved bytes per recompute policy,
expected tokens per expert) and model totals. `inspect_fields` is what `xplan inspect --json` adds.

A cached trace loads without torch: the tracer (and torch with it) is imported on a cache miss
only, and the names below that need torch load on first use.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

from . import cache
from .cache import code_version, default_cache_dir
from .model_trace import LOSS_KERNELS, RECOMPUTE_POLICIES, ROLES, BlockSummary, ModelTrace

# Public name -> the module (needing torch or networkx) that defines it.
_LAZY = {"attention_fraction": ".flops", "export_graphml": ".graph", "graphml_ready": ".graph",
         "training_loss": ".tracer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trace_model(config, seq_len: int, micro_batch: int = 1, recompute: str = "none", dtype: Any = "bfloat16",
                cache_dir: str | Path | None = None, use_cache: bool = True, loss: str = "full",
                tiles: int = 1, image_tokens: int = 0) -> ModelTrace:
    """Trace `config` (a ModelConfig, preset name or config directory) at (seq_len, micro_batch).

    `recompute` selects the policy whose saved bytes and recompute FLOPs the graph's layer nodes
    carry; summaries hold every policy. `dtype` is a torch dtype or its name. `loss` is the
    runtime's loss kernel ('full' logits or 'chunked'). `tiles` > 1 runs every block's
    feed-forward half in that many token tiles, the count `xplan.layout_tiles.feed_forward_tiles`
    gives a layout's rank (see `tracer`). `image_tokens` per sample (vision-language models) run
    the vision tower on the images they stand for, first in each sample. Results are cached under
    `cache_dir` (default $XPLAN_CACHE_DIR or ~/.cache/xplan) unless `use_cache` is False.
    """
    from xplan.errors import InputError

    if not hasattr(config, "family"):
        from .configs import load_model_config

        config = load_model_config(config)
    if int(seq_len) < 1 or int(micro_batch) < 1:
        raise InputError(f"seq_len and micro_batch must be positive; got {seq_len} and {micro_batch}.")
    if recompute not in RECOMPUTE_POLICIES:
        raise InputError(f"recompute policy must be one of {', '.join(RECOMPUTE_POLICIES)}; got {recompute!r}")
    if loss not in LOSS_KERNELS:
        raise InputError(f"loss kernel must be one of {', '.join(LOSS_KERNELS)}; got {loss!r}.")
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= int(seq_len) * int(micro_batch):
        raise InputError(f"tiles must be a whole number between 1 and the traced tokens; got {tiles!r}.")
    seq_len, micro_batch = int(seq_len), int(micro_batch)
    from xplan.runtime.models.vlm_config import check_image_tokens

    check_image_tokens(config, image_tokens, seq_len)
    key = (cache.cache_key(config, seq_len, micro_batch, recompute, dtype, loss, tiles, image_tokens)
           if use_cache else None)
    if key is not None:
        hit = cache.load(cache_dir, key)
        if hit is not None and (hit.seq_len, hit.micro_batch, hit.recompute, hit.loss, hit.dtype, hit.tiles) == (
                seq_len, micro_batch, recompute, loss, cache.dtype_name(dtype), tiles):
            hit.from_cache = True
            return hit
    from .tracer import trace_uncached

    trace = trace_uncached(config, seq_len, micro_batch, recompute, dtype, loss, tiles, image_tokens)
    if key is not None:
        cache.store_trace(cache_dir, key, trace)
    return trace


def inspect_fields(config, seq_len: int, graph_path: str | Path | None = None, *, micro_batch: int = 1,
                   recompute: str = "none", dtype: Any = "bfloat16", loss: str = "full",
                   cache_dir: str | Path | None = None, image_tokens: int = 0) -> dict:
    """The fields `xplan inspect MODEL --seq-len S --json` adds to its output (`image_tokens` per
    sample run a vision-language model's tower: its group `vision`, the whole tower).

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
                        cache_dir=cache_dir, loss=loss, image_tokens=image_tokens)
    if graph_path is not None:
        from .graph import export_graphml

        export_graphml(trace.graph, graph_path)
    return trace.to_summary()


__all__ = [
    "LOSS_KERNELS",
    "RECOMPUTE_POLICIES",
    "ROLES",
    "BlockSummary",
    "ModelTrace",
    "attention_fraction",
    "cache",
    "code_version",
    "default_cache_dir",
    "export_graphml",
    "graphml_ready",
    "inspect_fields",
    "trace_model",
    "training_loss",
]
