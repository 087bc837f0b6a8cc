"""Multi-head latent attention (DeepSeek-V3, Kimi K2).

Queries come from a low-rank path (`q_a_proj` -> RMSNorm -> `q_b_proj`) or a plain `q_proj`.
Keys and values share one compressed latent: `kv_a_proj_with_mqa` produces the latent (width
`kv_lora_rank`, normalised by `kv_a_layernorm`) plus one rotary key slice `k_pe` that every head
shares; `kv_b_proj` expands the latent into per-head `k_nope` and `v`. Each head's key is
`[k_nope, k_pe]` and its query `[q_nope, q_pe]`; RoPE touches only the `*_pe` parts.

DeepSeek checkpoints store the rotary dims as interleaved pairs `(x0, x1), (x2, x3), ...`
(`rope_interleave`, default true): we regroup them as `[even dims, odd dims]` and then apply the
usual rotate-half RoPE. Queries and keys are regrouped the same way, so dot products are those of
the interleaved rotation.

Like `GQAAttention`, projections and the attention product are separate steps (`project_qkv`,
`core`, `o_proj`) so sequence parallelism can wrap the product without touching the math.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, apply_rope, attention_core, yarn_mscale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (d/2 pairs, 2)] -> [..., even dims then odd dims]."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def mla_softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 for scaled (e.g. yarn) RoPE."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope
    mscale_all_dim = rope.get("mscale_all_dim") or 0
    if rope.get("rope_type", "default") != "default" and mscale_all_dim:
        m = yarn_mscale(rope["factor"], mscale_all_dim)
        scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h = config.hidden_size
        self.layer_index = layer
        self.num_heads = config.num_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        bias = config.attention_bias
        q_out = self.num_heads * self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=bias)
        self.rope_interleave = bool(config.hf_dict.get("rope_interleave", True))
        self.scale = mla_softmax_scale(config)
        self.attention_kernel = None  # set by the kernel registry, as on GQAAttention

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_interleave:
            x = deinterleave(x)
        return apply_rope(x, cos, sin)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [b, s, hidden] -> q, k [b, heads, s, qk_head_dim] and v [b, heads, s, v_head_dim]."""
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        kv = kv.view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q_pe = self._rope(q_pe, cos, sin)
        k_pe = self._rope(k_pe.unsqueeze(1), cos, sin)  # one rotary key, shared by every head
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return q, k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        """Causal attention; v may be narrower than q/k (DeepSeek-V3: 128 vs 192)."""
        kernel = self.attention_kernel or attention_core
        return kernel(q, k, v, self.scale, None, None, q_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        out = self.core(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
