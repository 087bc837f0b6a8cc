"""Exact causal attention computed a block of queries at a time, for what SDPA's fused kernels on
this backend do not take: GPT-OSS sinks, sliding windows, query shards at an offset, and value
widths unlike the query width (DeepSeek's MLA: 192 / 128) off CUDA.

torch's math fallback for those cases keeps [batch, heads, seq, seq] scores and probabilities
alive (for DeepSeek-V3 at 4k tokens, 25 GiB per layer in backward). Here the forward keeps only
q, k, v, the output and one fp32 log-sum-exp per query row; the backward rebuilds each block's
probabilities from them (the FlashAttention recipe, in plain torch ops), so the working set is one
block's [batch, heads, rows, keys] scores, rows = seq / `MAX_BLOCKS` (a sliding window also
bounds the keys). Each block is a full
softmax over all the keys its rows may see (no online rescaling: queries, not keys, are blocked).

A sink (one logit per head) joins each row's softmax without a value: it only enlarges the
normaliser, so the output rows are the sink-free ones scaled by Z / (Z + e^sink), and its gradient
is -sum_rows p_sink * rowsum(dO * O).

Accounting. The tracer prices attention matmuls by the (query, key) pairs the mask keeps; a block
computes a rectangle of which only part is kept, so each matmul runs inside `counting(...)`, which
tells the tracer the block's kept and computed pairs (`current_block()`), and the backward's
recomputation of the scores is marked as kernel recompute (kept pairs 0).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

MAX_BLOCKS = 32  # query blocks per attention call: the working set is ~1/32 of the math path's
MIN_BLOCK_ROWS = 512  # fewer, larger blocks below 16k tokens: a traced step stays fast


@dataclass(frozen=True)
class BlockCount:
    """(query, key) pairs of one block's matmul, for the tracer's model-FLOP accounting."""

    kept: int  # pairs the mask keeps in this block (0: kernel recompute, not model FLOPs)
    computed: int  # pairs the matmul computes (rows x keys)
    kept_total: int  # pairs the mask keeps over the whole attention
    seq_q: int
    seq_k: int
    window: int | None


_state = threading.local()


def current_block() -> BlockCount | None:
    """The block whose matmul is running on this thread, if any."""
    return getattr(_state, "block", None)


def in_kernel() -> bool:
    """Whether this thread runs inside `blockwise_attention`'s forward or backward: the ops a
    fused attention kernel (FlashAttention, cuDNN) would do in its registers (the tracer marks them)."""
    return getattr(_state, "kernel", False)


@contextlib.contextmanager
def _kernel():
    previous = in_kernel()
    _state.kernel = True
    try:
        yield
    finally:
        _state.kernel = previous


@contextlib.contextmanager
def counting(block: BlockCount):
    previous = current_block()
    _state.block = block
    try:
        yield
    finally:
        _state.block = previous


def _key_range(start: int, stop: int, q_offset: int, seq_k: int, window: int | None) -> tuple[int, int]:
    """Keys the queries at global positions [start + q_offset, stop + q_offset) may see."""
    first = 0 if window is None else max(0, start + q_offset - window + 1)
    return first, min(seq_k, stop + q_offset)


def _kept_pairs(start: int, stop: int, q_offset: int, seq_k: int, window: int | None) -> int:
    total = 0
    for p in range(start + q_offset, stop + q_offset):
        last = min(p, seq_k - 1)
        first = 0 if window is None else max(0, p - window + 1)
        total += max(0, last - first + 1)
    return total


def block_rows(seq_q: int) -> int:
    """Query rows per block: a fixed share of the sequence (at least MIN_BLOCK_ROWS), so a
    block's scores scale with batch x heads x seq^2 / MAX_BLOCKS like every other activation
    (micro-batch, Ulysses head split) and a traced step runs at most MAX_BLOCKS blocks."""
    return min(seq_q, max(MIN_BLOCK_ROWS, -(-seq_q // MAX_BLOCKS)))


def _plan(q: torch.Tensor, k: torch.Tensor, q_offset: int, window: int | None):
    seq_q, seq_k = q.shape[2], k.shape[2]
    rows = block_rows(seq_q)
    blocks = []
    for start in range(0, seq_q, rows):
        stop = min(seq_q, start + rows)
        k0, k1 = _key_range(start, stop, q_offset, seq_k, window)
        blocks.append((start, stop, k0, k1, _kept_pairs(start, stop, q_offset, seq_k, window)))
    kept_total = sum(blk[4] for blk in blocks)
    return blocks, kept_total


def _scores(q_blk, k_rng, scale: float, start: int, k0: int, q_offset: int, window: int | None, count: BlockCount):
    """Scaled scores of one block in the accumulation dtype, masked entries at -inf."""
    with counting(count):
        scores = torch.matmul(q_blk, k_rng.transpose(-1, -2)).to(_acc(q_blk)) * scale
    # Key j is hidden from query i (block-local indices) when j - i > start + q_offset - k0, and,
    # under a sliding window, when i - j >= window - (start + q_offset - k0).
    shift = start + q_offset - k0
    hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu_(shift + 1)
    if window is not None:
        hidden |= torch.ones_like(hidden).tril_(shift - window)
    return scores.masked_fill(hidden, float("-inf"))


def _acc(t: torch.Tensor) -> torch.dtype:
    """Softmax and gradient accumulation dtype: fp32, or the inputs' when wider."""
    return torch.promote_types(t.dtype, torch.float32)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale: float, window, q_offset: int):
        with _kernel():
            return _BlockwiseAttention._forward(ctx, q, k, v, sinks, scale, window, q_offset)

    @staticmethod
    def _forward(ctx, q, k, v, sinks, scale: float, window, q_offset: int):
        blocks, kept_total = _plan(q, k, q_offset, window)
        seq_q, seq_k = q.shape[2], k.shape[2]
        # Laid out [b, s, h, dv] like the fused kernels' output, so the caller's transpose back to
        # tokens-major is free (no second copy of the output kept for the output projection).
        b, h = q.shape[:2]
        out = q.new_empty(b, seq_q, h, v.shape[-1]).transpose(1, 2)
        acc = _acc(q)
        lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
        sink = sinks.to(acc).reshape(1, -1, 1) if sinks is not None else None
        for start, stop, k0, k1, kept in blocks:
            rows, keys = stop - start, k1 - k0
            count = BlockCount(kept, rows * keys, kept_total, seq_q, seq_k, window)
            scores = _scores(q[:, :, start:stop], k[:, :, k0:k1], scale, start, k0, q_offset, window, count)
            row_lse = torch.logsumexp(scores, dim=-1)
            if sink is not None:
                row_lse = torch.logaddexp(row_lse, sink)
            probs = torch.exp(scores - row_lse.unsqueeze(-1)).to(v.dtype)
            with counting(count):
                out[:, :, start:stop] = torch.matmul(probs, v[:, :, k0:k1])
            lse[:, :, start:stop] = row_lse
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.config = (scale, window, q_offset, blocks, kept_total)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _kernel():
            return _BlockwiseAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        scale, window, q_offset, blocks, kept_total = ctx.config
        seq_q, seq_k = q.shape[2], k.shape[2]
        acc = _acc(q)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        grad_sinks = torch.zeros(q.shape[1], dtype=acc, device=q.device) if sinks is not None else None
        for start, stop, k0, k1, kept in blocks:
            rows, keys = stop - start, k1 - k0
            count = BlockCount(kept, rows * keys, kept_total, seq_q, seq_k, window)
            q_blk, k_rng, v_rng = q[:, :, start:stop], k[:, :, k0:k1], v[:, :, k0:k1]
            d_out = grad_out[:, :, start:stop]
            row_lse = lse[:, :, start:stop]
            recompute = BlockCount(0, rows * keys, kept_total, seq_q, seq_k, window)
            probs = torch.exp(_scores(q_blk, k_rng, scale, start, k0, q_offset, window, recompute)
                              - row_lse.unsqueeze(-1))
            # rowsum(dO * O): the softmax Jacobian's correction term (the sink adds nothing to O).
            delta = (d_out.to(acc) * out[:, :, start:stop].to(acc)).sum(-1)
            with counting(count):
                d_probs = torch.matmul(d_out, v_rng.transpose(-1, -2)).to(acc)
                grad_v[:, :, k0:k1] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), d_out).to(acc)
            d_scores = (probs * (d_probs - delta.unsqueeze(-1)) * scale).to(q.dtype)
            with counting(count):
                grad_q[:, :, start:stop] = torch.matmul(d_scores, k_rng)
                grad_k[:, :, k0:k1] += torch.matmul(d_scores.transpose(-1, -2), q_blk).to(acc)
            if grad_sinks is not None:
                p_sink = torch.exp(sinks.to(acc).reshape(1, -1, 1) - row_lse)
                grad_sinks -= (p_sink * delta).sum(dim=(0, 2))
        if grad_sinks is not None:
            grad_sinks = grad_sinks.to(sinks.dtype)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_sinks, None, None, None


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                        q_offset: int = 0) -> torch.Tensor:
    """Causal attention, q: [b, h, sq, d], k: [b, h, sk, d], v: [b, h, sk, dv] (heads already
    matched), queries at global positions q_offset.. ; `sinks`: [h] logits or None."""
    return _BlockwiseAttention.apply(q, k, v, sinks, scale, sliding_window, q_offset)
