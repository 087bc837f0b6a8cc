"""What token tiling of the feed-forward half costs beyond what the trace measures.

The trace of a tiled layout (`ModelTrace.tiles` = the rank's tile count) already holds the
tile-sized GEMMs, each tile's forward redone before its backward, and the tile-sized saved and
backward memory (cost_models/compute.py, memory.py price them as any traced op). The trace runs
on one device, so what expert parallelism and FSDP do per tile is added here:

- EP: each tile dispatches and combines its own tokens: `tiles` all-to-alls of a tile's routed
  copy in place of one (the per-message latency paid `tiles` times), and each tile's recompute
  redoes its dispatch and combine (half of the four per layer) once more (`tile_redo_share`);
- FSDP: with EP the routed experts are their own FSDP unit, whose hooks run once per tile call:
  the experts are gathered again for every tile after the first, in the forward and in the
  backward's recompute (2 x (tiles - 1) gathers and their copies, not prefetched: exposed); the
  gradients are reduced once, after the last tile (autograd sums the tiles' gradients first).
  Without EP the experts sit in the block's unit, gathered once per block.
- memory: the busiest EP rank's gradient all-to-all output is one tile's routed copy
  (`routed_copy_bytes(tokens / tiles)`).
"""

from __future__ import annotations

from xplan.layout_tiles import feed_forward_tiles

from . import comm
from .kernels import memory_time


def check_trace_tiles(trace, layout) -> int:
    """The token tiles a rank of `layout` runs each feed-forward half in per micro-batch, which
    `trace` must have been traced with (`planner.pricing.get_trace(..., tiles=...)`)."""
    tiles = feed_forward_tiles(layout, trace.seq_len)
    if getattr(trace, "tiles", 1) != tiles:
        raise ValueError(f"the layout runs each feed-forward half in {tiles} token tile(s) but the trace has "
                         f"{getattr(trace, 'tiles', 1)}: trace with tiles=feed_forward_tiles(layout, seq_len)")
    return tiles


def tiled_expert_all_to_all_time(profile, rank_tokens: float, hidden: int, top_k: int, layout, act_bytes: int,
                                 imbalance: float, tiles: int) -> float:
    """EP dispatch + combine of one MoE layer and micro-batch, forward and backward, run per tile
    (exactly `comm.expert_parallel_time` untiled). What recompute redoes is `estimate`'s: each
    tile's recompute adds half of this again (`TILE_REDO_SHARE`)."""
    if tiles <= 1:
        return comm.expert_parallel_time(profile, rank_tokens, hidden, top_k, layout, act_bytes, imbalance)
    return tiles * comm.expert_parallel_time(profile, rank_tokens / tiles, hidden, top_k, layout, act_bytes, imbalance)


def tile_redo_share(tiles: int) -> float:
    """Share of a layer's forward that tiling redoes in the backward, on top of the recompute
    policy's: every tile's forward, so its dispatch and combine, run once more."""
    return 1.0 if tiles > 1 else 0.0


def expert_regather_times(profile, routed_numel: float, layout, param_bytes: int, tiles: int) -> tuple[float, float]:
    """(collective seconds, copy seconds) of the expert unit's extra gathers for one MoE layer and
    micro-batch: 2 x (tiles - 1) all-gathers of this rank's routed experts over the expert-FSDP
    group, and FSDP2's copy-in / copy-out around each. Zero untiled, without EP or without FSDP."""
    if tiles <= 1 or layout.ep <= 1 or not routed_numel or layout.zero1 or layout.expert_fsdp <= 1:
        return 0.0, 0.0
    extra = 2 * (tiles - 1)
    gather, _ = comm.fsdp_block_times(profile, 0.0, routed_numel, layout, param_bytes, 4)
    shard = routed_numel / layout.expert_fsdp
    copies = memory_time(profile, extra * (2 * shard * param_bytes + 2 * routed_numel * param_bytes))
    return extra * gather, copies


__all__ = ["check_trace_tiles", "expert_regather_times", "tile_redo_share", "tiled_expert_all_to_all_time"]
