"""Token tiling of a decoder block's feed-forward half: post-attention norm, MLP or MoE.

Why: the feed-forward half works token by token, yet run on all of a rank's tokens at once it
keeps buffers proportional to all of them alive together: the MoE's top-k routed copies (sorted
tokens, all-to-all buffers, expert GEMM inputs and outputs, the combine) and the MLP's
intermediate activations. Run in tiles of tokens, each under its own activation checkpoint, only
one tile's intermediates are alive at a time, in the forward and in the backward (each tile's
forward is redone just before its backward), as Arctic ALST's TiledMLP does. A MoE tile routes
its own tokens (routing is per token, so dropless results equal the untiled ones) and runs its
own expert-parallel all-to-alls; the expert unit's FSDP hooks run once per tile.

Tiles: `xplan.layout_tiles.tile_count(tokens, tile_tokens)` = ceil(tokens / tile_tokens) near-equal tiles of the
flattened [batch x seq] tokens (`tile_sizes`). A rank with T tokens and a trace of T / f tokens
split into the same number of tiles then differ by the factor f in every tile-sized tensor: the
planner traces a block with the rank's tile count (`TokenTiling(tiles=n)`).

Cost: one more forward of the feed-forward half (each tile's recompute), GEMMs of tile size, and
per tile the expert unit's FSDP gathers and the EP all-to-alls.

Accounting: while a tile's function runs, `current_tile()` names it, and an observer installed
with `observing_tiles` hears each tile start and end (the tracer marks a tile's ops with the tile's
tokens; ops it sees while a tile runs inside the backward are the recompute).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from xplan.layout_tiles import tile_count  # the rule the planner prices (feed_forward_tiles)

from ..observing import ThreadObserver


@dataclass(frozen=True)
class TokenTiling:
    """How a block splits its tokens: at most `tile_tokens` per tile (the layout knob), or a fixed
    number of `tiles` (the tracer, which traces the tile count of the rank it prices)."""

    tile_tokens: int | None = None
    tiles: int | None = None

    def count(self, tokens: int) -> int:
        if self.tiles is not None:
            return max(1, min(self.tiles, tokens))
        return tile_count(tokens, self.tile_tokens)


def tile_sizes(tokens: int, tiles: int) -> list[int]:
    """`tiles` near-equal sizes adding up to `tokens` (the larger ones first)."""
    base, extra = divmod(tokens, tiles)
    return [base + (1 if i < extra else 0) for i in range(tiles)]


@dataclass(frozen=True)
class Tile:
    """The tile whose function is running: its position and token count."""

    index: int
    tiles: int
    tokens: int


_state = threading.local()
_observer = ThreadObserver()


def current_tile() -> Tile | None:
    return getattr(_state, "tile", None)


@contextlib.contextmanager
def observing_tiles(observer: Callable[[Tile | None], None]):
    """Call `observer(tile)` as each tile's function starts and `observer(previous or None)` as it ends."""
    with _observer.installed(observer):
        yield


def _enter(tile: Tile | None) -> None:
    _state.tile = tile
    observer = _observer.current()
    if observer is not None:
        observer(tile)


@contextlib.contextmanager
def _running(tile: Tile):
    previous = current_tile()
    _enter(tile)
    try:
        yield
    finally:
        _enter(previous)


def run_in_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int) -> torch.Tensor:
    """`fn(x)` for a token-wise `fn`, computed on `tiles` tiles of x's tokens (all dims but the last),
    each tile under its own (non-reentrant) activation checkpoint.

    `split` (not slicing) hands each tile a view whose gradients are gathered by one backward node
    into one buffer; slicing would give each tile a full-size zero-padded gradient.
    """
    flat = x.reshape(-1, x.shape[-1])
    sizes = tile_sizes(flat.shape[0], tiles)

    def one_tile(index: int, piece: torch.Tensor) -> torch.Tensor:
        with _running(Tile(index, tiles, piece.shape[0])):
            return fn(piece)

    outs = [checkpoint(one_tile, i, piece, use_reentrant=False) for i, piece in enumerate(flat.split(sizes))]
    out = torch.cat(outs)
    del outs  # the tile outputs are copied into `out`; cat keeps nothing for backward
    return out.view(*x.shape[:-1], out.shape[-1])


__all__ = ["Tile", "TokenTiling", "current_tile", "observing_tiles", "run_in_tiles", "tile_sizes"]
