"""MoE token permutation and unpermutation in Triton, index computation included (the permute slot
of `kernels.moe_gemm: grouped_mm` on CUDA).

Permute: the T x k routed copies (token t's j-th choice is entry t*k + j) are sorted by expert,
stably, exactly as `torch.argsort(expert_ids.flatten(), stable=True)` orders them:
1. `_count_experts`: each program counts the experts of a block of entries (one-hot, summed);
2. torch sums those counts into tokens per expert and prefix-sums them into where each
   (block, expert) run starts ([blocks, experts], small);
3. `_place_and_gather`: each program ranks its entries within their expert (a cumulative sum of
   the one-hot along the block: stable), writes each entry's destination row (`position`) and
   copies the token's row there.
Unpermute: out[t] = sum_j w[t, j] * y[position[t*k + j]], a gather-sum per token in fp32 (the
"scatter-add back" written as a gather: every output row is owned by one program, so no atomics
and a deterministic sum). The permute's backward is the same gather-sum without weights; the
unpermute's backward scatters w * dout back to each copy's row (each row written once) and
reduces dout . y for the weights' gradient.

`position` (int64 [T*k], entry -> sorted row) is what `MoE.dispatch` returns as its opaque
`order` and `MoE.combine` takes back (expert parallelism passes it through unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import accumulator, pow2_at_least

ROW_BLOCK = 64  # columns per copy step
TOKEN_BLOCK = 16  # tokens per unpermute program


@triton.jit
def _count_experts(ids_ptr, block_counts_ptr, entries, experts, BLOCK: tl.constexpr, EXPERTS: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offsets, mask=offsets < entries, other=-1)
    expert = tl.arange(0, EXPERTS)
    one_hot = (ids[:, None] == expert[None, :]).to(tl.int32)
    counts = tl.sum(one_hot, axis=0)
    tl.store(block_counts_ptr + block * experts + expert, counts.to(tl.int64), mask=expert < experts)


@triton.jit
def _place_and_gather(ids_ptr, run_start_ptr, x_ptr, out_ptr, position_ptr, entries, experts, top_k, width,
                      x_row_stride, BLOCK: tl.constexpr, EXPERTS: tl.constexpr, COLUMNS: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < entries
    ids = tl.load(ids_ptr + offsets, mask=valid, other=-1)
    expert = tl.arange(0, EXPERTS)
    one_hot = (ids[:, None] == expert[None, :]).to(tl.int32)
    # Entries of the same expert earlier in this block: the stable rank inside the block.
    earlier = tl.cumsum(one_hot, axis=0) - one_hot
    rank = tl.sum(earlier * one_hot, axis=1).to(tl.int64)
    start = tl.load(run_start_ptr + block * experts + ids, mask=valid, other=0)
    destination = start + rank
    tl.store(position_ptr + offsets, destination, mask=valid)
    token = (offsets // top_k).to(tl.int64)
    for first in range(0, width, COLUMNS):
        cols = first + tl.arange(0, COLUMNS)
        inside = valid[:, None] & (cols[None, :] < width)
        rows = tl.load(x_ptr + token[:, None] * x_row_stride + cols[None, :], mask=inside)
        tl.store(out_ptr + destination[:, None] * width + cols[None, :], rows, mask=inside)


@triton.jit
def _gather_sum(src_ptr, position_ptr, weight_ptr, out_ptr, tokens, top_k, width, HAS_WEIGHTS: tl.constexpr,
                TOKENS: tl.constexpr, COLUMNS: tl.constexpr, ACC: tl.constexpr):
    token = (tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)
    cols = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    valid = token < tokens
    inside = valid[:, None] & (cols[None, :] < width)
    acc = tl.zeros([TOKENS, COLUMNS], dtype=ACC)
    for j in range(0, top_k):
        row = tl.load(position_ptr + token * top_k + j, mask=valid, other=0)
        values = tl.load(src_ptr + row[:, None] * width + cols[None, :], mask=inside, other=0.0).to(ACC)
        if HAS_WEIGHTS:
            weight = tl.load(weight_ptr + token * top_k + j, mask=valid, other=0.0).to(ACC)
            values = values * weight[:, None]
        acc += values
    tl.store(out_ptr + token[:, None] * width + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _unpermute_backward(dout_ptr, src_ptr, position_ptr, weight_ptr, dsrc_ptr, dweight_ptr, tokens, top_k, width,
                        TOKENS: tl.constexpr, COLUMNS: tl.constexpr, ACC: tl.constexpr):
    token = (tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)
    valid = token < tokens
    for j in range(0, top_k):
        row = tl.load(position_ptr + token * top_k + j, mask=valid, other=0)
        weight = tl.load(weight_ptr + token * top_k + j, mask=valid, other=0.0).to(ACC)
        dot = tl.zeros([TOKENS], dtype=ACC)
        for first in range(0, width, COLUMNS):
            cols = first + tl.arange(0, COLUMNS)
            inside = valid[:, None] & (cols[None, :] < width)
            dout = tl.load(dout_ptr + token[:, None] * width + cols[None, :], mask=inside, other=0.0).to(ACC)
            values = tl.load(src_ptr + row[:, None] * width + cols[None, :], mask=inside, other=0.0).to(ACC)
            dot += tl.sum(dout * values, axis=1)
            tl.store(dsrc_ptr + row[:, None] * width + cols[None, :],
                     (dout * weight[:, None]).to(dsrc_ptr.dtype.element_ty), mask=inside)
        tl.store(dweight_ptr + token * top_k + j, dot.to(dweight_ptr.dtype.element_ty), mask=valid)


def _entry_block(experts: int) -> int:
    """Entries per program: the one-hot tile [entries, experts] stays at about 4k elements."""
    return max(16, min(128, 4096 // pow2_at_least(experts)))


def permute_tokens(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, top_k: int):
    """(x_sorted [T*k, H], tokens_per_expert int64 [E], position int64 [T*k])."""
    flat = expert_ids.reshape(-1).contiguous()
    entries, width = flat.numel(), x.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    x_sorted = torch.empty(entries, width, dtype=x.dtype, device=x.device)
    position = torch.empty(entries, dtype=torch.int64, device=x.device)
    block = _entry_block(num_experts)
    blocks = triton.cdiv(entries, block)
    if blocks == 0:
        return x_sorted, torch.zeros(num_experts, dtype=torch.int64, device=x.device), position
    experts_pow2 = pow2_at_least(num_experts)
    block_counts = torch.empty(blocks, num_experts, dtype=torch.int64, device=x.device)
    _count_experts[(blocks,)](flat, block_counts, entries, num_experts, BLOCK=block, EXPERTS=experts_pow2)
    tokens_per_expert = block_counts.sum(0)
    expert_start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    run_start = torch.cumsum(block_counts, 0) - block_counts + expert_start
    _place_and_gather[(blocks,)](flat, run_start, x, x_sorted, position, entries, num_experts, top_k, width,
                                 x.stride(0), BLOCK=block, EXPERTS=experts_pow2, COLUMNS=ROW_BLOCK)
    return x_sorted, tokens_per_expert, position


def gather_sum(src: torch.Tensor, position: torch.Tensor, weights: torch.Tensor | None, tokens: int,
               top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_j (w[t, j] *) src[position[t*k + j]] -> [tokens, H]."""
    width = src.shape[1]
    src = src.contiguous()
    out = torch.empty(tokens, width, dtype=out_dtype, device=src.device)
    if tokens and width:
        grid = (triton.cdiv(tokens, TOKEN_BLOCK), triton.cdiv(width, ROW_BLOCK))
        has_weights = weights is not None
        _gather_sum[grid](src, position, weights.contiguous() if has_weights else src, out, tokens, top_k, width,
                          HAS_WEIGHTS=has_weights, TOKENS=TOKEN_BLOCK, COLUMNS=ROW_BLOCK,
                          ACC=accumulator(src.dtype)[1])
    return out


class PermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ids, num_experts: int, top_k: int):
        x_sorted, tokens_per_expert, position = permute_tokens(x, expert_ids, num_experts, top_k)
        ctx.save_for_backward(position)
        ctx.tokens, ctx.top_k = x.shape[0], top_k
        ctx.mark_non_differentiable(tokens_per_expert, position)
        return x_sorted, tokens_per_expert, position

    @staticmethod
    def backward(ctx, grad_sorted, unused_counts, unused_position):
        (position,) = ctx.saved_tensors
        grad_x = gather_sum(grad_sorted, position, None, ctx.tokens, ctx.top_k, grad_sorted.dtype)
        return grad_x, None, None, None


class UnpermuteTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, position):
        tokens, top_k = weights.shape
        ctx.save_for_backward(y_sorted, weights, position)
        return gather_sum(y_sorted, position, weights, tokens, top_k, torch.promote_types(y_sorted.dtype, weights.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, weights, position = ctx.saved_tensors
        tokens, top_k = weights.shape
        width = y_sorted.shape[1]
        grad_out = grad_out.contiguous()
        y_sorted = y_sorted.contiguous()
        grad_y = torch.empty_like(y_sorted)
        grad_w = torch.empty(tokens, top_k, dtype=weights.dtype, device=weights.device)
        if tokens:
            _unpermute_backward[(triton.cdiv(tokens, TOKEN_BLOCK),)](
                grad_out, y_sorted, position, weights.contiguous(), grad_y, grad_w, tokens, top_k, width,
                TOKENS=TOKEN_BLOCK, COLUMNS=ROW_BLOCK, ACC=accumulator(y_sorted.dtype)[1])
        return grad_y, grad_w, None


class TritonTokenPermuter:
    """What `MoE.token_permuter` holds on CUDA (see `MoE.dispatch` / `MoE.combine`)."""

    name = "triton"

    def permute(self, x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, top_k: int):
        return PermuteTokens.apply(x, expert_ids, num_experts, top_k)

    def unpermute(self, y_sorted: torch.Tensor, weights: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return UnpermuteTokens.apply(y_sorted, weights, position)


__all__ = ["PermuteTokens", "TritonTokenPermuter", "UnpermuteTokens", "gather_sum", "permute_tokens"]
