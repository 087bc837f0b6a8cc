"""The `tile_tokens` knob's rules, beside `xplan/layout.py` which declares it: how a value is read,
that it does not combine with selective recompute, and how many token tiles a block's
feed-forward half runs in. The runtime splits that many near-equal tiles
(xplan.runtime.models.tiling); the planner traces the same count."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from xplan.errors import InputError

MAX_TILE_TOKENS = 2**24  # the longest sequence priced (planner.pricing.MAX_SEQ_LEN)
TILE_TOKENS_HELP = (
    "Most tokens per tile of each block's feed-forward half (norm, MLP or MoE with its routing and "
    "all-to-alls), run tile by tile under a checkpoint each: one tile's intermediates alive at a time, one "
    "more forward of the half. 0 or unset: untiled. Not with selective recompute.")


def parse_tile_tokens(value: Any) -> int | None:
    """None, 'none' or 0: untiled; else a whole number of tokens (bounds checked by the field)."""
    if value is None or value == "none" or (type(value) is int and value == 0):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"tile_tokens must be a whole number of tokens (0 or none: untiled), got {value!r}.")
    return None if value == 0 else value


def not_with_selective(value: int | None, info: ValidationInfo) -> int | None:
    """A rule between knobs: selective recompute keeps every GEMM output, tile-sized or not, the
    intermediates tiling exists to drop (recompute is declared, so validated, before tile_tokens)."""
    if value is not None and (info.data or {}).get("recompute") == "selective":
        raise ValueError("tile_tokens needs recompute none, full or a fraction, not selective (which keeps "
                         "every GEMM output, the tile-sized intermediates tiling exists to drop)")
    return value


TileTokens = Annotated[Annotated[int, Field(ge=1, le=MAX_TILE_TOKENS)] | None, BeforeValidator(parse_tile_tokens),
                       AfterValidator(not_with_selective)]


def tile_count(tokens: int, tile_tokens: int | None) -> int:
    """Tiles of at most `tile_tokens` that `tokens` tokens split into (1: untiled; None or 0: untiled).
    The runtime splits them evenly (xplan.runtime.models.tiling.tile_sizes)."""
    if not tile_tokens or tokens <= tile_tokens:
        return 1
    return -(-tokens // tile_tokens)


def feed_forward_tiles(layout, seq_len: int) -> int:
    """Token tiles each block's feed-forward half runs in on a rank of `layout`: its tokens per
    micro-batch (micro_batch x seq_len / sp) in tiles of at most `tile_tokens` (1: untiled)."""
    return tile_count(layout.micro_batch * seq_len // layout.sp, layout.tile_tokens)


__all__ = ["MAX_TILE_TOKENS", "TILE_TOKENS_HELP", "TileTokens", "feed_forward_tiles", "parse_tile_tokens",
           "tile_count"]
