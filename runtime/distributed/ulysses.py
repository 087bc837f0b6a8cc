"""Ulysses sequence parallelism: attention over the full sequence on a shard of the heads.

Each of the `sp` ranks of a Ulysses group holds a contiguous chunk of every sequence. The
attention module's own `project_qkv` runs on the local chunk (RoPE with the chunk's *global*
positions, which the model receives as `positions`); the wrapped `core` then

1. all-to-alls q, k, v from sequence-sharded [b, h, s/sp, d] to head-sharded [b, h/sp, s, d];
2. runs the module's own attention product (causal mask, sliding window, GPT-OSS sinks sliced to
   the local heads) over the full sequence;
3. all-to-alls the output back to [b, h, s/sp, d_v] for `o_proj`.

GQA: with kv heads >= sp the kv heads are split like the query heads (kv % sp == 0); with fewer
kv heads than ranks they are repeated sp / kv times first (sp % kv == 0). MLA expands its latent
into per-head k/v before `core`, so every head is independent (v may be narrower than q/k).

Loss: every rank holds the labels of its own chunk (shift on the full sequence, then split; see
`mesh.local_batch`), so per-rank token-loss sums add up to the global sum without any extra
communication, and gradients of the attention weights are summed over the Ulysses ranks by the
same FSDP reduction as over data-parallel ranks.

Images (vision-language models, `apply_ulysses_images`): image tokens join the sequence before the
language model, so Ulysses splits them like any token. Each rank gets 1/sp of the micro-batch's
images (`train.data.image_share`), runs the vision tower and projector on them, and one all-gather
over the Ulysses group gives every rank the features of all of them; each rank merges those whose
placeholders lie in its own chunk (`models.vision.merge_image_chunk`). The all-gather's backward
reduce-scatters (sums) the features' gradients, so each rank's vision weights get the gradient of
its images from every chunk, and FSDP sums them over all ranks as it does the attention weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from xplan.errors import InputError

from ..compat import all_gather_single_autograd, all_to_all_single_autograd, wait_collective


def seq_to_heads(x: torch.Tensor, sp: int, group: ProcessGroup) -> torch.Tensor:
    """[b, h, s/sp, d] (sequence chunk) -> [b, h/sp, s, d] (head shard, full sequence)."""
    b, h, s, d = x.shape
    x = x.reshape(b, sp, h // sp, s, d).permute(1, 0, 2, 3, 4).contiguous()
    y = wait_collective(all_to_all_single_autograd(x, None, None, group))  # dim 0: source = sequence chunk
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * s, d)


def heads_to_seq(x: torch.Tensor, sp: int, group: ProcessGroup) -> torch.Tensor:
    """[b, h/sp, s, d] (head shard) -> [b, h, s/sp, d] (sequence chunk)."""
    b, hl, s, d = x.shape
    x = x.reshape(b, hl, sp, s // sp, d).permute(2, 0, 1, 3, 4).contiguous()
    y = wait_collective(all_to_all_single_autograd(x, None, None, group))  # dim 0: source = head shard
    return y.permute(1, 0, 2, 3, 4).reshape(b, sp * hl, s // sp, d)


def check_ulysses_heads(num_heads: int, num_kv_heads: int, sp: int) -> None:
    if num_heads % sp:
        raise InputError(f"Ulysses sp ({sp}) must divide the attention heads ({num_heads}); choose sp from the "
                         "divisors of the head count.")
    if num_kv_heads % sp and sp % num_kv_heads:
        raise InputError(f"Ulysses sp ({sp}) and the kv heads ({num_kv_heads}) must divide one another (kv heads "
                         "are split when kv % sp == 0 and repeated when sp % kv == 0); choose another sp.")


def apply_ulysses(attn: nn.Module, sp: int, sp_rank: int, group: ProcessGroup) -> nn.Module:
    """Wrap `attn.core` (GQAAttention or MLAttention) with the Ulysses all-to-alls, in place."""
    if "core" in attn.__dict__:
        raise ValueError("Ulysses is already applied to this attention module")
    heads = attn.num_heads
    kv_heads = getattr(attn, "num_kv_heads", heads)
    check_ulysses_heads(heads, kv_heads, sp)
    class_core = type(attn).core
    local_heads = heads // sp

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        if k.shape[1] < sp:  # fewer kv heads than ranks: one (repeated) kv head per rank
            k = k.repeat_interleave(sp // k.shape[1], dim=1)
            v = v.repeat_interleave(sp // v.shape[1], dim=1)
        q, k, v = (seq_to_heads(t, sp, group) for t in (q, k, v))
        sinks = attn._parameters.get("sinks")
        if sinks is not None:  # GPT-OSS: one sink logit per head, keep this rank's heads
            attn.__dict__["sinks"] = sinks[sp_rank * local_heads:(sp_rank + 1) * local_heads]
        try:
            out = class_core(attn, q, k, v, q_offset)
        finally:
            attn.__dict__.pop("sinks", None)
        return heads_to_seq(out, sp, group)

    attn.__dict__["core"] = core
    return attn


def apply_ulysses_images(model: nn.Module, group: ProcessGroup) -> nn.Module:
    """Let a vision-language model gather its image features over the Ulysses group, in place."""

    def gather_images(features: torch.Tensor) -> torch.Tensor:  # [images / sp, ...] -> [images, ...]
        return wait_collective(all_gather_single_autograd(features.contiguous(), 0, group))

    model.gather_images = gather_images
    return model


__all__ = ["apply_ulysses", "apply_ulysses_images", "check_ulysses_heads", "heads_to_seq", "seq_to_heads"]
